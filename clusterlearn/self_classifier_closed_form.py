"""The Self-Classifier loss of one head with its gradient in closed form (array API, ``jax.jit``-able).

The core's loss (:func:`clusterlearn.self_classifier.self_classifier_loss`) records every
operation for the framework's autograd, about 100 full-size passes. The functions here compute
the same value and write the gradient out: :func:`forward` / :func:`backward` on the stacked
``(K, N, C)`` views (linear or log space, as the :class:`~clusterlearn.self_classifier_guards.GuardPlan`
says), and :func:`streamed_forward` / :func:`streamed_backward` (linear space only), which keep
``(N,)``- and ``(C,)``-sized statistics between passes and recompute every full-size quantity
inside the reduction that consumes it. All shapes are static and nothing reads array values,
so they trace under ``jax.jit``. The adapters wrap them in a ``torch.autograd.Function`` and a
``jax.custom_vjp``; the fused C++ kernel (``adapters/_self_classifier_kernel.cpp``) streams the
same formulas below row by row.

Gradient
--------
For one head with views ``x_v`` (``N × C``), ``P`` ordered pairs ``(i, j)`` (target view ``i``,
prediction view ``j``) and ``n`` loss rows ``R`` (this process's rows of the global batch)::

    L = −1/(P n) Σ_v Σ_{n∈R} Σ_y T_v[n, y] · A_v[n, y],    A_v = Σ_{j:(v,j)} LP_j,  B_v = Σ_{i:(i,v)} T_i

Targets, ``z = x/τ_col``: ``p = softmax_dim0(z)``, ``S_n = Σ_y p[n, y]``, ``T = p / max(S, eps)``
(rows ``R``), ``a_n = [S_n > eps]`` (1 without the clamp). With ``G_T = ∂L/∂T``::

    U = T ⊙ (G_T − a ⊙ Σ_y G_T T)           ∂L/∂z = U − p ⊙ Σ_n U

Predictions, ``ζ = x/τ_row``: ``q = softmax_dim1(ζ)``, ``Q_y = max(Σ_n q[n, y], eps)``,
``w = (N/C) q / Q``, ``LP = log(w + eps)``, ``π = w / (w + eps)``, ``b_y = [Σ_n q > eps]``.
With ``G = ∂L/∂LP``::

    V = π ⊙ G − (q / Q) ⊙ b ⊙ Σ_n π G        ∂L/∂ζ = V − q ⊙ Σ_y V

``G_T = −A/(P n)`` and ``G = −B/(P n)``; the sum ``Σ_y A T`` of the target term is also the
loss, so the forward computes it once for both. Every factor is bounded (``T, p, q, π, q/Q ∈
[0, 1]``, ``|LP| <= max(−log eps, log(N/C + eps))``), so the gradient is finite for logits of
any finite magnitude. In log space (``clamp_sums=False`` or an ``eps`` the dtype cannot
resolve) ``T``, ``q / Q`` and ``π = exp(log w − LP)`` are formed from log-softmaxes; the
gradient is the same. Double backward is not provided.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat as aac

from .self_classifier_guards import (
    GuardPlan,
    device_of,
    floored_exp,
    full_like,
    log_plus_eps,
    log_softmax,
    logsumexp,
    scaled,
    shift,
)

Array = Any

__all__ = [
    "Statistics", "backward", "forward", "partners", "predictions", "streamed_backward", "streamed_forward", "targets",
]


def partners(plan: GuardPlan, k: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prediction views paired with each target view, and target views paired with each
    prediction view, for ``k`` views."""
    to_pred = [[j for i, j in plan.pairs if i == v] for v in range(k)]
    to_target = [[i for i, j in plan.pairs if j == v] for v in range(k)]
    return to_pred, to_target


def _combine(x: Sequence[Array] | Array, sources: Sequence[Sequence[int]]) -> list[Array]:
    """``out[i] = Σ_{j ∈ sources[i]} x[j]`` (``x`` a list of views or stacked views; zeros if
    ``sources[i]`` is empty: a view in no pair on that side)."""
    views = [x[j, ...] for j in range(x.shape[0])] if hasattr(x, "ndim") else x
    return [
        functools.reduce(operator.add, [views[j] for j in js]) if js else aac.array_namespace(views[0]).zeros_like(views[0])
        for js in sources
    ]


