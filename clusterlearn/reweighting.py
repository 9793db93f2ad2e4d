"""Loss re-weighting by cluster size: ``w_c ∝ n_c ** -power`` over non-empty clusters.

:func:`loss_weights` is the one name of these weights (docs/glossary.md); ``reweight``,
``size_weights`` and ``LossReweighter`` are its deprecated names, kept for one release.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from . import backend as B
from .validation import check_real

Array = Any

__all__ = ["loss_weights", "check_power", "LossReweighter", "reweight", "size_weights"]

_POWER_CAP = 1e30


def check_power(power: float, name: str = "reweight_power") -> float:
    """``power`` as a finite float >= 0 (an infinite power has no weights to normalise).

    Raises ``TypeError``/``ValueError`` naming it ``name`` otherwise.
    """
    power = check_real(power, name, low=0.0)
    if not math.isfinite(power):
        raise ValueError(f"{name} must be finite, got {power}")
    return power


def loss_weights(sizes: Array, power: float = 0.5, *, check: bool = True) -> Array:
    """Per-class loss weights from cluster sizes.

    Parameters
    ----------
    sizes : (C,) integer array of cluster sizes (at least one positive)
    power : finite p >= 0; 0.5 in ODC (w ∝ 1/sqrt(n)), 0 gives equal weights
    check : check ``sizes`` and ``power`` first (``TypeError``/``ValueError`` naming them);
        ``False`` skips the checks, which read values: a pure function, traceable by
        ``jax.jit`` (sizes must then be non-negative with one positive entry)

    Returns
    -------
    (C,) float32 array (float dtype of the namespace's default for JAX), summing to 1, zero
    for empty clusters. Suitable as ``weight=`` of a cross-entropy loss: the relative weights
    are what matter there, the normalisation makes the numbers comparable across steps.
    Computed in log space, so any finite power gives finite weights (a large power puts all
    the weight on the smallest non-empty clusters).

    ``w_c = exp(-p (log n_c - log n_min)) / sum``: relative to the smallest non-empty cluster,
    every term lies in (0, 1] and the smallest is exactly 1, so neither the powers nor their
    sum can overflow, underflow to an all-zero vector, or divide 0 by 0. Powers above 1e30
    give the weights of 1e30 (the product ``p * excess`` stays a finite float32; sizes below
    2**31 differ by an excess of at least 4e-10, so those weights are already exactly one-hot
    on the smallest clusters).
    """
    if not check:
        return _weights(sizes, power)
    xp = B.eager_namespace(sizes=sizes)
    power = check_power(power, "power")
    if not xp.isdtype(sizes.dtype, "integral") or B.unsupported_torch_dtype(sizes):
        raise TypeError(f"sizes must have an integer dtype, got {sizes.dtype}")
    if sizes.ndim != 1:
        raise ValueError(f"sizes must be 1-D (clusters,), got shape {tuple(sizes.shape)}")
    if bool(xp.any(sizes < 0)) or not bool(xp.any(sizes > 0)):
        raise ValueError("sizes must be non-negative with at least one positive entry")
    return _weights(sizes, power)


def _weights(sizes: Array, power: float) -> Array:
    """:func:`loss_weights` after (or without) its checks."""
    xp = B.namespace(sizes=sizes)
    power = min(power, _POWER_CAP)
    n = xp.astype(sizes, xp.float32)
    present = n > 0
    log_n = xp.log(xp.where(present, n, xp.ones_like(n)))
    smallest = xp.min(xp.where(present, log_n, xp.full_like(n, float("inf"))))
    excess = xp.where(present, log_n - smallest, xp.zeros_like(n))  # >= 0 where present
    w = xp.where(present, xp.exp(-power * excess), xp.zeros_like(n))
    return w / xp.sum(w)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated, use {new} (docs/glossary.md)", DeprecationWarning, stacklevel=3)


def reweight(sizes: Array, power: float = 0.5) -> Array:
    """Deprecated name of :func:`loss_weights`."""
    _deprecated("clusterlearn.reweight", "clusterlearn.loss_weights")
    return loss_weights(sizes, power)


def size_weights(sizes: Array, power: float) -> Array:
    """Deprecated name of ``loss_weights(sizes, power, check=False)``."""
    _deprecated("clusterlearn.reweighting.size_weights", "clusterlearn.loss_weights(..., check=False)")
    return loss_weights(sizes, power, check=False)


class LossReweighter:
    """Deprecated: ``functools.partial(clusterlearn.loss_weights, power=p)`` does the same.

    Parameters
    ----------
    power : finite p >= 0 (0.5 in ODC)
    """

    def __init__(self, power: float = 0.5) -> None:
        _deprecated("clusterlearn.LossReweighter", "functools.partial(clusterlearn.loss_weights, power=p)")
        self.power = check_power(power, "power")

    def __call__(self, sizes: Array) -> Array:
        """(C,) weights from (C,) sizes; see :func:`loss_weights`."""
        return loss_weights(sizes, self.power)
