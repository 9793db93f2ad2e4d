"""The fused CPU kernel of the Self-Classifier loss (``adapters/_self_classifier_kernel.cpp``).

Through either adapter (torch: ctypes in an ``autograd.Function``; JAX: XLA FFI custom calls
in a ``custom_vjp``) it must give the value and gradient of the closed form in array ops
(itself checked against the core and finite differences in ``test_closed_form.py``)
for every view layout, row slice (gathered batch), dtype and thread count; it is chosen only
where it applies; building it fails softly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterlearn.adapters import _native

from bounds import assert_within_rounding, rounding_bounds

# (views, N, C, scale, loss rows, row/col temperatures); the kernel starts a second thread
# from 65,536 elements per thread (K N C in the forward's passes)
LAYOUTS = [
    (2, 64, 10, 3.0, None, (0.1, 0.05)),
    (3, 40, 7, 1.0, slice(10, 30), (0.1, 0.05)),  # a rank's rows of a gathered batch
    (8, 200, 100, 2.0, None, (0.1, 0.05)),  # multi-crop: 2 global + 6 local views, 26 pairs
    (3, 600, 129, 4.0, slice(100, 500), (0.3, 0.2)),  # C not a multiple of the vector width
    (2, 300, 1000, 3.0, None, (0.1, 0.05)),
    (2, 2, 2, 1.0, None, (1.0, 1.0)),
]
LAYOUT_IDS = ["2v", "rows", "8v", "3v-rows-odd-c", "large", "tiny"]


def layout_views(k: int, n: int, c: int, scale: float) -> list[np.ndarray]:
    rng = np.random.default_rng(k * n + c)
    return [scale * rng.standard_normal((n, c)) for _ in range(k)]


# ---------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fused():
    pytest.importorskip("torch")
    if _native.kernel() is None:
        pytest.skip("the fused kernel cannot be built here (no C++ compiler)")


def value_and_grads(views: list[np.ndarray], dtype, grad_scale: float = 1.7, **kwargs):
    import torch

    from clusterlearn.adapters._torch_self_classifier import self_classifier_head_loss

    xs = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in views]
    loss = self_classifier_head_loss(xs, **kwargs)
    grads = torch.autograd.grad(loss * grad_scale, xs)
    return loss.detach(), torch.stack(grads), loss.grad_fn


@pytest.mark.parametrize("cache", [True, False], ids=["cached-exps", "recomputed-exps"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,n,c,scale,rows,temps", LAYOUTS, ids=LAYOUT_IDS)
def test_fused_equals_array_closed_form(fused, k, n, c, scale, rows, temps, threads, cache, monkeypatch):
    import torch

    if not cache:
        monkeypatch.setattr(_native, "CACHE_BYTES", 0)
    assert bool(_native.cache_size(k, n, c, 8)) == cache  # every layout here is small

    views = layout_views(k, n, c, scale)
    tr, tc = temps
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float64, torch.float32):
            common = dict(rows=rows, row_temperature=tr, col_temperature=tc)
            loss, grads, fn = value_and_grads(views, dtype, kernel="fused", **common)
            ref, ref_grads, ref_fn = value_and_grads(views, dtype, kernel="array", **common)
            assert "Fused" in type(fn).__name__ and "Fused" not in type(ref_fn).__name__
            assert loss.dtype == dtype and loss.shape == ()
            assert_within_rounding(loss, grads.numpy(), ref, ref_grads.numpy(), views, dtype, temps)
    finally:
        torch.set_num_threads(saved)


def test_fused_gradient_is_not_trivial(fused):
    """A mutation check of the test above: the gradients differ between different logits and
    scale with the incoming gradient (a backward that ignores its input would pass nothing here)."""
    import torch

    rng = np.random.default_rng(5)
    views = [3 * rng.standard_normal((40, 9)) for _ in range(3)]
    loss, g1, _ = value_and_grads(views, torch.float64, grad_scale=1.0, kernel="fused")
    _, g2, _ = value_and_grads(views, torch.float64, grad_scale=-2.5, kernel="fused")
    bound = rounding_bounds(views, float(loss), g1.numpy(), np.float64)[1]
    torch.testing.assert_close(g2, -2.5 * g1, rtol=0, atol=2 * 2.5 * bound)
    assert float(g1.abs().max()) > 1e-3
    _, g3, _ = value_and_grads([views[0], views[2], views[1]], torch.float64, grad_scale=1.0, kernel="fused")
    assert not torch.allclose(g1, g3)


@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([0.3, 1.0, 3.0]), k=st.sampled_from([2, 3]))
def test_fused_spec_properties(fused, seed, scale, k):
    """The specification's properties, through the kernel itself (float32): invariance to class
    and row permutations, to the order of two views and to a scalar added to a view; the
    bound -log(eps); constant logits give log C - log(1 + C eps); the collapsed batch scores
    the reference's 24.378."""
    import torch

    from clusterlearn.adapters._torch_self_classifier import self_classifier_head_loss

    rng = np.random.default_rng(seed)
    n, c = 24, 11
    views = [scale * rng.standard_normal((n, c)) for _ in range(k)]

    def loss(vs: list[np.ndarray]) -> float:
        return float(self_classifier_head_loss([torch.tensor(v, dtype=torch.float32) for v in vs], kernel="fused"))

    def bound(vs: list[np.ndarray]) -> float:
        """Twice the float32 loss's rounding bound (two computations compared)."""
        value, grads, _ = value_and_grads(vs, torch.float64, grad_scale=1.0, kernel="fused")
        return 2 * rounding_bounds(vs, float(value), grads.numpy(), np.float32)[0]

    base = loss(views)
    assert 0 < base <= -math.log(1e-12)
    cols, rows = rng.permutation(c), rng.permutation(n)
    shifted = [v + rng.uniform(-50, 50) for v in views]
    same = [
        (loss([v[:, cols] for v in views]), bound(views)),
        (loss([v[rows] for v in views]), bound(views)),
        (loss(shifted), bound(shifted)),  # larger |s|: a larger bound
    ]
    if k == 2:
        same.append((loss(views[::-1]), bound(views)))
    for value, tolerance in same:
        assert abs(value - base) <= tolerance, (value, base, tolerance)
    row_shifted = [views[0] + rng.standard_normal((n, 1))] + views[1:]
    assert abs(loss(row_shifted) - base) > bound(row_shifted)  # a per-row shift is seen
    # constant logits: every probability is exactly 1/N or 1/C, only the sums round (N + C u)
    const = np.full((n, c), rng.uniform(-1e4, 1e4))
    unit = float(np.finfo(np.float32).eps) / 2
    assert loss([const] * k) == pytest.approx(math.log(c) - math.log1p(c * 1e-12), rel=(n + c) * unit)
    x = np.full((64, 8), -3.0)
    x[:, 0] = 3.0
    assert loss([x, x]) == pytest.approx(24.378, abs=1e-3)


