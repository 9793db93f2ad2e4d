"""Closed-form-backward Self-Classifier losses (torch ``autograd.Function``, JAX ``custom_vjp``).

Both must equal the core loss (:mod:`clusterlearn.self_classifier`) in value and gradient: the
core's gradient is autograd / ``jax.grad`` through its array-API formula, which the core's own
tests check against finite differences of a float64 NumPy transcription of the spec.
"""

from __future__ import annotations

import functools
import math
import os
import socket

import numpy as np
import pytest

from clusterlearn.self_classifier import SelfClassifierLoss as CoreLoss

from bounds import assert_within_rounding, rounding_bounds, unit_roundoff
from logits import make_heads, overflowing_views, rank_gather, ranks_mean

EPS = 1e-12

def collapsed(n: int = 64, c: int = 8) -> np.ndarray:
    """Every sample confident in class 0 (logits ±3): dead classes and unclaimed samples, so
    both ``max(sum, eps)`` clamps bite (the reference scores it 24.378)."""
    x = np.full((n, c), -3.0)
    x[:, 0] = 3.0
    return x


def arg(heads: list[list]) -> list:
    """One head: its list of views; several heads: the list of heads."""
    return heads[0] if len(heads) == 1 else heads


# (N, classes per head, views, scale, row temperature, col temperature, eps)
CASES = [
    (8, [5], 2, 1.0, 0.1, 0.05, EPS),
    (33, [10], 2, 3.0, 0.1, 0.05, EPS),  # peaked: clamps active
    (16, [7], 3, 1.0, 0.1, 0.05, EPS),
    (12, [6], 5, 0.5, 0.2, 0.5, 1e-3),
    (10, [3, 6], 4, 2.0, 1.0, 1.0, 1e-8),
    (24, [4, 9], 2, 1.0, 0.1, 0.05, 1e-35),  # float32 log-space paths of the clamped loss
]
CASE_IDS = ["2v", "peaked", "3v", "5v-tau", "heads-4v", "heads-tiny-eps"]


# ---------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------


def torch_value_and_grads(crit, heads, dtype):
    torch = pytest.importorskip("torch")
    ts = [[torch.tensor(v, dtype=dtype, requires_grad=True) for v in views] for views in heads]
    loss = crit(arg(ts))
    flat = [t for views in ts for t in views]
    grads = torch.autograd.grad(loss, flat)
    return float(loss.detach()), [g.double().numpy() for g in grads]


def torch_fast(**kwargs):
    from clusterlearn.adapters._torch_self_classifier import SelfClassifierLoss

    return SelfClassifierLoss(**kwargs)


def core_params(params: dict) -> dict:
    """The adapter's parameters without the adapter-only ``kernel``."""
    return {k: v for k, v in params.items() if k != "kernel"}


