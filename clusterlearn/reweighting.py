"""Loss re-weighting by cluster size: ``w_c ∝ n_c ** -power`` over non-empty clusters."""

from __future__ import annotations

from typing import Any

from . import _backend as B
from ._validation import check_real

Array = Any

__all__ = ["LossReweighter", "reweight", "size_weights"]


def reweight(sizes: Array, power: float = 0.5) -> Array:
    """Per-class loss weights from cluster sizes.

    Parameters
    ----------
    sizes : (C,) integer array of cluster sizes (at least one positive)
    power : p >= 0; 0.5 in ODC (w ∝ 1/sqrt(n)), 0 gives equal weights

    Returns
    -------
    (C,) float32 array (float dtype of the namespace's default for JAX), summing to 1, zero
    for empty clusters. Suitable as ``weight=`` of a cross-entropy loss: the relative weights
    are what matter there, the normalisation makes the numbers comparable across steps.
    """
    xp = B.namespace(sizes=sizes)
    if sizes.ndim != 1:
        raise ValueError(f"sizes must be 1-D (clusters,), got shape {tuple(sizes.shape)}")
    if bool(xp.any(sizes < 0)) or not bool(xp.any(sizes > 0)):
        raise ValueError("sizes must be non-negative with at least one positive entry")
    return size_weights(sizes, power)


def size_weights(sizes: Array, power: float) -> Array:
    """:func:`reweight` without its input checks: a pure function, traceable by ``jax.jit``.

    sizes : (C,) integer sizes, non-negative, at least one positive (not checked)
    """
    xp = B.namespace(sizes=sizes)
    n = xp.astype(sizes, xp.float32)
    safe = xp.where(n > 0, n, xp.ones_like(n))
    w = xp.where(n > 0, safe ** (-power), xp.zeros_like(n))
    return w / xp.sum(w)


class LossReweighter:
    """Callable holding the power of :func:`reweight`.

    Parameters
    ----------
    power : p >= 0 (0.5 in ODC)
    """

    def __init__(self, power: float = 0.5) -> None:
        self.power = check_real(power, "reweight_power", low=0.0)

    def __call__(self, sizes: Array) -> Array:
        """(C,) weights from (C,) sizes; see :func:`reweight`."""
        return reweight(sizes, self.power)