def test_fused_peaked_logits_and_denormal_mode(fused):
    """Peaked logits (both max(sum, eps) clamps bite, products underflow past float32's normal
    range) stay finite and equal; the kernel's flush-to-zero does not leak into the caller."""
    import torch

    x = np.full((64, 8), -3.0)
    x[:, 0] = 3.0
    views = [x * 1e3, x * 1e3 + np.random.default_rng(0).standard_normal(x.shape)]
    loss, grads, _ = value_and_grads(views, torch.float32, kernel="fused")
    ref, ref_grads, _ = value_and_grads(views, torch.float32, kernel="array")
    assert torch.isfinite(loss) and bool(torch.isfinite(grads).all())
    assert_within_rounding(loss, grads.numpy(), ref, ref_grads.numpy(), views, np.float32)
    tiny = np.float32(1e-39)  # a float32 denormal
    assert tiny * np.float32(1.0) != 0.0
    assert float(torch.tensor([1e-39], dtype=torch.float32)[0]) != 0.0


def test_fused_non_finite_logits(fused):
    """The kernel's first pass finds NaN/inf: a ValueError naming the view (as the core's check)
    or, with check_finite=False, a NaN loss and NaN gradients instead of finite garbage."""
    import torch

    from clusterlearn.adapters._torch_self_classifier import SelfClassifierLoss

    rng = np.random.default_rng(4)
    good = [torch.tensor(rng.standard_normal((40, 6)), requires_grad=True) for _ in range(4)]
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        bad = good[1].detach().clone()
        bad[7, 2] = bad_value
        bad.requires_grad_(True)
        for kernel in ("fused", "array"):
            with pytest.raises(ValueError, match=r"logits\[1\] contains non-finite"):
                SelfClassifierLoss(gather=None, kernel=kernel)(good[0], bad)
            with pytest.raises(ValueError, match=r"logits\[1\]\[0\] contains non-finite"):
                SelfClassifierLoss(gather=None, kernel=kernel)([[good[0], good[1]], [bad, good[3]]])
        loss = SelfClassifierLoss(gather=None, kernel="fused", check_finite=False)(good[0], bad)
        grads = torch.autograd.grad(loss, (good[0], bad))
        assert torch.isnan(loss) and all(bool(torch.isnan(g).all()) for g in grads)