@pytest.mark.parametrize("kernel", ["auto", "array"])
@pytest.mark.parametrize("clamp", [True, False], ids=["clamped", "exact"])
@pytest.mark.parametrize("n,classes,views,scale,tr,tc,eps", CASES, ids=CASE_IDS)
def test_torch_matches_core(n, classes, views, scale, tr, tc, eps, clamp, kernel):
    """"auto" is the fused kernel where it applies (CPU, the linear-space cases), "array" the
    closed form in torch ops."""
    torch = pytest.importorskip("torch")
    heads = make_heads(n + views, n, classes, views, scale)
    params = dict(row_temperature=tr, col_temperature=tc, eps=eps, clamp_sums=clamp, kernel=kernel)
    for dtype in (torch.float64, torch.float32):
        expected, expected_grads = torch_value_and_grads(CoreLoss(**core_params(params)), heads, dtype)
        got, grads = torch_value_and_grads(torch_fast(gather=None, **params), heads, dtype)
        assert_within_rounding(got, grads, expected, expected_grads, heads, dtype, (tr, tc))


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(kernel="array"), dict(clamp_sums=False), dict(eps=1e-200, row_temperature=0.7)],
    ids=["clamped", "clamped-array", "exact", "clamped-log-space"],
)
def test_torch_gradcheck(kwargs):
    """Central differences in float64 with step h = 1e-6 are off by at most h² |third
    derivative| / 6 + u |L| / h: with the third derivative at most (2 / τ_min)³ (softmaxes of
    s/τ), about 1e-8 and 1e-9 here, within atol = 1e-7 on every ISA."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    crit = torch_fast(gather=None, **kwargs)
    views = [torch.tensor(rng.standard_normal((5, 3)), requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *v: crit(list(v)), views, eps=1e-6, atol=1e-7, rtol=1e-5)
    peaked = [torch.tensor(rng.standard_normal((6, 4)) * 4, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda a, b: crit(a, b), peaked, eps=1e-6, atol=1e-7, rtol=1e-5)
    heads = [torch.tensor(rng.standard_normal((4, c)), requires_grad=True) for c in (2, 2, 3, 3)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: crit([[a, b], [c, d]]), heads, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("clamp,expected", [(True, 24.378), (False, math.log(8))], ids=["clamped", "exact"])
def test_torch_collapsed_batch(clamp, expected):
    torch = pytest.importorskip("torch")
    x = collapsed()
    rng = np.random.default_rng(1)
    heads = [[x, x + 0.1 * rng.standard_normal(x.shape)]]
    for dtype in (torch.float64, torch.float32):
        core, core_grads = torch_value_and_grads(CoreLoss(clamp_sums=clamp), heads, dtype)
        got, grads = torch_value_and_grads(torch_fast(gather=None, clamp_sums=clamp), heads, dtype)
        assert_within_rounding(got, grads, core, core_grads, heads, dtype)
    got, _ = torch_value_and_grads(torch_fast(gather=None, clamp_sums=clamp), [[x, x]], torch.float64)
    np.testing.assert_allclose(got, expected, atol=1e-3)  # the reference's value, given to 3 decimals
    small = [torch.tensor(collapsed(8, 4) + 0.1 * rng.standard_normal((8, 4)), requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda p, q: torch_fast(gather=None, clamp_sums=clamp)(p, q), small, eps=1e-6, atol=1e-6)


def extreme_views() -> list[np.ndarray]:
    """Four views of logits of magnitude 1e4 (float32-representable): random, one with a dead
    class, one constant."""
    rng = np.random.default_rng(3)
    vs = [(rng.standard_normal((32, 16)) * 1e4).astype(np.float32).astype(np.float64) for _ in range(3)]
    vs.append(np.full((32, 16), 1e4))  # a constant view
    vs[1][:, 0] = -1e4  # a dead class
    return vs


def assert_matches_float64_core(loss: float, grads: list[np.ndarray], vs: list[np.ndarray], clamp: bool) -> None:
    """A float32 loss and its gradients equal the core's in float64 (torch autograd) within the
    float32 rounding bound (:func:`rounding_bounds`; |s|/τ = 2e5 here)."""
    assert math.isfinite(loss) and loss <= -math.log(EPS) + 1e-3
    assert all(np.isfinite(g).all() for g in grads)
    want, want_grads = torch_value_and_grads(CoreLoss(clamp_sums=clamp), [vs], pytest.importorskip("torch").float64)
    assert max(float(np.abs(g).max()) for g in want_grads) > 0
    assert_within_rounding(loss, grads, want, want_grads, vs, np.float32, computations=1)


@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize("kernel", ["auto", "array"])
@pytest.mark.parametrize("clamp", [True, False], ids=["clamped", "exact"])
def test_overflowing_scaled_logits_match_core(lib, kernel, clamp):
    vs = overflowing_views()
    if lib == "torch":
        loss, grads = torch_value_and_grads(torch_fast(gather=None, clamp_sums=clamp, kernel=kernel), [vs], pytest.importorskip("torch").float32)
    else:
        loss, grads = jax_value_and_grads(jax_fast(clamp_sums=clamp, kernel=kernel), [vs])
    assert math.isfinite(loss) and all(np.isfinite(g).all() for g in grads)
    if clamp:  # the exact loss in log space is accurate only to |s|/τ · (dtype eps): finite here
        # logits ±1e38: every softmax is exactly one-hot or uniform, so only the sums over N + C
        # terms round (2 computations)
        rtol = 2 * sum(vs[0].shape) * unit_roundoff(np.float32)
        np.testing.assert_allclose(loss, float(CoreLoss(clamp_sums=clamp)(vs)), rtol=rtol)


@pytest.mark.parametrize("case", ["extreme-clamped", "extreme-exact", "2v", "peaked"])
def test_rounding_bounds_catch_bugs(case):
    """A mutation check of :func:`rounding_bounds` as the tests use it (float32; two
    computations, or one against float64 for the extreme logits): it still rejects the float64
    loss and gradient of a wrong eps, of a dropped view, of the other clamp mode (where it
    matters) and gradients of the wrong sign; for moderate logits also other temperatures and
    gradients missing a view or 10 % off. (At |s|/τ = 2e5 the float32 gradient bound is the
    gradient's own size: only its sign is checked there.)"""
    torch = pytest.importorskip("torch")
    if case.startswith("extreme"):
        vs, params = extreme_views(), dict(clamp_sums=case == "extreme-clamped")
    else:
        n, classes, views, scale, tr, tc, eps = CASES[CASE_IDS.index(case)]
        (vs,) = make_heads(n + views, n, classes, views, scale)
        vs = vs + [vs[0][::-1].copy()]  # a third view, so that one can be dropped
        params = dict(row_temperature=tr, col_temperature=tc, eps=eps)
    temps = (params.get("row_temperature", 0.1), params.get("col_temperature", 0.05))

    def reference(views, **changes):
        return torch_value_and_grads(CoreLoss(**{**params, **changes}), [views], torch.float64)

    loss, grads = reference(vs)
    mutants = {
        "eps x 10": reference(vs, eps=params.get("eps", EPS) * 10),
        "a view dropped": (reference(vs[:-1])[0], grads),
        "sign of the gradient": (loss, [-g for g in grads]),
    }
    if case != "2v":  # no sum falls below eps there: the clamp changes nothing
        mutants["other clamp mode"] = reference(vs, clamp_sums=not params.get("clamp_sums", True))
    if not case.startswith("extreme"):  # saturated softmaxes: the temperatures change nothing
        mutants["temperatures swapped"] = reference(vs, row_temperature=temps[1], col_temperature=temps[0])
        mutants["gradient of a view missing"] = (loss, [np.zeros_like(grads[0])] + grads[1:])
        mutants["gradient 10 % off"] = (loss, [1.1 * g for g in grads])
    computations = 1 if case.startswith("extreme") else 2
    for name, (bad_loss, bad_grads) in mutants.items():
        with pytest.raises(AssertionError):
            assert_within_rounding(bad_loss, bad_grads, loss, grads, vs, np.float32, temps, computations)
            pytest.fail(f"{name}: within the bound")


@pytest.mark.parametrize("kernel", ["auto", "array"])
@pytest.mark.parametrize("clamp", [True, False], ids=["clamped", "exact"])
def test_torch_extreme_logits_match_float64(clamp, kernel):
    torch = pytest.importorskip("torch")
    vs = extreme_views()
    loss, grads = torch_value_and_grads(torch_fast(gather=None, clamp_sums=clamp, kernel=kernel), [vs], torch.float32)
    assert_matches_float64_core(loss, grads, vs, clamp)


def test_torch_call_forms_dtypes_and_functional():
    torch = pytest.importorskip("torch")
    from clusterlearn.adapters._torch_self_classifier import self_classifier_head_loss

    (vs,) = make_heads(1, 9, [4], 3)
    a, b, c = (torch.tensor(v) for v in vs)
    crit = torch_fast(gather=None)
    two = crit(a, b)
    assert two.shape == () and two.dtype == torch.float64
    assert float(two) == float(crit([a, b])) == float(crit((a, b))) == float(crit([[a, b]]))
    assert float(crit(a, b, c)) == float(crit([a, b, c]))
    three, grads = torch_value_and_grads(crit, [vs], torch.float64)
    bound = rounding_bounds(vs, three, grads, torch.float64)[0]
    np.testing.assert_allclose(float(self_classifier_head_loss(torch.stack([a, b, c]))), three, rtol=0, atol=2 * bound)
    half = crit(a.half(), b.half())
    assert half.dtype == torch.float32  # float16 logits are computed with in float32, as in the core
    halves = [v.astype(np.float16) for v in vs[:2]]
    bound = rounding_bounds(halves, float(half), torch_value_and_grads(crit, [halves], torch.float64)[1], torch.float32)[0]
    np.testing.assert_allclose(float(half), float(CoreLoss()(a.half(), b.half())), rtol=0, atol=2 * bound)
    assert "gather='auto'" in repr(torch_fast())


def test_torch_retain_graph_backward_twice():
    torch = pytest.importorskip("torch")
    a, b = (torch.randn(6, 4, requires_grad=True) for _ in range(2))
    loss = torch_fast(gather=None)(a, b)
    first = torch.autograd.grad(loss, (a, b), retain_graph=True)
    second = torch.autograd.grad(loss, (a, b))
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_torch_fake_gather_gradients():
    """Per-rank losses on gathered logits; summing their gradients over ranks (the gather's
    backward) and DDP's mean give the full-batch gradient."""
    torch = pytest.importorskip("torch")
    world, n_local = 3, 4
    (vs,) = make_heads(17, world * n_local, [6], 3, scale=2.0)
    full = [torch.tensor(v, requires_grad=True) for v in vs]
    expected_loss = torch_fast(gather=None)(full)
    expected = torch.autograd.grad(expected_loss, full)
    slices = [slice(r * n_local, (r + 1) * n_local) for r in range(world)]
    losses, reduced = [], [0.0] * len(vs)
    for r in range(world):
        gathered = [torch.tensor(v, requires_grad=True) for v in vs]
        local = [torch.tensor(v[slices[r]]) for v in vs]
        loss = torch_fast(gather=rank_gather(gathered, local, slices[r]))(local)
        core = CoreLoss(gather=rank_gather(gathered, local, slices[r]))(local)
        grads = torch.autograd.grad(loss, gathered)
        loss_bound, _ = rounding_bounds(vs, float(loss.detach()), grads, torch.float64)
        np.testing.assert_allclose(float(loss.detach()), float(core.detach()), rtol=0, atol=2 * loss_bound)
        losses.append(float(loss.detach()))
        reduced = [acc + g for acc, g in zip(reduced, grads)]
    assert_within_rounding(np.mean(losses), [g / world for g in reduced], expected_loss.detach(), expected, vs, torch.float64)


def _ddp_worker(rank: int, world: int, port: int, views: list[np.ndarray], out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = views[0].shape[0] // world
        local = [torch.tensor(v[rank * n : (rank + 1) * n], requires_grad=True) for v in views]
        loss = torch_fast()(local)  # gather="auto": all_gather_with_grad
        loss.backward()
        np.savez(f"{out}/rank{rank}.npz", loss=float(loss.detach()), *[x.grad.numpy() for x in local])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_two_ranks_equal_one_process(tmp_path):
    """gather="auto" under a real 2-rank gloo group: mean loss and DDP-averaged gradients equal
    one process on the whole batch."""
    torch = pytest.importorskip("torch")
    mp = pytest.importorskip("torch.multiprocessing")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (vs,) = make_heads(29, 10, [7], 3, scale=2.0)
    mp.spawn(_ddp_worker, args=(2, port, vs, str(tmp_path)), nprocs=2, join=True)
    full = [torch.tensor(v, requires_grad=True) for v in vs]
    loss = torch_fast()(full)  # not initialised here: "auto" means no gather
    loss.backward()
    results = [np.load(os.path.join(tmp_path, f"rank{r}.npz")) for r in range(2)]
    got = [np.vstack([r[f"arr_{v}"] for r in results]) / 2 for v in range(3)]  # DDP's mean over ranks
    mean = np.mean([r["loss"] for r in results])
    assert_within_rounding(mean, got, float(loss.detach()), [x.grad for x in full], vs, torch.float64)


# ---------------------------------------------------------------------------------------------
# JAX (float32: this suite runs without x64)
# ---------------------------------------------------------------------------------------------


def jax_value_and_grads(crit, heads):
    jax = pytest.importorskip("jax")
    xs = [[jax.numpy.asarray(v, dtype=jax.numpy.float32) for v in views] for views in heads]
    loss, grads = jax.jit(jax.value_and_grad(lambda h: crit(arg(h))))(xs)
    return float(loss), [np.asarray(g, dtype=np.float64) for views in grads for g in views]


def jax_fast(**kwargs):
    from clusterlearn.adapters._jax_self_classifier import SelfClassifierLoss

    return SelfClassifierLoss(**kwargs)


@pytest.mark.parametrize("kernel", ["auto", "array"])
@pytest.mark.parametrize(
    "case,clamp", [(0, True), (1, False), (3, True), (5, True)], ids=["2v", "peaked-exact", "5v-tau", "heads-tiny-eps"]
)
def test_jax_matches_core(case, clamp, kernel):
    n, classes, views, scale, tr, tc, eps = CASES[case]
    heads = make_heads(n + views, n, classes, views, scale)
    params = dict(row_temperature=tr, col_temperature=tc, eps=eps, clamp_sums=clamp)
    expected, expected_grads = jax_value_and_grads(CoreLoss(**params), heads)
    got, grads = jax_value_and_grads(jax_fast(kernel=kernel, **params), heads)
    assert_within_rounding(got, grads, expected, expected_grads, heads, np.float32, (tr, tc))


@pytest.mark.parametrize("kernel", ["auto", "array"])
@pytest.mark.parametrize("case", [1, 3, 4], ids=[CASE_IDS[i] for i in (1, 3, 4)])
def test_jax_float64_matches_core(case, kernel):
    """Under x64 the fused kernel ("auto") and the streamed path ("array"; both linear-space
    guards hold) equal the core to rounding, also for one rank's loss over a gather (loss rows
    a slice of the global batch) and with both clamps biting (case "peaked": one view collapsed)."""
    jax = pytest.importorskip("jax")
    from clusterlearn.self_classifier_guards import guard_plan

    n, classes, views, scale, tr, tc, eps = CASES[case]
    heads = make_heads(40 + case, n, classes, views, scale)
    if case == 1:
        heads[0][0] = collapsed(n, classes[0])
    params = dict(row_temperature=tr, col_temperature=tc, eps=eps)
    plan = functools.partial(
        guard_plan, np.finfo(np.float64), row_temperature=tr, col_temperature=tc, eps=eps, clamp_sums=True, pairs=()
    )
    rows = slice(n // 3, n // 3 + n // 2)
    fast = functools.partial(jax_fast, kernel=kernel)

    def rank_loss(crit_class, vs):
        local = [x[rows] for x in vs]
        return crit_class(gather=rank_gather(vs, local, rows), **params)(local)

    with jax.enable_x64(True):
        assert all(plan(n, c).linear for c in classes)
        xs = [[jax.numpy.asarray(v) for v in vs] for vs in heads]
        checks = [[lambda h, c=c: c(**params)(arg(h)) for c in (CoreLoss, fast)]]
        if len(xs) == 1:  # one head: also one rank's loss over a gather
            checks.append([lambda h, c=c: rank_loss(c, h[0]) for c in (CoreLoss, fast)])
        for core_fn, fast_fn in checks:
            expected, expected_grads = jax.jit(jax.value_and_grad(core_fn))(xs)
            got, grads = jax.jit(jax.value_and_grad(fast_fn))(xs)
            leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
            want = [np.asarray(e) for e in jax.tree.leaves(expected_grads)]
            assert_within_rounding(float(got), leaves, float(expected), want, heads, np.float64, (tr, tc))


@pytest.mark.parametrize("kernel", ["auto", "array"])
@pytest.mark.parametrize("clamp", [True, False], ids=["clamped", "exact"])
def test_jax_extreme_logits_match_float64(clamp, kernel):
    pytest.importorskip("torch")  # the float64 reference is the core under torch autograd
    vs = extreme_views()
    loss, grads = jax_value_and_grads(jax_fast(clamp_sums=clamp, kernel=kernel), [vs])
    assert_matches_float64_core(loss, grads, vs, clamp)


def test_jax_collapsed_and_eager():
    jax = pytest.importorskip("jax")
    x = collapsed()
    for clamp, expected in ((True, 24.378), (False, math.log(8))):
        got, grads = jax_value_and_grads(jax_fast(clamp_sums=clamp), [[x, x]])
        np.testing.assert_allclose(got, expected, atol=1e-3)
        assert all(np.isfinite(g).all() for g in grads)
    # eager (no jit) agrees with jit, and the pure function agrees with the class
    from clusterlearn.adapters._jax_self_classifier import self_classifier_loss

    (vs,) = make_heads(4, 9, [5], 2)
    a, b = (jax.numpy.asarray(v, dtype=jax.numpy.float32) for v in vs)
    eager = float(jax_fast()(a, b))
    jitted, grads = jax_value_and_grads(jax_fast(), [vs])
    bound = 2 * rounding_bounds(vs, jitted, grads, np.float32)[0]
    np.testing.assert_allclose(eager, jitted, rtol=0, atol=bound)
    np.testing.assert_allclose(float(self_classifier_loss([a, b])), eager, rtol=0, atol=bound)


def test_jax_fake_gather():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    world, n_local = 2, 6
    (vs,) = make_heads(19, world * n_local, [5], 3)
    xs = [jnp.asarray(v, dtype=jnp.float32) for v in vs]

    l_ranks, g_ranks = jax.jit(jax.value_and_grad(lambda v: ranks_mean(jax_fast, v, world, n_local)))(xs)
    l_full, g_full = jax.jit(jax.value_and_grad(lambda v: jax_fast()(v)))(xs)  # = core: test_jax_matches_core
    # each rank's loss rounds on its own (world computations on one side)
    assert_within_rounding(float(l_ranks), [np.asarray(g) for g in g_ranks], float(l_full), [np.asarray(g) for g in g_full], vs, np.float32, computations=world + 1)


# ---------------------------------------------------------------------------------------------
# bad input: the same errors as the core
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_bad_input_raises_as_core(lib):
    if lib == "torch":
        torch = pytest.importorskip("torch")
        crit, asarray = torch_fast(gather=None), torch.tensor
    else:
        jax = pytest.importorskip("jax")
        crit, asarray = jax_fast(), jax.numpy.asarray
    a = asarray(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"same shape.*logits\[1\] has \(5, 3\)"):
        crit(a, asarray(np.zeros((5, 3), np.float32)))
    with pytest.raises(ValueError, match=r"at least 2 rows.*N=1"):
        crit(asarray(np.zeros((1, 3), np.float32)), asarray(np.zeros((1, 3), np.float32)))
    with pytest.raises(ValueError, match=r"at least 2 columns.*C=1"):
        crit(asarray(np.zeros((4, 1), np.float32)), asarray(np.zeros((4, 1), np.float32)))
    with pytest.raises(ValueError, match="2-D"):
        crit(asarray(np.zeros(4, np.float32)), asarray(np.zeros(4, np.float32)))
    for bad in (np.nan, np.inf):
        x = np.zeros((4, 3), np.float32)
        x[2, 1] = bad
        with pytest.raises(ValueError, match=r"logits\[1\].*non-finite"):
            crit(a, asarray(x))
    for call, match in [
        (lambda: crit(a), "at least 2 views"),
        (lambda: crit(), "at least 2 views"),
        (lambda: crit([[a, a], [a]]), "head 1"),
        (lambda: crit([[a, a], [a, a, a]]), "same number of views"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="mixes"):
        crit([a, [a, a]])
    with pytest.raises(TypeError, match="floating"):
        crit(asarray(np.zeros((4, 3), np.int32)), asarray(np.zeros((4, 3), np.int32)))
    with pytest.raises(TypeError, match=r"logits\[0\] from .*numpy"):
        crit([np.zeros((4, 3)), a])
    if lib == "torch":
        # a view on another device (meta: no GPU needed) is refused before any kernel sees its
        # pointer (it used to reach the CPU kernel and crash the process)
        from clusterlearn.adapters._torch_self_classifier import self_classifier_head_loss

        elsewhere = torch.zeros(4, 3, device="meta")
        for call in (lambda: crit(a, elsewhere), lambda: crit([[a, a], [a, elsewhere]]),
                     lambda: self_classifier_head_loss([a, elsewhere])):
            with pytest.raises(ValueError, match=r"must be on one device, got .*on cpu, .*on meta"):
                call()
    make = torch_fast if lib == "torch" else jax_fast
    for kwargs, match in [(dict(row_temperature=0.0), "row_temperature"), (dict(eps=-1.0), "eps")]:
        with pytest.raises(ValueError, match=match):
            make(**kwargs)
    with pytest.raises(TypeError, match="gather"):
        make(gather=3)
    full = asarray(np.zeros((8, 3), np.float32))
    with pytest.raises(ValueError, match="expected 4"):
        make(gather=lambda x: (full, slice(0, 3)))(a, a)
    with pytest.raises(TypeError, match="slice"):
        make(gather=lambda x: (full, 0))(a, a)


@pytest.mark.parametrize(
    "clamp,eps,rows",
    [(True, EPS, None), (True, EPS, slice(3, 10)), (False, EPS, slice(0, 12, 2)), (True, 1e-35, None)],
    ids=["linear", "linear-rows", "exact-strided", "log-space-tiny-eps"],
)
def test_core_closed_form_traces_under_jit_and_matches_the_adapters(clamp, eps, rows):
    """The core's closed form (stacked, and streamed on a linear-space plan) traces under
    ``jax.jit`` (static shapes, no array value read) and equals, to float32 rounding, the
    torch adapter's loss (fused kernel where it applies) and the JAX adapter's (both kernels)."""
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp

    from clusterlearn import self_classifier_closed_form as closed_form
    from clusterlearn.adapters._jax_self_classifier import self_classifier_head_loss as jax_head
    from clusterlearn.adapters._torch_self_classifier import self_classifier_head_loss as torch_head
    from clusterlearn.self_classifier import view_pairs
    from clusterlearn.self_classifier_guards import guard_plan

    n, c, k = 12, 5, 3
    views = make_heads(5, n, [c], k, 2.0)[0]
    plan = guard_plan(
        np.finfo(np.float32), n, c, row_temperature=0.1, col_temperature=0.05, eps=eps, clamp_sums=clamp,
        pairs=view_pairs(k), rows=rows,
    )
    assert plan.linear == (clamp and eps == EPS)
    xs = jnp.asarray(np.stack(views), dtype=jnp.float32)
    one = jnp.ones((), dtype=jnp.float32)

    @jax.jit
    def stacked(x):
        loss, residuals = closed_form.forward(plan, x)
        return loss, closed_form.backward(plan, residuals, one)

    @jax.jit
    def streamed(x):
        loss, residuals = closed_form.streamed_forward(plan, tuple(x))
        return loss, jnp.stack(closed_form.streamed_backward(plan, residuals, one))

    got = [stacked(xs)] + ([streamed(xs)] if plan.linear else [])
    kwargs = dict(eps=eps, clamp_sums=clamp, rows=rows)
    ts = [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in views]
    loss = torch_head(ts, **kwargs)
    expected = [(float(loss.detach()), [g.numpy() for g in torch.autograd.grad(loss, ts)])]
    for kernel in ("auto", "array"):
        loss, grads = jax.value_and_grad(lambda x, kernel=kernel: jax_head(list(x), kernel=kernel, **kwargs))(xs)
        expected.append((float(loss), list(np.asarray(grads))))
    for loss, grads in got:
        for ref_loss, ref_grads in expected:
            assert_within_rounding(float(loss), list(np.asarray(grads)), ref_loss, ref_grads, views, np.float32)
