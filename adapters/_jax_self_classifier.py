"""Self-Classifier loss for JAX with a closed-form backward (``jax.custom_vjp``), ``jit``-able.

Same value as :func:`clusterlearn.self_classifier.self_classifier_loss` (same formula, clamps,
``eps``, pairs of views, mean over heads, and the same choice between linear-space and
log-space arithmetic); the gradient is the closed form derived in
:mod:`clusterlearn.adapters._torch_self_classifier` instead of the transpose of every recorded
operation. Where both linear-space guards hold (float32 and float64 with the default ``eps``)
the loss is *streamed*: a few passes over the views compute (N,)- and (C,)-sized statistics,
recomputing every full-size quantity inside the reduction that consumes it, and only the
gradients are materialised (1.1–2.1× faster than the stacked form, see
``benchmarks/self_classifier.py``). Otherwise the ``K`` views are stacked to ``(K, N, C)`` and
processed at once. On the CPU backend, by default (``kernel="auto"``), the linear-space case
runs the fused C++ kernel of :mod:`._native` instead, through XLA FFI custom calls inside the
same ``custom_vjp`` contract (1.4–2.4× cross-entropy against 4.2–7× for the streamed form).

Global batch: :class:`SelfClassifierLoss` and :func:`self_classifier_loss` accept the core's
``gather(local) -> (global_logits, rows)`` contract with a *static* Python ``slice`` (the
gather's own differentiation must sum the gradient over processes). Under ``jit`` with
sharded global arrays (the usual multi-device JAX setup) no gather is needed: pass the global
logits, the loss is the global-batch loss. Inside ``shard_map``/``pmap``, where this
process's row offset is traced, gather with ``jax.lax.all_gather(..., tiled=True)`` yourself
and call the loss on the gathered logits with the mean over all rows (every device then
computes the same global loss).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from clusterlearn.self_classifier import SelfClassifierLoss as _CoreSelfClassifierLoss
from clusterlearn.self_classifier import (
    Gather,
    _as_float,
    _check_head,
    _check_positive,
    _parse,
    _prepare,
    _scaled,
    view_pairs,
)

from . import _native

__all__ = ["SelfClassifierLoss", "self_classifier_loss", "self_classifier_head_loss"]



class _Config(NamedTuple):
    """Static (hashable) parameters of one head's loss."""

    row_temperature: float
    col_temperature: float
    eps: float
    clamp_sums: bool
    rows: tuple[int, int] | None  # [start, stop) of the loss rows in the global batch; None: all
    pairs: tuple[tuple[int, int], ...]  # (target view, prediction view)


def _tiny(dtype: Any) -> float:
    """8 × the smallest normal number of ``dtype`` (the core's ``exp`` floor)."""
    return 8.0 * float(jnp.finfo(dtype).smallest_normal)


def _linear_targets(dtype: Any, n_classes: int, cfg: _Config) -> bool:
    """The core's condition for clamped targets ``p / max(Σ p, eps)`` in linear space."""
    return cfg.clamp_sums and n_classes * _tiny(dtype) / cfg.eps <= float(jnp.finfo(dtype).eps) / 1024


def _linear_predictions(dtype: Any, n: int, n_classes: int, cfg: _Config) -> bool:
    """The core's condition for clamped ``log((N/C)·q/max(Σq, eps) + eps)`` in linear space."""
    tiny, resolution = _tiny(dtype), float(jnp.finfo(dtype).eps) / 16
    return (
        cfg.clamp_sums
        and (n / n_classes) * tiny / cfg.eps / cfg.eps <= resolution
        and n * tiny / cfg.eps <= resolution
    )


def _floored_exp(x: jax.Array, shift: jax.Array, temperature: float) -> jax.Array:
    """``exp((x − shift) / temperature)`` floored at ``_tiny`` (as the core)."""
    return jnp.exp(jnp.maximum((x - shift) / temperature, math.log(_tiny(x.dtype))))