def test_fused_rows_devices_and_grad_mode(fused, monkeypatch):
    """Strided loss rows fall back to torch ops (the kernel takes a contiguous range), empty ones
    raise; the loss lives on the logits' device whatever the default; no gradient buffer is
    written where no gradient can be asked for."""
    import torch

    from clusterlearn.adapters._torch_self_classifier import FusedSelfClassifierFunction, self_classifier_head_loss

    views = layout_views(3, 12, 5, 2.0)
    strided = value_and_grads(views, torch.float64, rows=slice(0, 12, 2))
    reference = value_and_grads(views, torch.float64, rows=slice(0, 12, 2), kernel="array")
    assert type(strided[2]).__name__ == "SelfClassifierFunctionBackward"
    torch.testing.assert_close(strided[1], reference[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="contiguous"):
        value_and_grads(views, torch.float64, rows=slice(0, 12, 2), kernel="fused")
    for empty in (slice(4, 4), slice(8, 3)):
        with pytest.raises(ValueError, match="at least one of the 12 rows"):
            value_and_grads(views, torch.float64, rows=empty)
    xs = [torch.tensor(v) for v in views]
    with torch.device("meta"):
        loss = self_classifier_head_loss(xs, kernel="fused")
    assert loss.device.type == "cpu" and torch.isfinite(loss)
    asked = []
    run = FusedSelfClassifierFunction._run
    monkeypatch.setattr(FusedSelfClassifierFunction, "_run", lambda ctx, v, gradient: asked.append(gradient) or run(ctx, v, gradient))
    leaves = [x.clone().requires_grad_(True) for x in xs]
    with torch.no_grad():
        self_classifier_head_loss(leaves)
    self_classifier_head_loss(xs)
    self_classifier_head_loss(leaves)
    assert asked == [False, False, True]


@pytest.mark.slow
def test_fused_threading_paths(fused):
    """Both ways the kernel runs in parallel give the same loss and gradient: PyTorch's OpenMP
    pool (also when it grants fewer threads than asked: OMP_THREAD_LIMIT=1, run in a child
    process) and threads of its own."""
    import subprocess
    import sys

    import torch

    views = layout_views(2, 300, 1000, 3.0)  # large enough for two threads
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    lib = _native.kernel()
    try:
        pool = value_and_grads(views, torch.float64, kernel="fused")
        lib.sc_use_openmp(None, None, None)
        own = value_and_grads(views, torch.float64, kernel="fused")
    finally:
        runtime = _native._torch_openmp()
        lib.sc_use_openmp(*(runtime or (None, None, None)))
        torch.set_num_threads(saved)
    ref = value_and_grads(views, torch.float64, kernel="array")
    for got in (pool, own):
        assert_within_rounding(got[0], got[1].numpy(), ref[0], ref[1].numpy(), views, np.float64)
    loss_bound, grad_bound = (2 * b for b in rounding_bounds(views, float(ref[0]), ref[1].numpy(), np.float64))
    script = (
        "import numpy as np, torch\n"
        "torch.set_num_threads(2)\n"
        "from clusterlearn.adapters._torch_self_classifier import self_classifier_head_loss as f\n"
        "rng = np.random.default_rng(0)\n"
        "v = [torch.tensor(3 * rng.standard_normal((300, 1000)), requires_grad=True) for _ in range(2)]\n"
        "out = []\n"
        "for kernel in ('fused', 'array'):\n"
        "    loss = f(v, kernel=kernel)\n"
        "    out.append((float(loss), torch.stack(torch.autograd.grad(loss, v))))\n"
        f"assert abs(out[0][0] - out[1][0]) <= {loss_bound!r}, out\n"
        f"assert float((out[0][1] - out[1][1]).abs().max()) <= {grad_bound!r}\n"
    )
    env = {**__import__("os").environ, "OMP_THREAD_LIMIT": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_fused_retain_graph_backward_twice(fused):
    import torch

    from clusterlearn.adapters._torch_self_classifier import SelfClassifierLoss

    a, b = (torch.randn(40, 6, requires_grad=True) for _ in range(2))
    loss = SelfClassifierLoss(gather=None, kernel="fused")(a, b)
    first = torch.autograd.grad(loss, (a, b), retain_graph=True)
    second = torch.autograd.grad(loss, (a, b))
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_kernel_selection(fused, monkeypatch):
    import torch

    from clusterlearn.adapters._torch_self_classifier import SelfClassifierLoss, self_classifier_head_loss

    rng = np.random.default_rng(2)
    a, b = (torch.tensor(rng.standard_normal((16, 5)), requires_grad=True) for _ in range(2))

    def used(**kwargs):
        return type(self_classifier_head_loss([a, b], **kwargs).grad_fn).__name__

    assert used() == "FusedSelfClassifierFunctionBackward"
    for kwargs in (dict(clamp_sums=False), dict(eps=1e-200), dict(kernel="array")):
        assert used(**kwargs) == "SelfClassifierFunctionBackward", kwargs
    with pytest.raises(ValueError, match="log-space"):
        SelfClassifierLoss(gather=None, clamp_sums=False, kernel="fused")(a, b)
    with pytest.raises(ValueError, match="kernel must be one of"):
        SelfClassifierLoss(kernel="numba")
    with pytest.raises(ValueError, match="kernel must be one of"):
        self_classifier_head_loss([a, b], kernel="c")
    assert "kernel='auto'" in repr(SelfClassifierLoss())
    torch.testing.assert_close(SelfClassifierLoss(gather=None)(a, b), self_classifier_head_loss([a, b]))
    monkeypatch.setattr(_native, "kernel", lambda: None)
    assert used() == "SelfClassifierFunctionBackward"
    with pytest.raises(ValueError, match="could not be built"):
        SelfClassifierLoss(gather=None, kernel="fused")(a, b)


def test_build_into_fresh_cache_and_failure_warns(tmp_path, monkeypatch):
    """The first use compiles into the cache directory (the library, its SHA-256 and the
    builders' lock file); a compiler that fails gives a warning and ``None`` (the adapters then
    use the torch ops), not an exception. (No compiler and CLUSTERLEARN_NATIVE=0:
    core/test_native_cache.py.)"""
    build = _native.kernel.__wrapped__
    monkeypatch.setattr(_native, "_warned", set())
    monkeypatch.setenv("CLUSTERLEARN_CACHE", str(tmp_path / "ok"))
    if build() is None:
        pytest.skip("no C++ compiler")
    names = sorted(p.name for p in (tmp_path / "ok").iterdir())
    assert len(names) == 3 and names[0] == ".lock" and names[1].endswith(".so") and names[2] == names[1] + ".sha256"
    monkeypatch.setenv("CLUSTERLEARN_CACHE", str(tmp_path / "bad"))
    monkeypatch.setenv("CXX", "false")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert build() is None


# ---------------------------------------------------------------------------------------------
# JAX (XLA FFI custom calls)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def jax_fused():
    pytest.importorskip("jax")
    if _native.xla_targets() is None:
        pytest.skip("the fused kernel's XLA handlers cannot be built here (no C++ compiler)")


def jax_value_and_grads(views: list[np.ndarray], dtype, **kwargs):
    import jax
    import jax.numpy as jnp

    from clusterlearn.adapters._jax_self_classifier import self_classifier_head_loss

    xs = [jnp.asarray(v, dtype=dtype) for v in views]
    loss, grads = jax.jit(jax.value_and_grad(lambda vs: 1.7 * self_classifier_head_loss(vs, **kwargs)))(xs)
    return float(loss), np.stack([np.asarray(g, dtype=np.float64) for g in grads])


@pytest.mark.parametrize("cache", [True, False], ids=["cached-exps", "recomputed-exps"])
@pytest.mark.parametrize("k,n,c,scale,rows,temps", LAYOUTS, ids=LAYOUT_IDS)
def test_jax_fused_equals_array_closed_form(jax_fused, k, n, c, scale, rows, temps, cache, monkeypatch):
    import jax
    import jax.numpy as jnp

    if not cache:
        monkeypatch.setattr(_native, "CACHE_BYTES", 0)

    views = layout_views(k, n, c, scale)
    common = dict(rows=rows, row_temperature=temps[0], col_temperature=temps[1])
    with jax.enable_x64(True):
        for dtype in (jnp.float64, jnp.float32):
            loss, grads = jax_value_and_grads(views, dtype, kernel="fused", **common)
            ref, ref_grads = jax_value_and_grads(views, dtype, kernel="array", **common)
            assert_within_rounding(loss, grads, ref, ref_grads, views, dtype, temps)


def test_jax_kernel_selection(jax_fused):
    import jax
    import jax.numpy as jnp

    from clusterlearn.adapters._jax_self_classifier import SelfClassifierLoss, self_classifier_head_loss

    a, b = (jnp.asarray(np.random.default_rng(s).standard_normal((16, 5)), dtype=jnp.float32) for s in (0, 1))

    def lowered(**kwargs) -> str:
        return str(jax.make_jaxpr(jax.grad(lambda p, q: self_classifier_head_loss([p, q], **kwargs)))(a, b))

    assert "clusterlearn_sc_vjp_fwd" in lowered() and "clusterlearn_sc_vjp_bwd" in lowered()
    assert "clusterlearn_sc_forward" in str(jax.make_jaxpr(lambda p, q: self_classifier_head_loss([p, q]))(a, b))
    for kwargs in (dict(clamp_sums=False), dict(kernel="array"), dict(eps=1e-200)):
        assert "clusterlearn_sc" not in lowered(**kwargs), kwargs
    with pytest.raises(ValueError, match="log-space"):
        SelfClassifierLoss(clamp_sums=False, kernel="fused")(a, b)
    with pytest.raises(ValueError, match="kernel must be one of"):
        SelfClassifierLoss(kernel="triton")
    crit = SelfClassifierLoss()
    assert repr(crit).endswith("kernel='auto')")
    batched = jnp.stack([jnp.stack([a, b]), jnp.stack([b, a])])  # (2 problems, 2 views, N, C)
    per_problem = jax.vmap(lambda v: self_classifier_head_loss([v[0], v[1]]))(batched)
    views = [np.asarray(a, np.float64), np.asarray(b, np.float64)]
    value, grads = jax_value_and_grads(views, jnp.float32, kernel="array")  # (of 1.7 x the loss)
    bound = 2 * rounding_bounds(views, value / 1.7, grads / 1.7, np.float32)[0]
    np.testing.assert_allclose(np.asarray(per_problem), [float(crit(a, b))] * 2, rtol=0, atol=bound)
    nan = b.at[3, 1].set(jnp.nan)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, q: crit(p, q), argnums=(0, 1)))(a, nan)  # no check under jit
    assert np.isnan(float(loss)) and all(np.isnan(np.asarray(g)).all() for g in grads)
    np.testing.assert_allclose(float(crit(a, b)), float(SelfClassifierLoss(kernel="array")(a, b)), rtol=0, atol=bound)