def _pad_rows(x: Array, plan: GuardPlan, axis: int, xp: ModuleType) -> Array:
    """``x`` (the loss rows along ``axis``) with zero rows inserted: all ``plan.n`` rows."""
    if plan.whole:
        return x
    start, stop, step = plan.rows
    shape = list(x.shape)
    shape[axis] = plan.n if step != 1 else start
    zeros = xp.zeros(tuple(shape), dtype=x.dtype, device=device_of(x))
    if step == 1:
        shape[axis] = plan.n - stop
        return xp.concat([zeros, x, xp.zeros(tuple(shape), dtype=x.dtype, device=device_of(x))], axis=axis)
    # strided rows: row r of the result is x's row (r − start) / step if selected, else a zero row
    index = [plan.n + (r - start) // step if r in range(*plan.rows) else r for r in range(plan.n)]
    return xp.take(xp.concat([zeros, x], axis=axis), xp.asarray(index, device=device_of(x)), axis=axis)


def _divide(a: Array, b: Array, inplace: bool) -> Array:
    """``a / b``, written into ``a`` (an intermediate of the caller's) when ``inplace``."""
    if not inplace:
        return a / b
    a /= b
    return a


def _softmax(x: Array, axis: int, temperature: float, floor: float, xp: ModuleType, inplace: bool) -> Array:
    """Softmax of ``x / temperature`` along ``axis`` with ``exp`` floored at ``floor``.

    ``x − max`` is floored at ``τ · log floor`` before the division, which both floors the
    ``exp`` and keeps ``(x − max) / τ`` from overflowing (see
    :func:`~clusterlearn.self_classifier_guards.scaled`).
    """
    d = x - shift(x, axis, xp)
    e = xp.exp(_divide(xp.maximum(d, full_like(d, temperature * math.log(floor), xp)), temperature, inplace))
    return _divide(e, xp.sum(e, axis=axis, keepdims=True), inplace)


def targets(plan: GuardPlan, x: Array, *, inplace: bool = False) -> tuple[Array, Array, Array]:
    """Targets of stacked views ``x`` (K, N, C): ``T`` (K, n, C) on the loss rows, the column
    softmax ``p`` (K, N, C) and the clamp's active rows ``a`` (K, n, 1) (or a 0-d one).
    ``inplace``: as :func:`forward`."""
    xp = aac.array_namespace(x)
    rows, floor = plan.loss_rows, plan.sum_floor
    if plan.linear_targets:
        p = _softmax(x, 1, plan.col_temperature, plan.floor_targets, xp, inplace)
        row_sum = xp.sum(p[:, rows, :], axis=2, keepdims=True)
        target = p[:, rows, :] / xp.maximum(row_sum, full_like(row_sum, floor, xp))
        return target, p, xp.astype(row_sum > floor, x.dtype)
    log_p = log_softmax(scaled(x, 1, plan.col_temperature, xp), 1, xp)
    log_p_rows = log_p[:, rows, :]
    m = shift(log_p_rows, 2, xp)  # p / Σ p = e / Σ e with e = exp(log p − m): no row underflows
    e = floored_exp(log_p_rows - m, plan.floor_targets, xp)
    total = xp.sum(e, axis=2, keepdims=True)
    target, active = e / total, full_like(x, 1.0, xp)
    if floor is not None:  # p / max(S, floor) = e / Σ e · exp(min(log S − log floor, 0))
        excess = m + xp.log(total) - math.log(floor)
        target = target * xp.exp(xp.minimum(excess, full_like(excess, 0.0, xp)))
        active = xp.astype(excess > 0, x.dtype)
    return target, xp.exp(log_p), active


def predictions(plan: GuardPlan, x: Array, *, inplace: bool = False) -> tuple[Array, ...]:
    """Predictions of stacked views ``x`` (K, N, C): ``LP = log((N/C)·q/Q + eps)`` (K, n, C) on
    the loss rows, ``π = w / (w + eps)`` (K, n, C), the row softmax ``q`` (K, N, C) and
    ``q / Q = ρ · ρ_scale`` (``[Σ_n q > floor]`` folded into ``ρ_scale``). ``inplace``: as
    :func:`forward`."""
    xp = aac.array_namespace(x)
    rows, eps, floor = plan.loss_rows, plan.eps, plan.sum_floor
    ratio = plan.n / plan.c
    if plan.linear_predictions:
        q = _softmax(x, 2, plan.row_temperature, plan.floor_predictions, xp, inplace)
        col_sum = xp.sum(q, axis=1, keepdims=True)
        inv_norm = 1.0 / xp.maximum(col_sum, full_like(col_sum, floor, xp))
        w = q[:, rows, :] * (inv_norm * ratio)
        w_eps = w + eps
        return xp.log(w_eps), _divide(w, w_eps, inplace), q, q, inv_norm * xp.astype(col_sum > floor, x.dtype)
    log_q = log_softmax(scaled(x, 2, plan.row_temperature, xp), 2, xp)
    log_norm = logsumexp(log_q, 1, xp)
    rho_scale = full_like(x, 1.0, xp)
    if floor is not None:
        rho_scale = xp.astype(log_norm > math.log(floor), x.dtype)
        log_norm = xp.maximum(log_norm, full_like(log_norm, math.log(floor), xp))
    log_w = log_q[:, rows, :] - log_norm + math.log(ratio)
    log_pred = log_plus_eps(log_w, math.log(ratio), eps, xp)  # log w <= log(N/C)
    return log_pred, xp.exp(log_w - log_pred), xp.exp(log_q), xp.exp(log_q - log_norm), rho_scale


def forward(plan: GuardPlan, x: Array, *, inplace: bool = False) -> tuple[Array, tuple[Array, ...]]:
    """Loss of one head from its stacked views, and the residuals :func:`backward` needs.

    Differentiable as it stands (the core's loss records it for the framework's autograd).
    With ``inplace=True`` some intermediates are updated in place (array-API in-place
    operators), which saves allocations on NumPy and PyTorch but breaks an autograd recording
    of the forward: for callers that supply the gradient themselves (the adapters'
    ``torch.autograd.Function``). The values are the same.

    Parameters
    ----------
    plan : GuardPlan
        The head's parameters and guards (its ``n``, ``c`` those of ``x``).
    x : array of shape (K, N, C), float32 or float64
        The ``K`` views, finite.

    Returns
    -------
    loss : 0-d array
        Mean over ``plan.pairs`` of the pair terms, each averaged over ``plan.rows``.
    residuals : tuple of arrays
        Six arrays of up to ``K·N·C`` values and three small ones.
    """
    xp = aac.array_namespace(x)
    target, p, active_t = targets(plan, x, inplace=inplace)
    log_pred, pi, q, rho, rho_scale = predictions(plan, x, inplace=inplace)
    acc = xp.stack(_combine(log_pred, partners(plan, x.shape[0])[0]))  # A_v = Σ_j LP_j
    dots = xp.sum(target * acc, axis=2, keepdims=True)  # Σ_y T_v A_v: the loss, and the backward's r
    loss = -xp.sum(dots) / (len(plan.pairs) * plan.num_loss_rows)
    return loss, (p, target, active_t, q, rho, rho_scale, pi, acc, dots)


def backward(plan: GuardPlan, residuals: tuple[Array, ...], grad: Array) -> Array:
    """``grad · ∂loss/∂x`` of shape (K, N, C) from the residuals of :func:`forward`.

    Never recorded by an autograd, so it updates its own intermediates in place (array-API
    in-place operators: in place on NumPy and PyTorch, a rebinding on JAX); the residuals are
    left as they are (a second backward through a retained graph reads them again).
    """
    p, target, active_t, q, rho, rho_scale, pi, acc, dots = residuals
    xp = aac.array_namespace(p)
    _, to_target = partners(plan, p.shape[0])
    # ∂L/∂x = −1/(P n) · [(U − p Σ_n U)/τ_col + (V − q Σ_y V)/τ_row], with G_T = −A/(P n) and
    # G = −B/(P n) factored out: U = T ⊙ (A − a·Σ_y A T), V = π ⊙ B − (q/Q) ⊙ b·Σ_n π B.
    u = acc - dots * active_t
    u *= target
    d_col = _pad_rows(u, plan, 1, xp)
    d_col -= p * xp.sum(d_col, axis=1, keepdims=True)
    v = xp.stack(_combine(target, to_target))  # B_v = Σ_i T_i, a new array
    v *= pi
    d_row = _pad_rows(v, plan, 1, xp)
    d_row -= rho * (xp.sum(d_row, axis=1, keepdims=True) * rho_scale)
    d_row -= q * xp.sum(d_row, axis=2, keepdims=True)
    scale = -grad / (len(plan.pairs) * plan.num_loss_rows)
    d_col *= scale / plan.col_temperature
    d_row *= scale / plan.row_temperature
    d_col += d_row
    return d_col


# --------------------------------------------------------------------------------------------
# Streamed form (linear space): blockwise statistics, full-size quantities recomputed per pass
# --------------------------------------------------------------------------------------------

Fresh = Callable[[tuple[Array, ...]], tuple[Array, ...]]


class Statistics(NamedTuple):
    """Per-view statistics of the streamed form (lists over views)."""

    row_max: list[Array]  #: (N, 1)
    col_max: list[Array]  #: (1, C)
    inv_row: list[Array]  #: (N, 1) 1 / Σ_y exp of the row softmax
    inv_col: list[Array]  #: (1, C) 1 / Σ_n exp of the column softmax
    w_scale: list[Array]  #: (1, C) (N/C) / max(Q, eps), Q = Σ_n q
    rho_scale: list[Array]  #: (1, C) [Q > eps] / max(Q, eps)
    inv_s: list[Array]  #: (n, 1) 1 / max(S, eps) on the loss rows, S = Σ_y p
    active: list[Array]  #: (n, 1) [S > eps] on the loss rows


_ALL = slice(None)


def _row_softmax(plan: GuardPlan, x: Array, st: Statistics, v: int, rows: slice, xp: ModuleType) -> Array:
    """``q`` of view ``v`` on ``rows``."""
    z = (x[rows, :] - st.row_max[v][rows, :]) / plan.row_temperature
    return floored_exp(z, plan.floor_predictions, xp) * st.inv_row[v][rows, :]


def _col_softmax(plan: GuardPlan, x: Array, st: Statistics, v: int, rows: slice, xp: ModuleType) -> Array:
    """``p`` of view ``v`` on ``rows``."""
    z = (x[rows, :] - st.col_max[v]) / plan.col_temperature
    return floored_exp(z, plan.floor_targets, xp) * st.inv_col[v]


def _statistics(plan: GuardPlan, views: tuple[Array, ...], fresh: Fresh, xp: ModuleType) -> Statistics:
    """Maxima, softmax normalisers, ``Q`` and ``S`` of every view (three passes)."""
    rows, n, eps = plan.loss_rows, plan.n, plan.eps
    row_max = [xp.max(x, axis=1, keepdims=True) for x in views]
    col_max = [xp.max(x, axis=0, keepdims=True) for x in views]
    inv_row, inv_col = [], []
    for v, x in enumerate(fresh(views)):
        e_row = floored_exp((x - row_max[v]) / plan.row_temperature, plan.floor_predictions, xp)
        e_col = floored_exp((x - col_max[v]) / plan.col_temperature, plan.floor_targets, xp)
        inv_row.append(1.0 / xp.sum(e_row, axis=1, keepdims=True))
        inv_col.append(1.0 / xp.sum(e_col, axis=0, keepdims=True))
    st = Statistics(row_max, col_max, inv_row, inv_col, [], [], [], [])  # the softmaxes' part
    xs = fresh(views)
    col_sums = [xp.sum(_row_softmax(plan, x, st, v, _ALL, xp), axis=0, keepdims=True) for v, x in enumerate(xs)]
    row_sums = [xp.sum(_col_softmax(plan, x, st, v, rows, xp), axis=1, keepdims=True) for v, x in enumerate(xs)]
    floor = full_like(views[0], eps, xp)
    return st._replace(
        w_scale=[(n / plan.c) / xp.maximum(q, floor) for q in col_sums],
        rho_scale=[xp.astype(q > eps, q.dtype) / xp.maximum(q, floor) for q in col_sums],
        inv_s=[1.0 / xp.maximum(s, floor) for s in row_sums],
        active=[xp.astype(s > eps, s.dtype) for s in row_sums],
    )


def _loss_terms(plan: GuardPlan, views: tuple[Array, ...], st: Statistics, xp: ModuleType) -> tuple[list, list, list]:
    """Targets ``T``, log-predictions ``LP`` and ``π`` of every view on the loss rows."""
    rows = plan.loss_rows
    targets, log_pred, pi = [], [], []
    for v, x in enumerate(views):
        targets.append(_col_softmax(plan, x, st, v, rows, xp) * st.inv_s[v])
        w = _row_softmax(plan, x, st, v, rows, xp) * st.w_scale[v]
        log_pred.append(xp.log(w + plan.eps))
        pi.append(w / (w + plan.eps))
    return targets, log_pred, pi


def _u_terms(t: list, lp: list, st: Statistics, dots: list, to_pred: list[list[int]]) -> list[Array]:
    """``U_v = T_v ⊙ (A_v − a_v · Σ_y A_v T_v)`` on the loss rows, ``A_v = Σ_j LP_j``."""
    return [t[v] * (a - st.active[v] * dots[v]) for v, a in enumerate(_combine(lp, to_pred))]


def _identity(views: tuple[Array, ...]) -> tuple[Array, ...]:
    return views


def streamed_forward(
    plan: GuardPlan, views: tuple[Array, ...], fresh: Fresh = _identity
) -> tuple[Array, tuple]:
    """Loss of one head from its views (each ``(N, C)``; ``plan.linear`` must hold), and the
    small residuals of :func:`streamed_backward`.

    ``fresh(views)`` starts each pass over the views: identity by default; under ``jax.jit``
    ``jax.lax.optimization_barrier``, so that XLA does not merge the recomputations of different
    passes into one materialised ``(N, C)`` array.
    """
    xp = aac.array_namespace(*views)
    k = len(views)
    to_pred, to_target = partners(plan, k)
    st = _statistics(plan, views, fresh, xp)
    t, lp, _ = _loss_terms(plan, fresh(views), st, xp)
    dots = [xp.sum(t[v] * a, axis=1, keepdims=True) for v, a in enumerate(_combine(lp, to_pred))]
    # Column sums of the backward (Σ_n U and Σ_n π B), computed here once.
    t, lp, pi = _loss_terms(plan, fresh(views), st, xp)
    col_u = [xp.sum(u, axis=0, keepdims=True) for u in _u_terms(t, lp, st, dots, to_pred)]
    col_v = [xp.sum(pi[v] * b, axis=0, keepdims=True) * st.rho_scale[v] for v, b in enumerate(_combine(t, to_target))]
    loss = -functools.reduce(operator.add, [xp.sum(d) for d in dots]) / (len(plan.pairs) * plan.num_loss_rows)
    return loss, (views, st, dots, col_u, col_v)


def streamed_backward(plan: GuardPlan, residuals: tuple, grad: Array, fresh: Fresh = _identity) -> tuple[Array, ...]:
    """``grad · ∂loss/∂x_v`` for every view, from the residuals of :func:`streamed_forward`."""
    views, st, dots, col_u, col_v = residuals
    xp = aac.array_namespace(*views)
    k = len(views)
    to_pred, to_target = partners(plan, k)
    scale = -grad / (len(plan.pairs) * plan.num_loss_rows * plan.col_temperature)
    ratio = plan.col_temperature / plan.row_temperature

    def local(xs: tuple[Array, ...]) -> list[Array]:
        """``U + (τ_col/τ_row) π B`` of every view on the loss rows, and ``π B``."""
        t, lp, pi = _loss_terms(plan, xs, st, xp)
        pib = [pi[v] * b for v, b in enumerate(_combine(t, to_target))]
        return [u + ratio * w for u, w in zip(_u_terms(t, lp, st, dots, to_pred), pib)], pib

    # Row sums of V = π B (loss rows) − q (b/Q) Σ_n π B.
    xs = fresh(views)
    row_v = [-xp.sum(_row_softmax(plan, xs[v], st, v, _ALL, xp) * col_v[v], axis=1, keepdims=True) for v in range(k)]
    _, pib = local(fresh(views))
    row_v = [r + _pad_rows(xp.sum(b, axis=1, keepdims=True), plan, 0, xp) for r, b in zip(row_v, pib)]
    xs = fresh(views)
    loc, _ = local(xs if plan.whole else fresh(views))
    grads = []
    for v in range(k):
        q = _row_softmax(plan, xs[v], st, v, _ALL, xp)
        g = -_col_softmax(plan, xs[v], st, v, _ALL, xp) * col_u[v] - ratio * q * (col_v[v] + row_v[v])
        grads.append(scale * (g + _pad_rows(loc[v], plan, 0, xp)))
    return tuple(grads)
