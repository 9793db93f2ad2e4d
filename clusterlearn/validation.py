"""Argument checks shared by the public objects.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, value or
range) with a message that names the argument and says what was expected. Objects run all of
their checks before touching their state, so a rejected call leaves nothing half-updated.

This module is public so that the adapters (and users' own wrappers) reject bad input with the
same messages as the core.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any

import array_api_compat as aac

from . import backend as B

Array = Any


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as a Python int (rejecting bools and floats), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(value: Any, name: str, *, low: float, high: float = float("inf")) -> float:
    """``value`` as a float in the closed interval [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_features(
    x: Array, name: str, *, dim: int | None = None, rows: int | None = None, allow_empty: bool = False
) -> None:
    """A finite, real floating (rows, dim) matrix (with ``allow_empty``, possibly of no rows:
    a shard that holds none)."""
    xp = aac.array_namespace(x)
    if not xp.isdtype(x.dtype, "real floating") or B.unsupported_torch_dtype(x):
        torch_note = " (torch: float16 or wider)" if aac.is_torch_array(x) else ""
        raise TypeError(f"{name} must have a real floating dtype{torch_note}, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features), got shape {tuple(x.shape)}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} columns (feat_dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if not all_finite(x, xp):
        raise ValueError(f"{name} contains NaN or Inf")


def check_same_device(**arrays: Array) -> None:
    """Raise ValueError, naming the arguments, unless the keyword arrays share one device.

    JAX arrays are left to JAX, which places (and refuses to mix) them itself; under ``jit``
    they have no device to compare.
    """
    devices = {name: aac.device(x) for name, x in arrays.items() if not aac.is_jax_array(x)}
    if len(set(map(str, devices.values()))) > 1:
        desc = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{', '.join(devices)} must be on one device, got {desc}")


def all_finite(x: Array, xp: ModuleType) -> bool:
    """Whether the floating array ``x`` holds no NaN or inf (blocks until known).

    Its maximum and minimum: the array API propagates NaN through ``max``/``min``, so two
    reductions decide it without the bool array of ``all(isfinite(x))`` (7x faster on a
    4096 x 8000 torch tensor here: 18 vs 132 ms).
    """
    if math.prod(x.shape) == 0:
        return True
    return bool(xp.isfinite(xp.max(x))) and bool(xp.isfinite(xp.min(x)))


def check_labels(labels: Array, name: str, *, upper: int, length: int | None = None) -> None:
    """A 1-D integer array with values in [0, upper) (cluster ids or sample indices)."""
    xp = aac.array_namespace(labels)
    if not xp.isdtype(labels.dtype, "integral") or B.unsupported_torch_dtype(labels):
        torch_note = " (torch: uint8 or signed)" if aac.is_torch_array(labels) else ""
        raise TypeError(f"{name} must have an integer dtype{torch_note}, got {labels.dtype}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if length is not None and labels.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {labels.shape[0]}")
    if labels.shape[0] == 0:
        raise ValueError(f"{name} must not be empty")
    lo, hi = int(xp.min(labels)), int(xp.max(labels))
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}), got values in [{lo}, {hi}]")