def test_kernel_parameters_are_the_guard_plans():
    """The kernel's Params carry the core's GuardPlan (its only source of the floors, eps,
    temperatures, pairs and loss rows): nothing is recomputed on the adapters' side."""
    from clusterlearn.self_classifier import view_pairs
    from clusterlearn.self_classifier_guards import exp_floors, guard_plan, tiny

    plan = guard_plan(
        np.finfo(np.float32), 64, 10, row_temperature=0.1, col_temperature=0.05, eps=1e-12, clamp_sums=True,
        pairs=view_pairs(3), rows=slice(8, 40),
    )
    assert plan.linear and (plan.floor_targets, plan.floor_predictions) == exp_floors(np.finfo(np.float32), 64, 10, 1e-12)
    assert min(plan.floor_targets, plan.floor_predictions) >= tiny(np.finfo(np.float32))
    p = _native.params(plan, 3, threads=2)
    assert (p.k, p.n, p.c, p.r0, p.r1, p.npairs, p.threads) == (3, 64, 10, 8, 40, len(plan.pairs), 2)
    assert [p.pairs[i] for i in range(2 * p.npairs)] == [v for pair in plan.pairs for v in pair]
    assert (p.log_floor_t, p.log_floor_p) == (math.log(plan.floor_targets), math.log(plan.floor_predictions))
    assert (p.inv_tc, p.inv_tr, p.eps) == (1 / 0.05, 1 / 0.1, 1e-12)
    assert _native.gradient_scale(plan) == -1.0 / (len(plan.pairs) * 32 * 0.05)
