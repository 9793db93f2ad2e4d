"""Self-Classifier loss for JAX with a closed-form backward (``jax.custom_vjp``), ``jit``-able.

Same value as :func:`clusterlearn.self_classifier.self_classifier_loss` (same formula, clamps,
``eps``, pairs of views, mean over heads, and the same choice between linear-space and
log-space arithmetic); the gradient is the closed form derived in
:mod:`clusterlearn.adapters._torch_self_classifier` instead of the transpose of every recorded
operation. Per head, the ``K`` views are stacked to ``(K, N, C)`` and processed at once.

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
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from clusterlearn.self_classifier import SelfClassifierLoss as _CoreSelfClassifierLoss
from clusterlearn.self_classifier import (
    Gather,
    _as_float,
    _check_head,
    _check_positive,
    _parse,
    _prepare,
    view_pairs,
)

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


def _softmax(x: jax.Array, axis: int, temperature: float) -> jax.Array:
    """Softmax of ``x / temperature`` along ``axis`` with ``exp`` floored at ``_tiny`` (as the core)."""
    z = (x - jnp.max(x, axis=axis, keepdims=True)) / temperature
    e = jnp.exp(jnp.maximum(z, math.log(_tiny(x.dtype))))
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _combine(x: jax.Array, sources: Sequence[Sequence[int]]) -> jax.Array:
    """``out[i] = Σ_{j ∈ sources[i]} x[j]`` for ``x`` of shape ``(K, ...)``."""
    return jnp.stack([sum(x[j] for j in js[1:]) + x[js[0]] if len(js) > 1 else x[js[0]] for js in sources])


def _forward(cfg: _Config, x: jax.Array) -> tuple[jax.Array, tuple]:
    """Loss of one head from stacked logits ``x`` (K, N, C), and the backward's residuals."""
    k, n_global, n_classes = x.shape
    lo, hi = cfg.rows if cfg.rows is not None else (0, n_global)
    log_eps = math.log(cfg.eps)
    to_pred = [[j for i, j in cfg.pairs if i == v] for v in range(k)]

    # Targets T (loss rows), the column softmax p (all rows) and the active rows of the clamp.
    if _linear_targets(x.dtype, n_classes, cfg):
        p = _softmax(x, 1, cfg.col_temperature)
        row_sum = jnp.sum(p[:, lo:hi], axis=2, keepdims=True)
        target = p[:, lo:hi] / jnp.maximum(row_sum, cfg.eps)
        active_t = row_sum > cfg.eps
    else:
        log_p = jax.nn.log_softmax(x / cfg.col_temperature, axis=1)
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
        log_q = jax.nn.log_softmax(x / cfg.row_temperature, axis=2)
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
    to_target = [[i for i, j in cfg.pairs if j == v] for v in range(k)]
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


def self_classifier_head_loss(
    logits: jax.Array | Sequence[jax.Array],
    *,
    row_temperature: float = 0.1,
    col_temperature: float = 0.05,
    eps: float = 1e-12,
    clamp_sums: bool = True,
    rows: slice | None = None,
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

    Returns
    -------
    0-d array
        Mean over the ``4K − 6`` pairs of :func:`clusterlearn.self_classifier.view_pairs`.
    """
    views = list(logits)
    xp = _check_head(views, rows)
    x = _as_float(jnp.stack(views), xp)
    n = x.shape[1]
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
    return _head(cfg, x)


def self_classifier_loss(
    logits: Sequence[jax.Array] | Sequence[Sequence[jax.Array]],
    *,
    row_temperature: float = 0.1,
    col_temperature: float = 0.05,
    eps: float = 1e-12,
    clamp_sums: bool = True,
    gather: Gather | None = None,
    check_finite: bool = True,
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
        )
        total = term if total is None else total + term
    return total / len(heads)


class SelfClassifierLoss(_CoreSelfClassifierLoss):
    """Callable Self-Classifier loss for JAX with the closed-form backward (``custom_vjp``).

    The core :class:`clusterlearn.SelfClassifierLoss` (same constructor, call forms, errors
    and value) computing with :func:`self_classifier_loss`. There is no ``"auto"`` gather in
    JAX (see the module docstring).
    """

    _loss_function = staticmethod(self_classifier_loss)