def _softmax(x: jax.Array, axis: int, temperature: float) -> jax.Array:
    """Softmax of ``x / temperature`` along ``axis`` with ``exp`` floored at ``_tiny`` (as the core)."""
    e = _floored_exp(x, jnp.max(x, axis=axis, keepdims=True), temperature)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _partners(cfg: _Config, k: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prediction views paired with each target view, and target views paired with each prediction view."""
    to_pred = [[j for i, j in cfg.pairs if i == v] for v in range(k)]
    to_target = [[i for i, j in cfg.pairs if j == v] for v in range(k)]
    return to_pred, to_target


def _combine(x: jax.Array, sources: Sequence[Sequence[int]]) -> jax.Array:
    """``out[i] = Σ_{j ∈ sources[i]} x[j]`` for ``x`` of shape ``(K, ...)``."""
    return jnp.stack([sum(x[j] for j in js[1:]) + x[js[0]] if len(js) > 1 else x[js[0]] for js in sources])


def _forward(cfg: _Config, x: jax.Array) -> tuple[jax.Array, tuple]:
    """Loss of one head from stacked logits ``x`` (K, N, C), and the backward's residuals."""
    k, n_global, n_classes = x.shape
    lo, hi = cfg.rows if cfg.rows is not None else (0, n_global)
    log_eps = math.log(cfg.eps)
    to_pred, _ = _partners(cfg, k)

    # Targets T (loss rows), the column softmax p (all rows) and the active rows of the clamp.
    if _linear_targets(x.dtype, n_classes, cfg):
        p = _softmax(x, 1, cfg.col_temperature)
        row_sum = jnp.sum(p[:, lo:hi], axis=2, keepdims=True)
        target = p[:, lo:hi] / jnp.maximum(row_sum, cfg.eps)
        active_t = row_sum > cfg.eps
    else:
        log_p = jax.nn.log_softmax(_scaled(x, 1, cfg.col_temperature, jnp), axis=1)
        target = jax.nn.softmax(log_p[:, lo:hi], axis=2)
        active_t = jnp.ones((), dtype=bool)
        if cfg.clamp_sums:  # p / max(S, eps) = softmax · exp(min(log S − log eps, 0))
            excess = jax.nn.logsumexp(log_p[:, lo:hi], axis=2, keepdims=True) - log_eps
            target = target * jnp.exp(jnp.minimum(excess, 0.0))
            active_t = excess > 0
        p = jnp.exp(log_p)

    # Predictions LP (loss rows), π = w / (w + eps), the row softmax q and q / Q (all rows).
    ratio = n_global / n_classes
    if _linear_predictions(x.dtype, n_global, n_classes, cfg):
        q = _softmax(x, 2, cfg.row_temperature)
        col_sum = jnp.sum(q, axis=1, keepdims=True)
        inv_norm = 1.0 / jnp.maximum(col_sum, cfg.eps)
        w = q[:, lo:hi] * (inv_norm * ratio)
        log_pred = jnp.log(w + cfg.eps)
        pi = w / (w + cfg.eps)
        rho = q * jnp.where(col_sum > cfg.eps, inv_norm, 0.0)  # q / Q where the clamp is inactive
    else:
        log_q = jax.nn.log_softmax(_scaled(x, 2, cfg.row_temperature, jnp), axis=2)
        log_norm = jax.nn.logsumexp(log_q, axis=1, keepdims=True)
        active_p = jnp.ones((), dtype=bool)
        if cfg.clamp_sums:
            active_p = log_norm > log_eps
            log_norm = jnp.maximum(log_norm, log_eps)
        rho = jnp.where(active_p, jnp.exp(log_q - log_norm), 0.0)
        log_w = log_q[:, lo:hi] - log_norm + math.log(ratio)
        log_pred = jnp.logaddexp(log_w, log_eps)
        pi = jnp.exp(log_w - log_pred)
        q = jnp.exp(log_q)
    acc = _combine(log_pred, to_pred)  # A_v = Σ_j LP_j
    dots = jnp.sum(target * acc, axis=2, keepdims=True)
    loss = -jnp.sum(dots) / (len(cfg.pairs) * (hi - lo))
    return loss, (p, target, active_t, q, rho, pi, acc, dots)


def _backward(cfg: _Config, res: tuple, grad: jax.Array) -> tuple[jax.Array]:
    """``grad · ∂loss/∂x`` (K, N, C) from the residuals of :func:`_forward`."""
    p, target, active_t, q, rho, pi, acc, dots = res
    k, n_global, _ = p.shape
    lo, hi = cfg.rows if cfg.rows is not None else (0, n_global)
    _, to_target = _partners(cfg, k)
    # grad_x = −g/(P n) · [(U − p Σ_n U)/τ_col + (V − q Σ_y V)/τ_row] with
    # U = T ⊙ (A − a·Σ_y A T) and V = π ⊙ B − (q/Q) ⊙ b·Σ_n π B (see the torch module).
    u = target * (acc - jnp.where(active_t, dots, 0.0))
    v_loc = pi * _combine(target, to_target)
    if cfg.rows is not None:
        pad = ((0, 0), (lo, n_global - hi), (0, 0))
        u, v_loc = jnp.pad(u, pad), jnp.pad(v_loc, pad)
    d_col = u - p * jnp.sum(u, axis=1, keepdims=True)
    v = v_loc - rho * jnp.sum(v_loc, axis=1, keepdims=True)
    d_row = v - q * jnp.sum(v, axis=2, keepdims=True)
    scale = -grad / (len(cfg.pairs) * (hi - lo))
    return (scale * (d_col / cfg.col_temperature + d_row / cfg.row_temperature),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head(cfg: _Config, x: jax.Array) -> jax.Array:
    """Loss of one head from stacked logits (K, N, C); ``cfg`` is static (not differentiated)."""
    return _forward(cfg, x)[0]


_head.defvjp(_forward, _backward)


# --- Linear-space path, streamed -------------------------------------------------------------
# Where both of the core's linear-space guards hold (float32/float64 with the default eps), the
# loss and its gradient are computed from the logits and a few (N,)/(C,) statistics, every
# full-size quantity (``exp``, ``log``, products) being recomputed inside the reduction that
# consumes it. Each pass starts from ``lax.optimization_barrier`` copies of the logits so that
# XLA cannot merge the recomputations of different passes into one materialised (N, C) array;
# only the gradients are materialised. Same formulas and floors as :func:`_forward`.


def _fresh(views: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """The views behind an optimisation barrier: a pass of their own for XLA (no CSE across)."""
    return jax.lax.optimization_barrier(views)


class _Stats(NamedTuple):
    """Per-view statistics (lists over views) of the streamed path."""

    row_max: list[jax.Array]  # (N, 1)
    col_max: list[jax.Array]  # (1, C)
    inv_row: list[jax.Array]  # (N, 1) 1 / Σ_y exp of the row softmax
    inv_col: list[jax.Array]  # (1, C) 1 / Σ_n exp of the column softmax
    w_scale: list[jax.Array]  # (1, C) (N/C) / max(Q, eps), Q = Σ_n q
    rho_scale: list[jax.Array]  # (1, C) [Q > eps] / max(Q, eps)
    inv_s: list[jax.Array]  # (n, 1) 1 / max(S, eps) on the loss rows, S = Σ_y p
    active: list[jax.Array]  # (n, 1) [S > eps] on the loss rows


def _row_softmax(cfg: _Config, x: jax.Array, st: _Stats, v: int, lo: int, hi: int) -> jax.Array:
    """``q`` of view ``v`` on rows ``[lo, hi)``."""
    return _floored_exp(x[lo:hi], st.row_max[v][lo:hi], cfg.row_temperature) * st.inv_row[v][lo:hi]


def _col_softmax(cfg: _Config, x: jax.Array, st: _Stats, v: int, lo: int, hi: int) -> jax.Array:
    """``p`` of view ``v`` on rows ``[lo, hi)``."""
    return _floored_exp(x[lo:hi], st.col_max[v], cfg.col_temperature) * st.inv_col[v]


def _statistics(cfg: _Config, views: tuple[jax.Array, ...], lo: int, hi: int) -> _Stats:
    """Maxima, softmax normalisers, ``Q`` and ``S`` of every view (three passes)."""
    n, c = views[0].shape
    row_max = [jnp.max(x, axis=1, keepdims=True) for x in views]
    col_max = [jnp.max(x, axis=0, keepdims=True) for x in views]
    inv_row, inv_col = [], []
    for v, x in enumerate(_fresh(views)):
        inv_row.append(1.0 / jnp.sum(_floored_exp(x, row_max[v], cfg.row_temperature), axis=1, keepdims=True))
        inv_col.append(1.0 / jnp.sum(_floored_exp(x, col_max[v], cfg.col_temperature), axis=0, keepdims=True))
    st = _Stats(row_max, col_max, inv_row, inv_col, [], [], [], [])  # the softmaxes' part
    xs = _fresh(views)
    col_sums = [jnp.sum(_row_softmax(cfg, x, st, v, 0, n), axis=0, keepdims=True) for v, x in enumerate(xs)]
    row_sums = [jnp.sum(_col_softmax(cfg, x, st, v, lo, hi), axis=1, keepdims=True) for v, x in enumerate(xs)]
    return st._replace(
        w_scale=[(n / c) / jnp.maximum(q, cfg.eps) for q in col_sums],
        rho_scale=[jnp.where(q > cfg.eps, 1.0 / jnp.maximum(q, cfg.eps), 0.0) for q in col_sums],
        inv_s=[1.0 / jnp.maximum(s, cfg.eps) for s in row_sums],
        active=[s > cfg.eps for s in row_sums],
    )


def _loss_terms(cfg: _Config, views: tuple[jax.Array, ...], st: _Stats, lo: int, hi: int) -> tuple[list, list, list]:
    """Targets ``T``, log-predictions ``LP`` and ``π = w / (w + eps)`` of every view on the loss rows."""
    targets, log_pred, pi = [], [], []
    for v, x in enumerate(views):
        targets.append(_col_softmax(cfg, x, st, v, lo, hi) * st.inv_s[v])
        w = _row_softmax(cfg, x, st, v, lo, hi) * st.w_scale[v]
        log_pred.append(jnp.log(w + cfg.eps))
        pi.append(w / (w + cfg.eps))
    return targets, log_pred, pi


def _u_terms(t: list, lp: list, st: _Stats, dots: list, to_pred: list[list[int]]) -> list[jax.Array]:
    """``U_v = T_v ⊙ (A_v − a_v · Σ_y A_v T_v)`` on the loss rows, ``A_v = Σ_j LP_j`` (see :func:`_backward`)."""
    return [t[v] * (sum(lp[j] for j in js) - jnp.where(st.active[v], dots[v], 0.0)) for v, js in enumerate(to_pred)]


def _streamed_forward(cfg: _Config, views: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple]:
    """Loss of one head from its views (each (N, C)), and the backward's residuals (small)."""
    k, (n, _) = len(views), views[0].shape
    lo, hi = cfg.rows if cfg.rows is not None else (0, n)
    to_pred, to_target = _partners(cfg, k)
    st = _statistics(cfg, views, lo, hi)
    t, lp, _ = _loss_terms(cfg, _fresh(views), st, lo, hi)
    dots = [jnp.sum(t[v] * sum(lp[j] for j in to_pred[v]), axis=1, keepdims=True) for v in range(k)]
    # Column sums of the backward (Σ_n U and Σ_n π B, see _backward), computed here once.
    t, lp, pi = _loss_terms(cfg, _fresh(views), st, lo, hi)
    col_u = [jnp.sum(u, axis=0, keepdims=True) for u in _u_terms(t, lp, st, dots, to_pred)]
    col_v = [jnp.sum(pi[v] * sum(t[i] for i in to_target[v]), axis=0, keepdims=True) * st.rho_scale[v] for v in range(k)]
    loss = -sum(jnp.sum(d) for d in dots) / (len(cfg.pairs) * (hi - lo))
    return loss, (views, st, dots, col_u, col_v)


def _streamed_backward(cfg: _Config, res: tuple, grad: jax.Array) -> tuple[tuple[jax.Array, ...]]:
    """``grad · ∂loss/∂x_v`` for every view, from the residuals of :func:`_streamed_forward`."""
    views, st, dots, col_u, col_v = res
    k, (n, _) = len(views), views[0].shape
    lo, hi = cfg.rows if cfg.rows is not None else (0, n)
    whole = (lo, hi) == (0, n)
    to_pred, to_target = _partners(cfg, k)
    scale = -grad / (len(cfg.pairs) * (hi - lo) * cfg.col_temperature)
    ratio = cfg.col_temperature / cfg.row_temperature

    def local(xs: tuple[jax.Array, ...]) -> tuple[list, list]:
        """Loss-row terms ``U`` and ``π B`` of every view."""
        t, lp, pi = _loss_terms(cfg, xs, st, lo, hi)
        return _u_terms(t, lp, st, dots, to_pred), [pi[v] * sum(t[i] for i in to_target[v]) for v in range(k)]

    # Row sums of V = π B (loss rows) − q (b/Q) Σ_n π B.
    xs = _fresh(views)
    row_v = [-jnp.sum(_row_softmax(cfg, xs[v], st, v, 0, n) * col_v[v], axis=1, keepdims=True) for v in range(k)]
    _, v_loc = local(_fresh(views))
    row_v = [r.at[lo:hi].add(jnp.sum(vl, axis=1, keepdims=True)) for r, vl in zip(row_v, v_loc)]
    xs = _fresh(views)
    grads = []
    for v in range(k):
        q = _row_softmax(cfg, xs[v], st, v, 0, n)
        g = -_col_softmax(cfg, xs[v], st, v, 0, n) * col_u[v] - ratio * q * (col_v[v] + row_v[v])
        grads.append(g)
    u, v_loc = local(xs) if whole else local(_fresh(views))
    grads = [
        scale * (g + u[v] + ratio * v_loc[v]) if whole else (scale * g).at[lo:hi].add(scale * (u[v] + ratio * v_loc[v]))
        for v, g in enumerate(grads)
    ]
    return (tuple(grads),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _streamed_head(cfg: _Config, views: tuple[jax.Array, ...]) -> jax.Array:
    """Loss of one head from its views (linear-space case); ``cfg`` is static."""
    return _streamed_forward(cfg, views)[0]


_streamed_head.defvjp(_streamed_forward, _streamed_backward)


# --------------------------------------------------------------------------------------------
# Fused CPU kernel (adapters/_self_classifier_kernel.cpp through XLA FFI custom calls): three
# passes over the views in the forward, one in the backward; (K, N)/(K, C) statistics and the
# gradient's row-local part g0 are kept in between.
# --------------------------------------------------------------------------------------------


def _fused_attrs(cfg: _Config, views: tuple[jax.Array, ...]) -> dict[str, Any]:
    """The kernel's parameters as FFI attributes."""
    n, c = views[0].shape
    floor_t, floor_p = _native.exp_floors(np.finfo(views[0].dtype), n, c, cfg.eps)
    lo, hi = cfg.rows if cfg.rows is not None else (0, n)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return dict(
        k=np.int64(len(views)), n=np.int64(n), c=np.int64(c), r0=np.int64(lo), r1=np.int64(hi),
        pairs=np.asarray(cfg.pairs, dtype=np.int64).reshape(-1),
        inv_tc=np.float64(1.0 / cfg.col_temperature), inv_tr=np.float64(1.0 / cfg.row_temperature),
        log_floor_t=np.float64(math.log(floor_t)), log_floor_p=np.float64(math.log(floor_p)),
        eps=np.float64(cfg.eps), threads=np.int64(threads),
    )


def _fused_call(target: str, cfg: _Config, views: tuple[jax.Array, ...], grads: bool) -> list[jax.Array]:
    """``[loss, stats]``; with ``grads`` also the gradient's row-local part ``g0`` (one per view)
    and, for small problems, the exponentials' cache."""
    k, (n, c), dtype = len(views), views[0].shape, views[0].dtype
    cache = _native.cache_size(k, n, c, dtype.itemsize) if grads else 0
    shapes = [jax.ShapeDtypeStruct((), dtype), jax.ShapeDtypeStruct((_native.xla_targets().sc_stats_size(k, n, c),), dtype)]
    shapes += [jax.ShapeDtypeStruct(x.shape, dtype) for x in views] if grads else []
    shapes += [jax.ShapeDtypeStruct((cache,), dtype)] if cache else []
    call = jax.ffi.ffi_call(target, shapes, vmap_method="sequential")
    return _vary(call(*views, **_fused_attrs(cfg, views), cache=np.int64(bool(cache))), _varying_axes(views))


def _varying_axes(arrays: Sequence[jax.Array]) -> frozenset[str]:
    """The ``shard_map`` mesh axes that any of ``arrays`` is typed as varying over.

    (JAX 0.10 names this type ``manual_axis_type``, earlier releases ``vma``; before those
    there is no such type and the set is empty.)
    """
    axes: set[str] = set()
    for x in arrays if hasattr(jax, "typeof") else ():
        aval = jax.typeof(x)
        mat = getattr(aval, "manual_axis_type", None)
        axes |= set(mat.varying if mat is not None else getattr(aval, "vma", ()))
    return frozenset(axes)


def _vary(arrays: Sequence[jax.Array], axes: frozenset[str]) -> list[jax.Array]:
    """``arrays``, each typed as varying over ``axes`` too (a cast only where it is not yet).

    Inside ``shard_map`` the views of one head must share one type (a view replicated over
    the mesh next to one sharded over it fails ``custom_vjp``'s type check in the backward),
    and an FFI call's results carry no varying type at all, so the fused kernel's gradients
    would be typed unlike their logits.
    """
    out = []
    for y in arrays:
        missing = tuple(sorted(axes - _varying_axes([y])))
        if missing:
            y = jax.lax.pcast(y, missing, to="varying") if hasattr(jax.lax, "pcast") else jax.lax.pvary(y, missing)
        out.append(y)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_head(cfg: _Config, views: tuple[jax.Array, ...]) -> jax.Array:
    """Loss of one head by the fused CPU kernel (linear-space case); ``cfg`` is static."""
    return _fused_call("clusterlearn_sc_forward", cfg, views, grads=False)[0]


def _fused_fwd(cfg: _Config, views: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple]:
    loss, stats, *rest = _fused_call("clusterlearn_sc_vjp_fwd", cfg, views, grads=True)
    return loss, (views, stats, rest[: len(views)], rest[len(views) :])


def _fused_bwd(cfg: _Config, res: tuple, grad: jax.Array) -> tuple[tuple[jax.Array, ...]]:
    views, stats, g0, cache = res
    k, n = len(views), views[0].shape[0]
    lo, hi = cfg.rows if cfg.rows is not None else (0, n)
    scale = np.float64(-1.0 / (len(cfg.pairs) * (hi - lo) * cfg.col_temperature))
    call = jax.ffi.ffi_call(
        "clusterlearn_sc_vjp_bwd",
        [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in views],
        input_output_aliases={k + 1 + v: v for v in range(k)},  # each g0 becomes its gradient
        vmap_method="sequential",
    )
    attrs = dict(_fused_attrs(cfg, views), cache=np.int64(bool(cache)), scale=scale)
    return (tuple(_vary(call(*views, stats, *g0, grad, *cache, **attrs), _varying_axes(views))),)


_fused_head.defvjp(_fused_fwd, _fused_bwd)


def _fused_unavailable(views: Sequence[jax.Array], cfg: _Config) -> str | None:
    """Why the fused kernel cannot compute this head (``None``: it can)."""
    n, c = views[0].shape
    dtype = views[0].dtype
    if jax.default_backend() != "cpu":
        return f"JAX computes on {jax.default_backend()}, the kernel runs on the CPU"
    if dtype not in (jnp.float32, jnp.float64):
        return f"the kernel computes in float32 or float64, the logits are {dtype}"
    if not (_linear_targets(dtype, c, cfg) and _linear_predictions(dtype, n, c, cfg)):
        return _native.LOG_SPACE
    if _native.xla_targets() is None:
        return _native.NOT_BUILT
    return None


def self_classifier_head_loss(
    logits: jax.Array | Sequence[jax.Array],
    *,
    row_temperature: float = 0.1,
    col_temperature: float = 0.05,
    eps: float = 1e-12,
    clamp_sums: bool = True,
    rows: slice | None = None,
    kernel: str = "auto",
) -> jax.Array:
    """Loss of one head from its global logits, with the closed-form ``custom_vjp``.

    Parameters
    ----------
    logits : array of shape (K, N, C), or a sequence of K arrays of shape (N, C)
        ``K >= 2`` views of the same ``N`` samples, real floating (half precision computed in
        float32), finite (not checked here).
    row_temperature, col_temperature, eps, clamp_sums
        As in :class:`clusterlearn.self_classifier.SelfClassifierLoss`.
    rows : slice, optional
        Static rows of this process in a gathered global batch (the pair terms average over
        them; softmaxes and ``N/C`` use all rows).
    kernel : {"auto", "fused", "array"}, default "auto"
        ``"fused"``: the fused CPU kernel through XLA FFI custom calls (ValueError with the
        reason where it does not apply); ``"array"``: the streamed or stacked ``custom_vjp``
        in ``jax.numpy``; ``"auto"``: the fused kernel where it applies (CPU backend, float32
        or float64, the linear-space arithmetic).

    Returns
    -------
    0-d array
        Mean over the ``4K − 6`` pairs of :func:`clusterlearn.self_classifier.view_pairs`.
    """
    views = list(logits)
    xp = _check_head(views, rows)
    dtype = functools.reduce(jnp.promote_types, [x.dtype for x in views])
    views = _vary([_as_float(x.astype(dtype), xp) for x in views], _varying_axes(views))
    n, n_classes = views[0].shape
    span = None if rows is None else rows.indices(n)
    if span is not None and span[2] != 1:
        raise ValueError(f"rows must be a contiguous slice, got {rows}")
    cfg = _Config(
        _check_positive("row_temperature", row_temperature),
        _check_positive("col_temperature", col_temperature),
        _check_positive("eps", eps),
        bool(clamp_sums),
        None if span is None or span[:2] == (0, n) else span[:2],
        view_pairs(len(views)),
    )
    if _native.use_fused(kernel, lambda: _fused_unavailable(views, cfg)):
        return _fused_head(cfg, tuple(views))
    if _linear_targets(views[0].dtype, n_classes, cfg) and _linear_predictions(views[0].dtype, n, n_classes, cfg):
        return _streamed_head(cfg, tuple(views))
    return _head(cfg, jnp.stack(views))


def self_classifier_loss(
    logits: Sequence[jax.Array] | Sequence[Sequence[jax.Array]],
    *,
    row_temperature: float = 0.1,
    col_temperature: float = 0.05,
    eps: float = 1e-12,
    clamp_sums: bool = True,
    gather: Gather | None = None,
    check_finite: bool = True,
    kernel: str = "auto",
) -> jax.Array:
    """Self-Classifier loss over views and heads, as the core's, with the closed-form backward.

    Parameters
    ----------
    logits : list of arrays ``(N, C)``, or list of lists (heads) of them
        As :func:`clusterlearn.self_classifier.self_classifier_loss`.
    row_temperature, col_temperature, eps, clamp_sums, check_finite
        As the core's (``check_finite`` is skipped under ``jit``).
    gather : callable, optional
        The core's contract ``gather(local) -> (global_logits, rows)`` with a static slice; see
        the module docstring for sharded arrays and ``shard_map``.
    kernel : {"auto", "fused", "array"}, default "auto"
        As in :func:`self_classifier_head_loss`.

    Returns
    -------
    0-d array
        Mean over heads of :func:`self_classifier_head_loss`; ``jit``- and ``grad``-able.

    Raises
    ------
    TypeError, ValueError
        As the core's function, for the same bad input.
    """
    row_temperature = _check_positive("row_temperature", row_temperature)
    col_temperature = _check_positive("col_temperature", col_temperature)
    eps = _check_positive("eps", eps)
    if gather is not None and not callable(gather):
        raise TypeError(f"gather must be callable or None, got {type(gather).__name__}")
    _native.check_kernel(kernel)
    heads, names = _parse(logits)
    _, prepared = _prepare(heads, names, gather, check_finite)
    total = None
    for full, rows in prepared:
        term = self_classifier_head_loss(
            full,
            row_temperature=row_temperature,
            col_temperature=col_temperature,
            eps=eps,
            clamp_sums=clamp_sums,
            rows=rows,
            kernel=kernel,
        )
        total = term if total is None else total + term
    return total / len(heads)


class SelfClassifierLoss(_CoreSelfClassifierLoss):
    """Callable Self-Classifier loss for JAX with the closed-form backward (``custom_vjp``).

    The core :class:`clusterlearn.SelfClassifierLoss` (same constructor, call forms, errors
    and value) computing with :func:`self_classifier_loss`, plus ``kernel`` ("auto", "fused"
    or "array", see :func:`self_classifier_head_loss`). There is no ``"auto"`` gather in JAX
    (see the module docstring).
    """

    def __init__(self, *args: Any, kernel: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernel = _native.check_kernel(kernel)

    def _loss_function(self, logits: Any, **kwargs: Any) -> jax.Array:  # type: ignore[override]
        return self_classifier_loss(logits, kernel=self.kernel, **kwargs)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, kernel={self.kernel!r})"
