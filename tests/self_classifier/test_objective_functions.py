"""The pure functions of the Self-Classifier objective on every backend and under ``jax.jit``.

Each test runs one function of :mod:`clusterlearn.self_classifier` through ``core_backend``
(every array backend eagerly, and ``jit``: traced by ``jax.jit`` with the temperatures, ``eps``,
the floor and ``rows`` static) on float32 logits and compares it with the same function run
eagerly on NumPy, within two float32 computations' rounding bounds (``tests/bounds.py``; the
loss's from its float64 gradient). A function that stops being traceable (a Python
``bool``/``float`` of an array value, a shape that depends on values) fails here on ``jit`` only.

Both numerical paths are covered: ``clamp`` (the reference's ``max(sum, eps)``, computed in
linear space for float32 at these sizes) and ``exact`` (log space).
"""

from __future__ import annotations

import numpy as np
import pytest

from clusterlearn.self_classifier import (
    self_classifier_log_predictions,
    self_classifier_loss,
    self_classifier_pair_loss,
    self_classifier_targets,
)

from bounds import probability_rtol, rounding_bounds

TAU_ROW, TAU_COL, EPS = 0.1, 0.05, 1e-12
N, ROWS = 12, slice(3, 9)  # ROWS: this process's rows of a gathered batch
CLAMP = pytest.mark.parametrize("clamp", [True, False], ids=["clamp", "exact"])


def logits(seed: int, classes: int = 6, views: int = 1, scale: float = 4.0) -> list[np.ndarray]:
    """``views`` float32 (N, classes) logits."""
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal((N, classes))).astype(np.float32) for _ in range(views)]


def float64_loss_and_grads(fn, views: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """``fn(list of views)`` and its gradient in float64 (PyTorch autograd through the core)."""
    torch = pytest.importorskip("torch")
    ts = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in views]
    loss = fn(ts)
    return float(loss.detach()), [g.numpy() for g in torch.autograd.grad(loss, ts)]


def assert_loss_close(got, want: float, fn, views: list[np.ndarray]) -> None:
    """Two float32 computations of a loss agree within twice its first-order rounding bound."""
    ref, grads = float64_loss_and_grads(fn, views)
    bound, _ = rounding_bounds(views, ref, grads, np.float32, (TAU_ROW, TAU_COL))
    assert abs(float(got) - want) <= 2 * bound, (float(got), want, bound)


@CLAMP
def test_targets_equal_numpy(core_backend, clamp):
    (s,) = logits(1)
    floor = EPS if clamp else None
    want = self_classifier_targets(s, TAU_COL, sum_floor=floor, rows=ROWS)
    got = core_backend.to_numpy(
        core_backend.call(self_classifier_targets, core_backend.asarray(s), col_temperature=TAU_COL, sum_floor=floor, rows=ROWS)
    )
    # probabilities to a relative bound each; the exp floor (8 × the smallest normal, at most
    # C of them per row) over the row's column-softmax mass, absolutely
    col = np.exp((s - s.max(axis=0)) / TAU_COL)
    mass = (col / col.sum(axis=0)).sum(axis=1)[ROWS]
    atol = 2 * 8 * s.shape[1] * float(np.finfo(np.float32).smallest_normal) / mass.min()
    assert got.shape == (ROWS.stop - ROWS.start, s.shape[1])
    np.testing.assert_allclose(got, want, rtol=2 * probability_rtol(s, np.float32, TAU_COL), atol=atol)


@CLAMP
def test_log_predictions_equal_numpy(core_backend, clamp):
    (s,) = logits(2)
    floor = EPS if clamp else None
    want = self_classifier_log_predictions(s, TAU_ROW, EPS, sum_floor=floor, rows=ROWS)
    got = core_backend.to_numpy(
        core_backend.call(self_classifier_log_predictions, core_backend.asarray(s), row_temperature=TAU_ROW, eps=EPS, sum_floor=floor, rows=ROWS)
    )
    assert got.shape == (ROWS.stop - ROWS.start, s.shape[1])
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * probability_rtol(s, np.float32, TAU_ROW))  # log-probabilities


@CLAMP
def test_pair_loss_equals_numpy(core_backend, clamp):
    views = logits(3, views=2)
    settings = dict(row_temperature=TAU_ROW, col_temperature=TAU_COL, eps=EPS, clamp_sums=clamp)
    want = float(self_classifier_pair_loss(*views, **settings))
    got = core_backend.call(self_classifier_pair_loss, *(core_backend.asarray(v) for v in views), **settings)
    assert_loss_close(core_backend.to_numpy(got), want, lambda vs: self_classifier_pair_loss(*vs, **settings), views)


@CLAMP
@pytest.mark.parametrize("layout", ["3 views", "2 heads"])
def test_loss_equals_numpy(core_backend, clamp, layout):
    """A head with a local view (4 of the 6 ordered pairs), and two heads of different widths."""
    if layout == "3 views":
        heads, flat = logits(4, views=3), None
    else:
        heads = [logits(5, classes=6, views=2), logits(6, classes=4, views=2)]
        flat = [v for h in heads for v in h]
    settings = dict(row_temperature=TAU_ROW, col_temperature=TAU_COL, eps=EPS, clamp_sums=clamp)
    want = float(self_classifier_loss(heads, **settings))
    moved = [[core_backend.asarray(v) for v in h] for h in heads] if flat else [core_backend.asarray(v) for v in heads]
    got = core_backend.call(self_classifier_loss, moved, **settings)

    def loss(vs):
        return self_classifier_loss([vs[:2], vs[2:]] if flat else vs, **settings)

    assert_loss_close(core_backend.to_numpy(got), want, loss, flat or heads)


# ---------------------------------------------------------------------------------------------
# Closed-form forward and backward (issue 18): the core is getting the objective's closed-form
# forward/backward as pure array-API functions. Each gets a test here of the form above:
# ``core_backend.call(<function>, <arrays>, **<settings>)`` against its eager NumPy result within
# ``rounding_bounds`` (value and gradient), so that the jit case proves it traceable.
# ---------------------------------------------------------------------------------------------
