"""Loss re-weighting by cluster size: ``w_c ∝ n_c ** -power`` over non-empty clusters."""

from __future__ import annotations

import math
from typing import Any

from . import backend as B
from .validation import check_real

Array = Any

__all__ = ["LossReweighter", "reweight", "size_weights"]

_POWER_CAP = 1e30


def _check_power(power: float) -> float:
    """``power`` as a finite float >= 0 (an infinite power has no weights to normalise)."""
    power = check_real(power, "reweight_power", low=0.0)
    if not math.isfinite(power):
        raise ValueError(f"reweight_power must be finite, got {power}")
    return power


def reweight(sizes: Array, power: float = 0.5) -> Array:
    """Per-class loss weights from cluster sizes.

    Parameters
    ----------
    sizes : (C,) integer array of cluster sizes (at least one positive)
    power : finite p >= 0; 0.5 in ODC (w ∝ 1/sqrt(n)), 0 gives equal weights

    Returns
    -------
    (C,) float32 array (float dtype of the namespace's default for JAX), summing to 1, zero
    for empty clusters. Suitable as ``weight=`` of a cross-entropy loss: the relative weights
    are what matter there, the normalisation makes the numbers comparable across steps.
    Computed in log space, so any finite power gives finite weights (a large power puts all
    the weight on the smallest non-empty clusters).
    """
    xp = B.eager_namespace(sizes=sizes)
    power = _check_power(power)
    if not xp.isdtype(sizes.dtype, "integral") or B.unsupported_torch_dtype(sizes):
        raise TypeError(f"sizes must have an integer dtype, got {sizes.dtype}")
    if sizes.ndim != 1:
        raise ValueError(f"sizes must be 1-D (clusters,), got shape {tuple(sizes.shape)}")
    if bool(xp.any(sizes < 0)) or not bool(xp.any(sizes > 0)):
        raise ValueError("sizes must be non-negative with at least one positive entry")
    return size_weights(sizes, power)


def size_weights(sizes: Array, power: float) -> Array:
    """:func:`reweight` without its input checks: a pure function, traceable by ``jax.jit``.

    sizes : (C,) integer sizes, non-negative, at least one positive (not checked)

    ``w_c = exp(-p (log n_c - log n_min)) / sum``: relative to the smallest non-empty cluster,
    every term lies in (0, 1] and the smallest is exactly 1, so neither the powers nor their
    sum can overflow, underflow to an all-zero vector, or divide 0 by 0. Powers above 1e30
    give the weights of 1e30 (the product ``p * excess`` stays a finite float32; sizes below
    2**31 differ by an excess of at least 4e-10, so those weights are already exactly one-hot
    on the smallest clusters).
    """
    xp = B.namespace(sizes=sizes)
    power = min(power, _POWER_CAP)
    n = xp.astype(sizes, xp.float32)
    present = n > 0
    log_n = xp.log(xp.where(present, n, xp.ones_like(n)))
    smallest = xp.min(xp.where(present, log_n, xp.full_like(n, float("inf"))))
    excess = xp.where(present, log_n - smallest, xp.zeros_like(n))  # >= 0 where present
    w = xp.where(present, xp.exp(-power * excess), xp.zeros_like(n))
    return w / xp.sum(w)


class LossReweighter:
    """Callable holding the power of :func:`reweight`.

    Parameters
    ----------
    power : finite p >= 0 (0.5 in ODC)
    """

    def __init__(self, power: float = 0.5) -> None:
        self.power = _check_power(power)

    def __call__(self, sizes: Array) -> Array:
        """(C,) weights from (C,) sizes; see :func:`reweight`."""
        return reweight(sizes, self.power)
