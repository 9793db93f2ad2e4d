"""The fused CPU kernel of the Self-Classifier loss (``adapters/_self_classifier_kernel.cpp``).

It must give the value and gradient of the closed form in torch ops
(:class:`SelfClassifierFunction`, itself checked against the core and finite differences in
``test_fast_self_classifier.py``) for every view layout, row slice (gathered batch), dtype
and thread count; it is chosen only where it applies; building it fails softly.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from clusterlearn.adapters import _native  # noqa: E402
from clusterlearn.adapters._torch_self_classifier import SelfClassifierLoss, self_classifier_head_loss  # noqa: E402


@pytest.fixture
def fused():
    if _native.kernel() is None:
        pytest.skip("the fused kernel cannot be built here (no C++ compiler)")


def value_and_grads(views: list[np.ndarray], dtype, grad_scale: float = 1.7, **kwargs):
    xs = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in views]
    loss = self_classifier_head_loss(xs, **kwargs)
    grads = torch.autograd.grad(loss * grad_scale, xs)
    return loss.detach(), torch.stack(grads), loss.grad_fn


# (views, N, C, scale, loss rows, row/col temperatures): two threads need N >= 32
LAYOUTS = [
    (2, 64, 10, 3.0, None, (0.1, 0.05)),
    (3, 40, 7, 1.0, slice(10, 30), (0.1, 0.05)),  # a rank's rows of a gathered batch
    (8, 48, 33, 2.0, None, (0.1, 0.05)),  # multi-crop: 2 global + 6 local views, 26 pairs
    (5, 37, 129, 4.0, slice(0, 17), (0.3, 0.2)),  # C not a multiple of the vector width
    (2, 300, 1000, 3.0, None, (0.1, 0.05)),
    (2, 2, 2, 1.0, None, (1.0, 1.0)),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k,n,c,scale,rows,temps", LAYOUTS, ids=["2v", "rows", "8v", "5v-rows-odd-c", "large", "tiny"])
def test_fused_equals_array_closed_form(fused, k, n, c, scale, rows, temps, threads):
    rng = np.random.default_rng(k * n + c)
    views = [scale * rng.standard_normal((n, c)) for _ in range(k)]
    tr, tc = temps
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
            common = dict(rows=rows, row_temperature=tr, col_temperature=tc)
            loss, grads, fn = value_and_grads(views, dtype, kernel="fused", **common)
            ref, ref_grads, ref_fn = value_and_grads(views, dtype, kernel="array", **common)
            assert "Fused" in type(fn).__name__ and "Fused" not in type(ref_fn).__name__
            assert loss.dtype == dtype and loss.shape == ()
            torch.testing.assert_close(loss, ref, rtol=rtol, atol=0)
            torch.testing.assert_close(grads, ref_grads, rtol=100 * rtol, atol=10 * rtol * float(ref_grads.abs().max()))
    finally:
        torch.set_num_threads(saved)


def test_fused_gradient_is_not_trivial(fused):
    """A mutation check of the test above: the gradients differ between different logits and
    scale with the incoming gradient (a backward that ignores its input would pass nothing here)."""
    rng = np.random.default_rng(5)
    views = [3 * rng.standard_normal((40, 9)) for _ in range(3)]
    _, g1, _ = value_and_grads(views, torch.float64, grad_scale=1.0, kernel="fused")
    _, g2, _ = value_and_grads(views, torch.float64, grad_scale=-2.5, kernel="fused")
    torch.testing.assert_close(g2, -2.5 * g1, rtol=1e-12, atol=0)
    assert float(g1.abs().max()) > 1e-3
    _, g3, _ = value_and_grads([views[0], views[2], views[1]], torch.float64, grad_scale=1.0, kernel="fused")
    assert not torch.allclose(g1, g3)


def test_fused_peaked_logits_and_denormal_mode(fused):
    """Peaked logits (both max(sum, eps) clamps bite, products underflow past float32's normal
    range) stay finite and equal; the kernel's flush-to-zero does not leak into the caller."""
    x = np.full((64, 8), -3.0)
    x[:, 0] = 3.0
    views = [x * 1e3, x * 1e3 + np.random.default_rng(0).standard_normal(x.shape)]
    loss, grads, _ = value_and_grads(views, torch.float32, kernel="fused")
    ref, ref_grads, _ = value_and_grads(views, torch.float32, kernel="array")
    assert torch.isfinite(loss) and bool(torch.isfinite(grads).all())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grads, ref_grads, rtol=1e-3, atol=1e-5 * float(ref_grads.abs().max()))
    tiny = np.float32(1e-39)  # a float32 denormal
    assert tiny * np.float32(1.0) != 0.0
    assert float(torch.tensor([1e-39], dtype=torch.float32)[0]) != 0.0


def test_fused_retain_graph_backward_twice(fused):
    a, b = (torch.randn(40, 6, requires_grad=True) for _ in range(2))
    loss = SelfClassifierLoss(gather=None, kernel="fused")(a, b)
    first = torch.autograd.grad(loss, (a, b), retain_graph=True)
    second = torch.autograd.grad(loss, (a, b))
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_kernel_selection(fused, monkeypatch):
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
    """The first use compiles into the cache directory; a compiler that fails gives a warning
    and ``None`` (the adapters then use the torch ops), not an exception."""
    build = _native.kernel.__wrapped__
    monkeypatch.setenv("CLUSTERLEARN_CACHE", str(tmp_path / "ok"))
    if build() is None:
        pytest.skip("no C++ compiler")
    assert [p.suffix for p in (tmp_path / "ok").iterdir()] == [".so"]
    monkeypatch.setenv("CLUSTERLEARN_CACHE", str(tmp_path / "bad"))
    monkeypatch.setenv("CXX", "false")
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert build() is None
    monkeypatch.setenv("CLUSTERLEARN_NATIVE", "0")
    assert build() is None
