"""Self-Classifier loss for JAX: the core's closed form or the fused kernel in one ``jax.custom_vjp``, ``jit``-able.

Same value as :func:`clusterlearn.self_classifier.self_classifier_loss` (same formula, clamps,
pairs of views, mean over heads); the gradient is the closed form of
:mod:`clusterlearn.self_classifier_closed_form` (derived there) instead of the transpose of
every recorded operation. Each head runs one executor of its
:class:`~clusterlearn.self_classifier_guards.GuardPlan`: on the CPU backend, by default
(``kernel="auto"``), the fused C++ kernel of :mod:`._native` through XLA FFI custom calls where
the plan is linear-space; else the core's streamed closed form (linear space: ``(N,)``/``(C,)``
statistics, full-size quantities recomputed per pass behind ``jax.lax.optimization_barrier``)
or its stacked closed form on the ``(K, N, C)`` views (log space).

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
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clusterlearn import self_classifier_closed_form as closed_form
from clusterlearn.self_classifier import SelfClassifierLoss as CoreSelfClassifierLoss
from clusterlearn.self_classifier import head_plan
from clusterlearn.self_classifier_guards import GuardPlan
from clusterlearn.self_classifier_inputs import (
    Gather,
    call_argument,
    check_gather,
    check_positive,
    parse_logits,
    prepare_heads,
)

from . import _native

__all__ = ["SelfClassifierLoss", "self_classifier_loss", "self_classifier_head_loss"]


def _barrier(views: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """The views behind an optimisation barrier: a pass of their own for XLA (no CSE across)."""
    return jax.lax.optimization_barrier(views)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stacked_head(plan: GuardPlan, x: jax.Array) -> jax.Array:
    """Loss of one head from stacked logits (K, N, C) by the core's closed form."""
    return closed_form.forward(plan, x)[0]


_stacked_head.defvjp(closed_form.forward, lambda plan, res, grad: (closed_form.backward(plan, res, grad),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _streamed_head(plan: GuardPlan, views: tuple[jax.Array, ...]) -> jax.Array:
    """Loss of one head from its views by the core's streamed closed form (linear-space plan)."""
    return closed_form.streamed_forward(plan, views, _barrier)[0]


_streamed_head.defvjp(
    lambda plan, views: closed_form.streamed_forward(plan, views, _barrier),
    lambda plan, res, grad: (closed_form.streamed_backward(plan, res, grad, _barrier),),
)


# --------------------------------------------------------------------------------------------
# Fused CPU kernel (adapters/_self_classifier_kernel.cpp through XLA FFI custom calls): three
# passes over the views in the forward, one in the backward; (K, N)/(K, C) statistics and the
# gradient's row-local part g0 are kept in between.
# --------------------------------------------------------------------------------------------


def _fused_attrs(plan: GuardPlan, views: tuple[jax.Array, ...]) -> dict[str, Any]:
    """The kernel's parameters (:func:`._native.params`) as FFI attributes."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p = _native.params(plan, len(views), threads=threads)
    return dict(
        k=np.int64(p.k), n=np.int64(p.n), c=np.int64(p.c), r0=np.int64(p.r0), r1=np.int64(p.r1),
        pairs=np.asarray(plan.pairs, dtype=np.int64).reshape(-1),
        **{name: np.float64(getattr(p, name)) for name in ("inv_tc", "inv_tr", "log_floor_t", "log_floor_p", "eps")},
        threads=np.int64(p.threads),
    )


def _fused_call(target: str, plan: GuardPlan, views: tuple[jax.Array, ...], grads: bool) -> list[jax.Array]:
    """``[loss, stats]``; with ``grads`` also the gradient's row-local part ``g0`` (one per view)
    and, for small problems, the exponentials' cache."""
    k, (n, c), dtype = len(views), views[0].shape, views[0].dtype
    cache = _native.cache_size(k, n, c, dtype.itemsize) if grads else 0
    shapes = [jax.ShapeDtypeStruct((), dtype), jax.ShapeDtypeStruct((_native.xla_targets().sc_stats_size(k, n, c),), dtype)]
    shapes += [jax.ShapeDtypeStruct(x.shape, dtype) for x in views] if grads else []
    shapes += [jax.ShapeDtypeStruct((cache,), dtype)] if cache else []
    call = jax.ffi.ffi_call(target, shapes, vmap_method="sequential")
    return _vary(call(*views, **_fused_attrs(plan, views), cache=np.int64(bool(cache))), _varying_axes(views))


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
def _fused_head(plan: GuardPlan, views: tuple[jax.Array, ...]) -> jax.Array:
    """Loss of one head by the fused CPU kernel (linear-space case); ``cfg`` is static."""
    return _fused_call("clusterlearn_sc_forward", plan, views, grads=False)[0]


def _fused_fwd(plan: GuardPlan, views: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple]:
    loss, stats, *rest = _fused_call("clusterlearn_sc_vjp_fwd", plan, views, grads=True)
    return loss, (views, stats, rest[: len(views)], rest[len(views) :])


def _fused_bwd(plan: GuardPlan, res: tuple, grad: jax.Array) -> tuple[tuple[jax.Array, ...]]:
    views, stats, g0, cache = res
    k = len(views)
    scale = np.float64(_native.gradient_scale(plan))
    call = jax.ffi.ffi_call(
        "clusterlearn_sc_vjp_bwd",
        [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in views],
        input_output_aliases={k + 1 + v: v for v in range(k)},  # each g0 becomes its gradient
        vmap_method="sequential",
    )
    attrs = dict(_fused_attrs(plan, views), cache=np.int64(bool(cache)), scale=scale)
    return (tuple(_vary(call(*views, stats, *g0, grad, *cache, **attrs), _varying_axes(views))),)


_fused_head.defvjp(_fused_fwd, _fused_bwd)


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
    views, plan = head_plan(
        list(logits), rows, row_temperature=row_temperature, col_temperature=col_temperature, eps=eps,
        clamp_sums=clamp_sums,
    )
    views = _vary(views, _varying_axes(views))
    backend = jax.default_backend()
    elsewhere = None if backend == "cpu" else f"JAX computes on {backend}"
    if _native.use_fused(kernel, lambda: _native.unavailable(plan, elsewhere, views[0].dtype, _native.xla_targets)):
        return _fused_head(plan, tuple(views))
    if plan.linear:
        return _streamed_head(plan, tuple(views))
    return _stacked_head(plan, jnp.stack(views))


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
    row_temperature = check_positive("row_temperature", row_temperature)
    col_temperature = check_positive("col_temperature", col_temperature)
    eps = check_positive("eps", eps)
    check_gather(gather)
    _native.check_kernel(kernel)
    heads, names = parse_logits(logits)
    _, prepared = prepare_heads(heads, names, gather, check_finite)
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


class SelfClassifierLoss(CoreSelfClassifierLoss):
    """Callable Self-Classifier loss for JAX with the closed-form backward (``custom_vjp``).

    The core :class:`clusterlearn.SelfClassifierLoss` (same constructor, call forms, errors
    and value) computing with :func:`self_classifier_loss`, plus ``kernel`` ("auto", "fused"
    or "array", see :func:`self_classifier_head_loss`). There is no ``"auto"`` gather in JAX
    (see the module docstring).
    """

    parameters = (*CoreSelfClassifierLoss.parameters, "kernel")

    def __init__(self, *args: Any, kernel: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kernel = _native.check_kernel(kernel)

    def forward(self, *logits: Any) -> jax.Array:
        """The loss of a call's arguments, by :func:`self_classifier_loss`."""
        return self_classifier_loss(call_argument(logits), **self.settings())
