"""SelfClassifierLoss: agreement with the spec's formula, gradients, properties, global batch.

Every test that does not need autograd runs on every backend of the ``backend`` fixture; the
inputs are built in NumPy and moved with ``backend.asarray`` (float32 unless stated).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterlearn.self_classifier import (
    SelfClassifierLoss,
    self_classifier_log_predictions,
    self_classifier_loss,
    self_classifier_pair_loss,
    self_classifier_targets,
    view_pairs,
)

from bounds import assert_within_rounding, probability_rtol, rounding_bounds, unit_roundoff
from logits import make_heads, overflowing_views, rank_gather, ranks_mean

TAU_ROW, TAU_COL, EPS = 0.1, 0.05, 1e-12


# ---------------------------------------------------------------------------------------------
# float64 NumPy transcription of the specification (the Self-Classifier paper, arXiv 2103.10994), written
# plainly: softmax, L1 normalisation, log of (N/C)·pred + eps.
# ---------------------------------------------------------------------------------------------


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_norm1(x: np.ndarray, axis: int, floor: float | None = None) -> np.ndarray:
    total = x.sum(axis=axis, keepdims=True)
    return x / (total if floor is None else np.maximum(total, floor))


def ref_pair(s_target, s_pred, tr=TAU_ROW, tc=TAU_COL, eps=EPS, clamp=True, dim=None):
    """ℓ(target from s_target, prediction from s_pred); ``clamp``: divide by max(sum, eps) as
    the reference code does; ``dim=-1``: the circulating all-dim=-1 variant."""
    s_target = np.asarray(s_target, np.float64)
    s_pred = np.asarray(s_pred, np.float64)
    n, c = s_pred.shape
    floor = eps if clamp else None
    d0, d1 = (0, 1) if dim is None else (dim, dim)
    target = np_norm1(np_softmax(s_target / tc, axis=d0), axis=d1, floor=floor)
    pred = np_norm1(np_softmax(s_pred / tr, axis=d1), axis=d0, floor=floor)
    log_pred = np.log(n / c * pred + eps)
    return -np.sum(target * log_pred) / n


def ref_loss(heads, tr=TAU_ROW, tc=TAU_COL, eps=EPS, clamp=True, dim=None):
    """Mean over heads and over ordered view pairs (i, j), i != j, not both local (i, j >= 2)."""
    terms = []
    for views in heads:
        for i in range(len(views)):
            for j in range(len(views)):
                if i == j or (i >= 2 and j >= 2):
                    continue
                terms.append(ref_pair(views[i], views[j], tr, tc, eps, clamp, dim))
    return float(np.mean(terms))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def float64_loss_and_grads(heads, **loss_kwargs) -> tuple[float, list[np.ndarray]]:
    """The core loss of ``heads`` (``heads[h][v]`` of shape ``(N, C_h)``) and its gradients in
    float64 (torch autograd, checked against finite differences below): the magnitudes the
    rounding bounds of :mod:`bounds` are made of."""
    torch = pytest.importorskip("torch")
    ts = [[torch.tensor(np.asarray(v, np.float64), requires_grad=True) for v in views] for views in heads]
    loss = SelfClassifierLoss(**loss_kwargs)(ts[0] if len(ts) == 1 else ts)
    grads = torch.autograd.grad(loss, [t for views in ts for t in views])
    return float(loss.detach()), [g.numpy() for g in grads]


def loss_bound(heads, dtype=np.float32, computations=1, views=None, tr=TAU_ROW, tc=TAU_COL, **loss_kwargs) -> float:
    """Absolute rounding bound of ``computations`` computations in ``dtype`` of the loss of
    ``heads`` (:func:`bounds.rounding_bounds`; ``views``: the logits that set the magnitude
    and N + C, if more than ``heads``: shifted or stacked copies)."""
    loss, grads = float64_loss_and_grads(heads, row_temperature=tr, col_temperature=tc, **loss_kwargs)
    return computations * rounding_bounds(heads if views is None else views, loss, grads, dtype, (tr, tc))[0]


_JITTED: dict = {}


def value(backend, criterion, *args) -> float:
    """The loss as a Python float. On JAX a SelfClassifierLoss without gather runs under
    ``jax.jit`` (one compilation per shape instead of one per eager op and shape, several
    times faster here); eager JAX is covered by the tests that call the criterion directly."""
    if backend.name == "jax" and isinstance(criterion, SelfClassifierLoss) and criterion.gather is None:
        key = repr(criterion)
        if key not in _JITTED:
            _JITTED[key] = backend.native.jit(lambda *a, _c=criterion: _c(*a))
        out = _JITTED[key](*args)
    else:
        out = criterion(*args)
    assert out.shape == ()
    return float(backend.to_numpy(out))


def on(backend, heads, dtype=None):
    return [[backend.asarray(v, dtype=dtype) for v in views] for views in heads]


# ---------------------------------------------------------------------------------------------
# agreement with the transcription
# ---------------------------------------------------------------------------------------------

CASES = [  # (N, classes per head, views)
    (4, [2], 2),
    (8, [5], 2),
    (32, [10], 2),
    (16, [7], 3),
    (12, [6], 5),
    (24, [4, 9], 2),
    (10, [3, 6, 12], 4),
]


@pytest.mark.parametrize("clamp", [True, False], ids=["clamped", "exact"])
@pytest.mark.parametrize("n,classes,views", CASES)
def test_matches_float64_transcription(backend, n, classes, views, clamp):
    heads = make_heads(n * 31 + views, n, classes, views)
    expected = ref_loss(heads, clamp=clamp)
    criterion = SelfClassifierLoss(clamp_sums=clamp)
    arg = on(backend, heads) if len(heads) > 1 else on(backend, heads)[0]
    got = value(backend, criterion, arg)
    np.testing.assert_allclose(got, expected, rtol=0, atol=loss_bound(heads, clamp_sums=clamp))


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_matches_transcription_in_float64(backend, scale):
    if backend.name == "jax":
        pytest.skip("jax runs without x64 here")
    heads = make_heads(7, 20, [8], 3, scale)
    for clamp in (False, True):
        for eps in (EPS, 1e-200):  # 1e-200: the log-space path of the clamped loss in float64
            crit = SelfClassifierLoss(clamp_sums=clamp, eps=eps)
            got = value(backend, crit, on(backend, heads, backend.xp.float64)[0])
            bound = loss_bound(heads, np.float64, 2, clamp_sums=clamp, eps=eps)  # two float64 computations
            np.testing.assert_allclose(got, ref_loss(heads, clamp=clamp, eps=eps), rtol=0, atol=bound)


def test_other_temperatures_and_eps(backend):
    heads = make_heads(3, 15, [6], 2, scale=2.0)
    # eps=1e-35 is below float32's resolution guard: the max-shifted logaddexp path
    for tr, tc, eps in [(1.0, 1.0, 1e-8), (0.2, 0.5, 1e-3), (0.1, 0.05, 1e-35)]:
        for clamp in (True, False):
            crit = SelfClassifierLoss(row_temperature=tr, col_temperature=tc, eps=eps, clamp_sums=clamp)
            np.testing.assert_allclose(
                value(backend, crit, *on(backend, heads)[0]),
                ref_loss(heads, tr, tc, eps, clamp=clamp),
                rtol=0,
                atol=loss_bound(heads, tr=tr, tc=tc, eps=eps, clamp_sums=clamp),
            )


def test_call_forms_agree(backend):
    heads = make_heads(1, 9, [4], 3)
    (views,) = on(backend, heads)
    crit = SelfClassifierLoss()
    bound = loss_bound([heads[0][:2]], computations=2)  # two float32 computations of one loss
    a, b, c = views
    two = value(backend, crit, a, b)
    assert two == value(backend, crit, [a, b]) == value(backend, crit, (a, b)) == value(backend, crit, [[a, b]])
    assert value(backend, crit, a, b, c) == value(backend, crit, [a, b, c])
    # the functional form and the pair function
    np.testing.assert_allclose(value(backend, lambda x: self_classifier_loss(x), [a, b]), two, rtol=0, atol=bound)
    pair = 0.5 * (
        float(backend.to_numpy(self_classifier_pair_loss(b, a))) + float(backend.to_numpy(self_classifier_pair_loss(a, b)))
    )
    np.testing.assert_allclose(pair, two, rtol=0, atol=bound)


def test_heads_are_mean_of_head_losses(backend):
    heads_np = make_heads(5, 12, [3, 7], 3)
    heads = on(backend, heads_np)
    crit = SelfClassifierLoss()
    per_head = [value(backend, crit, views) for views in heads]
    bound = loss_bound(heads_np, computations=2)
    np.testing.assert_allclose(value(backend, crit, heads), np.mean(per_head), rtol=0, atol=bound)


def test_pieces(backend):
    (views,) = make_heads(2, 10, [6], 2, scale=4.0)
    s = backend.asarray(views[0])
    # float32 against float64: probabilities to a relative, log-probabilities to an absolute
    # rounding bound (bounds.probability_rtol); a row of 6 targets sums to 1 within 2 · 6 u
    t_rtol, lp_atol = probability_rtol(views[0], np.float32, TAU_COL), probability_rtol(views[0], np.float32, TAU_ROW)
    # and the core raises exponentials below 8 · (smallest normal) to it (no underflow to 0):
    # at most C of them per row, over the row's sum of column-softmax probabilities
    row_sums = np_softmax(views[0] / TAU_COL, 0).sum(axis=1)
    t_atol = 8 * 6 * float(np.finfo(np.float32).smallest_normal) / row_sums.min()
    t = backend.to_numpy(self_classifier_targets(s))
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=2 * 6 * unit_roundoff(np.float32))
    np.testing.assert_allclose(t, np_norm1(np_softmax(views[0] / TAU_COL, 0), 1), rtol=t_rtol, atol=t_atol)
    lp = backend.to_numpy(self_classifier_log_predictions(s))
    expected = np.log(10 / 6 * np_norm1(np_softmax(views[0] / TAU_ROW, 1), 0) + EPS)
    np.testing.assert_allclose(lp, expected, rtol=0, atol=lp_atol)
    assert lp.min() >= math.log(EPS) - lp_atol
    rows = backend.to_numpy(self_classifier_targets(s, rows=slice(3, 7)))
    np.testing.assert_allclose(rows, t[3:7], rtol=2 * t_rtol, atol=2 * t_atol)  # two float32 computations
    # with the reference's floor on the sums (linear-space path for eps=1e-12, log-space for 1e-35)
    for floor in (EPS, 1e-35):
        t = backend.to_numpy(self_classifier_targets(s, sum_floor=floor))
        np.testing.assert_allclose(t, np_norm1(np_softmax(views[0] / TAU_COL, 0), 1, floor), rtol=t_rtol, atol=t_atol)
        lp = backend.to_numpy(self_classifier_log_predictions(s, eps=floor, sum_floor=floor))
        expected = np.log(10 / 6 * np_norm1(np_softmax(views[0] / TAU_ROW, 1), 0, floor) + floor)
        np.testing.assert_allclose(lp, expected, rtol=0, atol=lp_atol)


def test_view_pairs():
    assert view_pairs(2) == ((0, 1), (1, 0))
    assert set(view_pairs(3)) == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)}
    for v in range(2, 12):
        pairs = view_pairs(v)
        assert len(pairs) == len(set(pairs)) == 4 * v - 6
        assert all(i != j and min(i, j) < 2 for i, j in pairs)
    with pytest.raises(ValueError, match="num_views"):
        view_pairs(1)


def test_differs_from_all_dim_minus_one_variant(backend):
    heads = make_heads(11, 16, [10], 2)
    exact = ref_loss(heads)
    wrong = ref_loss(heads, dim=-1)
    got = value(backend, SelfClassifierLoss(), *on(backend, heads)[0])
    np.testing.assert_allclose(got, exact, rtol=0, atol=loss_bound(heads))
    assert abs(got - wrong) > 0.5, (got, wrong)


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------


def fd_grad(f, xs, h=1e-6):
    """Central finite differences of a float64 scalar function of several arrays."""
    grads = []
    for k, x in enumerate(xs):
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            plus = [y.copy() for y in xs]
            minus = [y.copy() for y in xs]
            plus[k][idx] += h
            minus[k][idx] -= h
            g[idx] = (f(plus) - f(minus)) / (2 * h)
        grads.append(g)
    return grads


def test_torch_gradcheck():
    torch = pytest.importorskip("torch")
    crit = SelfClassifierLoss()
    rng = np.random.default_rng(0)
    views = [torch.tensor(rng.standard_normal((6, 4)) * 0.5, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *v: crit(list(v)), views, eps=1e-6, atol=1e-6, rtol=1e-4)
    heads = [torch.tensor(rng.standard_normal((5, c)), requires_grad=True) for c in (3, 3, 4, 4)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: SelfClassifierLoss(clamp_sums=False)([[a, b], [c, d]]), heads, eps=1e-6, atol=1e-6, rtol=1e-4
    )
    # peaked logits: some sums fall below eps, so the clamp is active
    peaked = [torch.tensor(rng.standard_normal((6, 5)) * 4, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda a, b: SelfClassifierLoss()(a, b), peaked, eps=1e-6, atol=1e-6, rtol=1e-4)
    # eps=1e-200 sends float64 through the log-space implementation of the clamped loss
    assert torch.autograd.gradcheck(
        lambda a, b: SelfClassifierLoss(eps=1e-200)(a, b), views[:2], eps=1e-6, atol=1e-6, rtol=1e-4
    )


def _autograd(lib: str, crit, views_np: list[np.ndarray]):
    """(loss, gradients w.r.t. every view) from torch autograd or jax.grad, float32 inputs."""
    if lib == "torch":
        torch = pytest.importorskip("torch")
        ts = [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in views_np]
        loss = crit(ts)
        loss.backward()
        return float(loss.detach()), [t.grad.numpy() for t in ts]
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    xs = [jnp.asarray(v, dtype=jnp.float32) for v in views_np]
    loss, grads = jax.jit(jax.value_and_grad(lambda vs: crit(vs)))(xs)  # eager: see test_jax_jit_...
    return float(loss), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize(
    "views,clamp,eps",
    [(2, True, EPS), (3, False, EPS), (2, True, 1e-35)],
    ids=["clamped", "exact", "clamped-log-space"],  # eps=1e-35 takes the float32 log-space path
)
def test_gradient_matches_finite_differences(lib, views, clamp, eps):
    (vs,) = make_heads(views, 7, [5], views, scale=0.5)
    loss, grads = _autograd(lib, SelfClassifierLoss(clamp_sums=clamp, eps=eps), vs)
    expected = fd_grad(lambda xs: ref_loss([xs], clamp=clamp, eps=eps), vs)
    # float64 finite differences (off by h² max|f'''| / 6 + u |L| / h, about 1e-10) as exact
    assert_within_rounding(loss, grads, ref_loss([vs], clamp=clamp, eps=eps), expected, vs, np.float32, computations=1)


def test_gradient_flows_through_targets():
    """Nothing is detached: detaching the targets gives a different gradient."""
    torch = pytest.importorskip("torch")
    (vs,) = make_heads(4, 8, [5], 2)
    a, b = (torch.tensor(v, requires_grad=True) for v in vs)
    SelfClassifierLoss()(a, b).backward()
    full = a.grad.clone()
    a.grad = None
    detached = 0.5 * sum(
        -(self_classifier_targets(t).detach() * self_classifier_log_predictions(p)).sum() / 8
        for t, p in ((b, a), (a, b))
    )
    detached.backward()
    assert not torch.allclose(full, a.grad, atol=1e-3)


def test_jax_jit_value_and_grad_matches_eager():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    (vs,) = make_heads(9, 8, [4], 2)
    xs = [jnp.asarray(v, dtype=jnp.float32) for v in vs]
    crit = SelfClassifierLoss()
    eager_loss, eager_grads = jax.value_and_grad(lambda v: crit(v))(xs)  # jax.grad without jit
    jit_loss, jit_grads = jax.jit(jax.value_and_grad(lambda v: crit(v)))(xs)
    eager_grads = [np.asarray(e) for e in eager_grads]
    assert_within_rounding(jit_loss, [np.asarray(g) for g in jit_grads], eager_loss, eager_grads, vs, np.float32)
    np.testing.assert_allclose(float(jit_loss), ref_loss([vs]), rtol=0, atol=loss_bound([vs]))


@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize("clamp", [False, True])
def test_extreme_logits_finite_loss_and_gradients(lib, clamp):
    rng = np.random.default_rng(3)
    vs = [rng.standard_normal((32, 16)) * 1e4 for _ in range(3)]
    vs.append(np.full((32, 16), 1e4))  # constant view too
    vs[1][:, 0] = -1e4  # a dead class
    loss, grads = _autograd(lib, SelfClassifierLoss(clamp_sums=clamp), vs)
    assert math.isfinite(loss) and loss <= -math.log(EPS) + loss_bound([vs], clamp_sums=clamp)
    assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("clamp", [False, True])
def test_logits_whose_scaled_values_overflow(backend, clamp):
    # shifted and floored before scaling: finite, and NumPy warns of no overflow. The clamped
    # loss (linear space) equals its value at 1e4, where the softmaxes are as saturated; the
    # exact one (log space) is accurate only to |s|/τ · (dtype eps), here no better than finite.
    crit = SelfClassifierLoss(clamp_sums=clamp)
    with np.errstate(over="raise"):
        huge = float(crit([backend.asarray(v) for v in overflowing_views()]))
    assert math.isfinite(huge) and huge <= -math.log(EPS)
    if clamp:
        saturated = float(crit([backend.asarray(v * np.float32(1e-34)) for v in overflowing_views()]))
        # every softmax exactly one-hot or uniform in both: only the sums and logs round,
        # (N + C) u relative in each of the two computations
        assert huge == pytest.approx(saturated, rel=2 * (8 + 5) * unit_roundoff(np.float32), abs=0)


@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize("clamp", [False, True])
def test_logits_whose_scaled_values_overflow_gradients(lib, clamp):
    loss, grads = _autograd(lib, SelfClassifierLoss(clamp_sums=clamp), overflowing_views())
    assert math.isfinite(loss) and all(np.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# properties from the specification
# ---------------------------------------------------------------------------------------------

# A fixed set of shapes (values vary freely): JAX compiles every eager op once per shape.
SHAPES = [(2, 2), (3, 7), (12, 10)]
sizes = st.sampled_from(SHAPES)
scales = st.sampled_from([0.1, 1.0, 5.0])
seeds = st.integers(0, 2**32 - 1)


@given(size=sizes, scale=scales, seed=seeds, clamp=st.booleans())
def test_invariances(backend, size, scale, seed, clamp):
    n, c = size
    rng = np.random.default_rng(seed)
    a, b = (scale * rng.standard_normal((n, c)) for _ in range(2))
    crit = SelfClassifierLoss(clamp_sums=clamp)

    def loss(x, y):
        return value(backend, crit, backend.asarray(x), backend.asarray(y))

    base = loss(a, b)
    # each side one float32 computation; the magnitudes of every variant below (shifted,
    # stacked) set the bound, their gradients' 1-norms equal (a, b)'s
    variants = [a, b, a + 2.5, b - 1.25, np.vstack([a, a])]
    close = dict(rtol=0, atol=loss_bound([[a, b]], computations=2, views=variants, clamp_sums=clamp))
    cols, rows = rng.permutation(c), rng.permutation(n)
    np.testing.assert_allclose(loss(a[:, cols], b[:, cols]), base, **close)  # class permutation
    np.testing.assert_allclose(loss(a[rows], b[rows]), base, **close)  # row permutation
    np.testing.assert_allclose(loss(b, a), base, **close)  # view symmetry
    if not clamp:  # clamped: only while no sum falls below eps (test_repetition_clamped)
        np.testing.assert_allclose(loss(np.vstack([a, a]), np.vstack([b, b])), base, **close)  # [s; s]
    np.testing.assert_allclose(loss(a + 2.5, b - 1.25), base, **close)  # scalar shift per view
    assert base <= -math.log(EPS) + close["atol"]


@given(
    size=sizes,
    level=st.floats(-1e4, 1e4),
    eps=st.sampled_from([1e-12, 0.1]),
)
def test_constant_logits(backend, size, level, eps):
    n, c = size
    s = backend.asarray(np.full((n, c), level))
    got = value(backend, SelfClassifierLoss(eps=eps), s, s)
    # s − max(s) = 0 exactly: every softmax is exactly uniform, only sums (N + C terms) and logs round
    np.testing.assert_allclose(got, math.log(c) - math.log1p(c * eps), rtol=2 * (n + c) * unit_roundoff(np.float32), atol=0)


@given(
    size=sizes,
    scale=st.sampled_from([1.0, 30.0, 1e3, 1e4]),
    eps_clamp=st.sampled_from([(1e-12, True), (1e-2, False)]),
    seed=seeds,
)
def test_bounded_by_minus_log_eps(backend, size, scale, eps_clamp, seed):
    n, c = size
    eps, clamp = eps_clamp
    rng = np.random.default_rng(seed)
    vs_np = [(scale * rng.standard_normal((n, c))).astype(np.float32) for _ in range(3)]
    got = value(backend, SelfClassifierLoss(eps=eps, clamp_sums=clamp), [backend.asarray(v) for v in vs_np])
    assert math.isfinite(got)
    assert got <= -math.log(eps) + loss_bound([vs_np], eps=eps, clamp_sums=clamp)


def test_repetition_clamped(backend):
    """With the reference's clamp, [s; s] leaves L unchanged while every sum stays above eps;
    the exact variant is covered by the hypothesis test."""
    (a, b), = make_heads(23, 12, [5], 2, scale=0.2)
    crit = SelfClassifierLoss()
    base = value(backend, crit, backend.asarray(a), backend.asarray(b))
    rep = value(backend, crit, backend.asarray(np.vstack([a, a, a])), backend.asarray(np.vstack([b, b, b])))
    bound = loss_bound([[a, b]], views=[np.vstack([a, a, a])])  # N + C of the stacked batch
    np.testing.assert_allclose(rep, base, rtol=0, atol=2 * bound)
    np.testing.assert_allclose(base, ref_loss([[a, b]], clamp=False), rtol=0, atol=bound)  # clamp inactive


def test_row_and_column_shifts_change_the_loss(backend):
    (a, b), = make_heads(21, 16, [6], 2)
    rng = np.random.default_rng(0)
    crit = SelfClassifierLoss()
    base = value(backend, crit, backend.asarray(a), backend.asarray(b))
    per_row = rng.standard_normal((16, 1))
    per_col = rng.standard_normal((1, 6))
    assert abs(value(backend, crit, backend.asarray(a + per_row), backend.asarray(b)) - base) > 1e-2
    assert abs(value(backend, crit, backend.asarray(a + per_col), backend.asarray(b)) - base) > 1e-2


def test_collapsed_scores_worse_than_balanced(backend):
    n, c = 64, 8
    collapsed = np.full((n, c), -3.0)
    collapsed[:, 0] = 3.0
    balanced = np.full((n, c), -3.0)
    balanced[np.arange(n), np.arange(n) % c] = 3.0
    pairs = {}
    for clamp in (True, False):
        crit = SelfClassifierLoss(clamp_sums=clamp)
        lc = value(backend, crit, backend.asarray(collapsed), backend.asarray(collapsed))
        lb = value(backend, crit, backend.asarray(balanced), backend.asarray(balanced))
        assert lc > lb + 1.0
        expected = [ref_loss([[collapsed] * 2], clamp=clamp), ref_loss([[balanced] * 2], clamp=clamp)]
        assert abs(expected[1]) < 1e-4  # the reference: ≈ 0 (float64)
        bounds = [loss_bound([[x] * 2], clamp_sums=clamp) for x in (collapsed, balanced)]
        np.testing.assert_allclose(lc, expected[0], rtol=0, atol=bounds[0])
        np.testing.assert_allclose(lb, expected[1], rtol=0, atol=bounds[1])
        pairs[clamp] = (lc, bounds[0])
    np.testing.assert_allclose(pairs[True][0], 24.378, atol=1e-3 + pairs[True][1])  # the reference's value, to 3 decimals
    np.testing.assert_allclose(pairs[False][0], math.log(8), atol=pairs[False][1])  # the dead classes' exact normalisation


def test_half_precision_computed_in_float32():
    torch = pytest.importorskip("torch")
    (vs,) = make_heads(6, 10, [5], 2, scale=3.0)
    halves = [torch.tensor(v, dtype=torch.float16) for v in vs]
    out = SelfClassifierLoss()(*halves)
    assert out.dtype == torch.float32
    held = [[h.double().numpy() for h in halves]]
    exact = ref_loss(held)
    np.testing.assert_allclose(float(out), exact, rtol=0, atol=loss_bound(held))  # float32 rounding of float16 values


# ---------------------------------------------------------------------------------------------
# global batch through `gather`
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [(6, 6), (3, 3, 6)], ids=["2 ranks", "3 uneven ranks"])
def test_fake_gather_reproduces_full_batch_loss(backend, split):
    n = sum(split)
    heads = make_heads(13, n, [7], 3)
    (vs,) = heads
    full = [backend.asarray(v) for v in vs]
    expected = value(backend, SelfClassifierLoss(), full)
    bounds = np.cumsum((0,) + split)
    total = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = slice(int(lo), int(hi))
        local = [x[rows, :] for x in full]
        crit = SelfClassifierLoss(gather=rank_gather(full, local, rows))
        total += (hi - lo) / n * value(backend, crit, local)  # equal ranks: plain mean over ranks
    # the ranks' losses, weighted by their rows' share, each within its rows' part of the bound
    np.testing.assert_allclose(total, expected, rtol=0, atol=loss_bound(heads, computations=2))
    # Without the gather each rank's loss is a different (local-batch) loss.
    local_only = sum(
        (hi - lo) / n * value(backend, SelfClassifierLoss(), [x[int(lo):int(hi), :] for x in full])
        for lo, hi in zip(bounds[:-1], bounds[1:])
    )
    assert abs(local_only - expected) > 1e-2


def test_fake_gather_gradients_torch():
    """Two simulated ranks: all-gather forward, all-reduce (sum) of the gradient in backward,
    then the usual data-parallel averaging over ranks, equals the full-batch gradient."""
    torch = pytest.importorskip("torch")
    world, n_local, c = 2, 5, 6
    (vs,) = make_heads(17, world * n_local, [c], 3)
    full = [torch.tensor(v, requires_grad=True) for v in vs]
    SelfClassifierLoss()(full).backward()
    expected = [x.grad for x in full]

    slices = [slice(r * n_local, (r + 1) * n_local) for r in range(world)]
    gathered = [[torch.tensor(v, requires_grad=True) for v in vs] for _ in range(world)]  # all_gather output
    losses, grads_on_gathered = [], []
    for r in range(world):
        local = [torch.tensor(v[slices[r]]) for v in vs]  # rank r's own logits
        crit = SelfClassifierLoss(gather=rank_gather(gathered[r], local, slices[r]))
        loss = crit(local)
        losses.append(float(loss.detach()))
        grads_on_gathered.append(torch.autograd.grad(loss, gathered[r]))
    ref_loss64, ref_grads = float64_loss_and_grads([vs])
    bound, grad_bound = (2 * b for b in rounding_bounds(vs, ref_loss64, ref_grads, np.float64))  # two float64 computations
    np.testing.assert_allclose(np.mean(losses), float(SelfClassifierLoss()(full).detach()), rtol=0, atol=bound)
    for v in range(3):
        reduced = sum(grads_on_gathered[r][v] for r in range(world))  # all-reduce (sum)
        for r in range(world):
            local_grad = reduced[slices[r]] / world  # this rank's slice, then DDP's mean over ranks
            torch.testing.assert_close(local_grad, expected[v][slices[r]], rtol=0, atol=grad_bound)
            # the trap: no all-reduce (a plain all_gather without gradient) gives something else
            naive = grads_on_gathered[r][v][slices[r]] / world
            assert not torch.allclose(naive, expected[v][slices[r]], atol=1e-6)


def test_fake_gather_gradients_jax():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    world, n_local = 2, 6
    (vs,) = make_heads(19, world * n_local, [5], 2)
    xs = [jnp.asarray(v, dtype=jnp.float32) for v in vs]

    l_ranks, g_ranks = jax.jit(jax.value_and_grad(lambda v: ranks_mean(SelfClassifierLoss, v, world, n_local)))(xs)
    l_full, g_full = jax.jit(jax.value_and_grad(lambda v: SelfClassifierLoss()(v)))(xs)
    assert_within_rounding(l_ranks, [np.asarray(g) for g in g_ranks], l_full, [np.asarray(g) for g in g_full], vs, np.float32)


def test_gather_contract_errors(numpy_backend):
    a, b = make_heads(1, 4, [3], 2)[0]
    full = np.vstack([a, a])
    with pytest.raises(TypeError, match="tuple"):
        SelfClassifierLoss(gather=lambda x: full)(a, b)
    with pytest.raises(TypeError, match="slice"):
        SelfClassifierLoss(gather=lambda x: (full, 0))(a, b)
    with pytest.raises(ValueError, match="expected 4"):
        SelfClassifierLoss(gather=lambda x: (full, slice(0, 3)))(a, b)
    with pytest.raises(ValueError, match="columns"):
        SelfClassifierLoss(gather=lambda x: (np.zeros((8, 5)), slice(0, 4)))(a, b)
    rows = iter([slice(0, 4), slice(4, 8)])
    with pytest.raises(ValueError, match="different rows"):
        SelfClassifierLoss(gather=lambda x: (full, next(rows)))(a, b)
    with pytest.raises(TypeError, match="callable"):
        SelfClassifierLoss(gather=3)
    with pytest.raises(ValueError, match="non-finite"):
        bad = full.copy()
        bad[6, 1] = np.nan  # another rank's row: every rank raises together
        SelfClassifierLoss(gather=lambda x: (bad, slice(0, 4)))(a, b)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_shapes_and_values(backend):
    crit = SelfClassifierLoss()
    a = backend.asarray(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"same shape.*logits\[1\] has \(5, 3\)"):
        crit(a, backend.asarray(np.zeros((5, 3))))
    with pytest.raises(ValueError, match="same shape"):
        crit(a, backend.asarray(np.zeros((4, 2))))
    with pytest.raises(ValueError, match=r"at least 2 rows.*N=1"):
        crit(backend.asarray(np.zeros((1, 3))), backend.asarray(np.zeros((1, 3))))
    with pytest.raises(ValueError, match=r"at least 2 columns.*C=1"):
        crit(backend.asarray(np.zeros((4, 1))), backend.asarray(np.zeros((4, 1))))
    with pytest.raises(ValueError, match="2-D"):
        crit(backend.asarray(np.zeros(4)), backend.asarray(np.zeros(4)))
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((4, 3))
        x[2, 1] = bad
        with pytest.raises(ValueError, match=r"logits\[1\].*non-finite"):
            crit(a, backend.asarray(x))
    with pytest.raises(ValueError, match="at least 2 views"):
        crit(a)
    with pytest.raises(ValueError, match="at least 2 views"):
        crit([a])
    with pytest.raises(ValueError, match="at least 2 views"):
        crit()
    with pytest.raises(ValueError, match="head 1"):
        crit([[a, a], [a]])
    with pytest.raises(ValueError, match="same number of views"):
        crit([[a, a], [a, a, a]])
    with pytest.raises(TypeError, match="mixes"):
        crit([a, [a, a]])
    with pytest.raises(TypeError, match="floating"):
        crit(backend.asarray(np.zeros((4, 3), dtype=np.int64)), backend.asarray(np.zeros((4, 3), dtype=np.int64)))
    with pytest.raises(TypeError, match=r"logits\[1\] must be an array"):
        crit([a, "not an array"])


def test_views_on_different_devices():
    torch = pytest.importorskip("torch")
    a = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"logits\[0\], logits\[1\] must be on one device, got logits\[0\] on cpu, logits\[1\] on meta"):
        SelfClassifierLoss()(a, torch.zeros(4, 3, device="meta"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(row_temperature=0.0), "row_temperature"),
        (dict(row_temperature=-0.1), "row_temperature"),
        (dict(col_temperature=0.0), "col_temperature"),
        (dict(col_temperature=float("nan")), "col_temperature"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-12), "eps"),
        (dict(eps=float("inf")), "eps"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfClassifierLoss(**kwargs)
    with pytest.raises(ValueError, match=match):
        self_classifier_loss([np.zeros((3, 2))] * 2, **kwargs)


def test_bad_parameter_types():
    with pytest.raises(TypeError, match="row_temperature"):
        SelfClassifierLoss(row_temperature="0.1")
    with pytest.raises(TypeError, match="eps"):
        SelfClassifierLoss(eps=True)


def test_mixed_namespaces():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"logits\[0\] from .*numpy.*logits\[1\] from .*torch"):
        SelfClassifierLoss()(np.zeros((4, 3)), torch.zeros(4, 3))


def test_repr():
    assert "row_temperature=0.1" in repr(SelfClassifierLoss())


def test_one_class_design_and_positional_gather_deprecated():
    """The adapters' losses are the core class (same parameters and repr, plus ``kernel``);
    ``gather`` is keyword-only, its old fourth positional place warns for one release."""
    gather = rank_gather([np.zeros((4, 3))], [np.zeros((4, 3))], slice(None))
    with pytest.warns(DeprecationWarning, match="gather"):
        old = SelfClassifierLoss(0.1, 0.05, 1e-12, gather)
    assert old.gather is gather
    assert repr(old) == repr(SelfClassifierLoss(gather=gather)) == (
        "SelfClassifierLoss(row_temperature=0.1, col_temperature=0.05, eps=1e-12, gather=gather, "
        "check_finite=True, clamp_sums=True)"
    )
    with pytest.raises(TypeError, match="gather"):
        SelfClassifierLoss(0.1, 0.05, 1e-12, gather, gather=gather)
    for module in ("torch", "jax"):
        pytest.importorskip(module)
        adapter = __import__(f"clusterlearn.adapters.{module}", fromlist=["SelfClassifierLoss"]).SelfClassifierLoss
        crit = adapter(gather=None, kernel="array")
        assert isinstance(crit, SelfClassifierLoss)
        assert repr(crit) == repr(SelfClassifierLoss())[:-1] + ", kernel='array')"
