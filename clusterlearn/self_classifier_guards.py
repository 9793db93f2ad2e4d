"""The numerical guards of the Self-Classifier objective: the one home of their constants.

The objective (:mod:`clusterlearn.self_classifier`) is computed in one of two ways, equal to
rounding: in *linear space* (max-shifted softmaxes, their sums clamped at ``eps``, one ``log``)
where the dtype resolves everything the floors below drop, else in *log space*
(log-softmaxes, log-sum-exps). Which one, and the floors of the exponentials, follow from
static facts only (the dtype, ``N``, ``C``, ``eps``, the clamp), so a :class:`GuardPlan` fixes
them once per head and every executor reads it: the core's loss, the closed form
(:mod:`clusterlearn.self_classifier_closed_form`), the adapters and the fused C++ kernel (which
receives the floors in its parameters). With ``u`` the dtype's machine epsilon and ``tiny``
:data:`TINY_MULTIPLE` × its smallest normal number:

- ``exp`` results are floored at ``tiny`` (negligible next to the sums or ``eps`` they enter):
  underflowing and denormal ``exp`` is 10-30 times slower on CPUs;
- clamped *targets* ``p / max(Σ_y p, eps)`` are computed in linear space while
  ``C · tiny / eps <= u / TARGET_MARGIN``: floored entries then change a row by less than its
  resolution;
- clamped *predictions* ``log((N/C) · q / max(Σ_n q, eps) + eps)`` in linear space while
  ``(N/C) · tiny / eps² <= u / PREDICTION_MARGIN`` and ``N · tiny / eps <= u / PREDICTION_MARGIN``;
- on a linear-space side the floor is raised to the largest value those bounds allow
  (:func:`exp_floors`), which keeps every product of the loss and its gradient away from
  denormal numbers;
- ``log(exp(a) + eps)`` is taken directly (not as a max-shifted ``logaddexp``) while
  ``exp(a)`` cannot overflow and ``eps >= LOG_EPS_MARGIN · tiny / u``.

The primitives below (max-shifted scaling, floored ``exp``, log-sum-exp, log-softmax) apply
those floors with array-API functions only.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat as aac

Array = Any

__all__ = [
    "LOG_EPS_MARGIN", "PREDICTION_MARGIN", "TARGET_MARGIN", "TINY_MULTIPLE", "GuardPlan", "exp_floors",
    "device_of", "floored_exp", "full_like", "guard_plan", "linear_predictions", "linear_targets", "log_plus_eps",
    "log_softmax", "logsumexp", "scaled", "shift", "tiny",
]

#: ``exp`` is floored at this multiple of the dtype's smallest normal number.
TINY_MULTIPLE = 8.0
#: Linear-space targets: floored entries change a row by at most ``u / TARGET_MARGIN``.
TARGET_MARGIN = 1024.0
#: Linear-space predictions: floored entries change the log's argument by at most ``eps · u / PREDICTION_MARGIN``.
PREDICTION_MARGIN = 16.0
#: ``log(exp(a) + eps)`` directly while ``eps >= LOG_EPS_MARGIN · tiny / u``.
LOG_EPS_MARGIN = 16.0


def tiny(finfo: Any) -> float:
    """:data:`TINY_MULTIPLE` × the smallest normal number of the dtype whose ``finfo`` is given
    (the array API's, NumPy's or torch's)."""
    return TINY_MULTIPLE * float(finfo.smallest_normal)


def linear_targets(finfo: Any, c: int, sum_floor: float | None) -> bool:
    """Whether targets clamped at ``sum_floor`` (None: exact sums) are computed in linear space."""
    return sum_floor is not None and c * tiny(finfo) / sum_floor <= float(finfo.eps) / TARGET_MARGIN


def linear_predictions(finfo: Any, n: int, c: int, eps: float, sum_floor: float | None) -> bool:
    """Whether predictions clamped at ``sum_floor`` (None: exact sums) are computed in linear space."""
    resolution = float(finfo.eps) / PREDICTION_MARGIN
    return (
        sum_floor is not None
        and (n / c) * tiny(finfo) / sum_floor / eps <= resolution
        and n * tiny(finfo) / sum_floor <= resolution
    )


def exp_floors(finfo: Any, n: int, c: int, eps: float) -> tuple[float, float]:
    """The largest ``exp`` floors of the column softmax (targets) and the row softmax
    (predictions) of ``(n, c)`` logits on the linear-space path that keep the guards' bounds
    (never below :func:`tiny`)."""
    resolution = float(finfo.eps)
    target = max(tiny(finfo), eps * resolution / TARGET_MARGIN / c)
    prediction = max(tiny(finfo), min(eps * eps * resolution / PREDICTION_MARGIN * c / n, eps * resolution / PREDICTION_MARGIN / n))
    return target, prediction


class GuardPlan(NamedTuple):
    """Static parameters of one head's loss and its numerical guards (hashable: a ``jax.jit``
    static argument). Build it with :func:`guard_plan`."""

    row_temperature: float
    col_temperature: float
    eps: float  #: added inside the log of the predictions
    sum_floor: float | None  #: the L1 normalisations divide by ``max(sum, sum_floor)``; None: exact sums
    n: int  #: rows of the (global) batch
    c: int  #: classes
    rows: tuple[int, int, int]  #: loss rows ``range(*rows)`` within the batch (``slice.indices``)
    pairs: tuple[tuple[int, int], ...]  #: ordered (target view, prediction view) pairs
    linear_targets: bool  #: targets in linear space (else log space)
    linear_predictions: bool  #: predictions in linear space (else log space)
    floor_targets: float  #: ``exp`` floor of the column softmax
    floor_predictions: float  #: ``exp`` floor of the row softmax

    @property
    def clamp_sums(self) -> bool:
        """The sums are clamped (at :attr:`sum_floor`)."""
        return self.sum_floor is not None

    @property
    def linear(self) -> bool:
        """Both sides in linear space with the sums clamped at ``eps`` (the fused kernel's and
        the streamed form's case)."""
        return self.linear_targets and self.linear_predictions and self.sum_floor == self.eps

    @property
    def whole(self) -> bool:
        """The loss averages over every row of the batch."""
        return self.rows == (0, self.n, 1)

    @property
    def loss_rows(self) -> slice:
        """The loss rows as a slice."""
        return slice(*self.rows)

    @property
    def num_loss_rows(self) -> int:
        """The number of loss rows."""
        return len(range(*self.rows))


def guard_plan(
    finfo: Any,
    n: int,
    c: int,
    *,
    row_temperature: float,
    col_temperature: float,
    eps: float,
    clamp_sums: bool,
    pairs: tuple[tuple[int, int], ...],
    rows: slice | None = None,
    sum_floor: float | None = None,
) -> GuardPlan:
    """The :class:`GuardPlan` of one head: ``(n, c)`` logits of the dtype whose ``finfo`` is given,
    validated parameters, loss rows ``rows`` (all by default); with ``clamp_sums`` the sums are
    clamped at ``sum_floor`` (``eps`` by default)."""
    floor = (eps if sum_floor is None else float(sum_floor)) if clamp_sums else None
    lin_t = linear_targets(finfo, c, floor)
    lin_p = linear_predictions(finfo, n, c, eps, floor)
    floor_t, floor_p = exp_floors(finfo, n, c, eps)
    return GuardPlan(
        float(row_temperature), float(col_temperature), float(eps), floor, int(n), int(c),
        (rows or slice(None)).indices(int(n)), tuple(pairs),
        lin_t, lin_p, floor_t if lin_t else tiny(finfo), floor_p if lin_p else tiny(finfo),
    )


# --------------------------------------------------------------------------------------------
# Guarded primitives (array API only)
# --------------------------------------------------------------------------------------------


def device_of(x: Array) -> Any:
    """The device to create arrays on that combine with ``x``: ``x``'s, or None for JAX arrays,
    where an array created without a device stays uncommitted and follows ``x`` to its device
    or sharding (one committed to ``x``'s first device would clash with a sharded ``x``)."""
    return None if aac.is_jax_array(x) else aac.device(x)


def full_like(x: Array, value: float, xp: ModuleType) -> Array:
    """0-d array holding ``value`` with ``x``'s dtype, on :func:`device_of` ``x``."""
    return xp.asarray(value, dtype=x.dtype, device=device_of(x))


def shift(x: Array, axis: int, xp: ModuleType) -> Array:
    """``max(x, axis, keepdims=True)``, the stabilising shift of a log-sum-exp.

    The shift cancels exactly, so its gradient is zero; where the array type can drop autograd
    history (PyTorch's ``.detach()``, found by duck typing, no import) it is dropped so that
    the backward pass does not spend full passes over ``x`` on the max's zero contribution, as
    ``torch.logsumexp`` does internally. Other arrays (JAX: traced through) are returned as is.
    """
    m = xp.max(x, axis=axis, keepdims=True)
    detach = getattr(m, "detach", None)
    return detach() if callable(detach) else m


def scaled(logits: Array, axis: int, temperature: float, xp: ModuleType) -> Array:
    """``(s − max(s, axis)) / τ``, the max-shifted argument of a softmax along ``axis``.

    Shifted before dividing, because ``s / τ`` overflows where ``s − max`` does not (float32
    logits of 1e38), and floored at ``−(dtype max) / 4 · min(τ, 1)`` before dividing, so that
    no entry becomes −inf: a log-softmax over a line of −inf is NaN. An entry that low has
    ``exp = 0`` either way, so the floor changes no result.
    """
    d = logits - shift(logits, axis, xp)
    low = -float(xp.finfo(d.dtype).max) / 4 * min(temperature, 1.0)
    return xp.maximum(d, full_like(d, low, xp)) / temperature


def floored_exp(x: Array, floor: float, xp: ModuleType) -> Array:
    """``exp(x)`` with results below ``floor`` (see the module docstring) raised to it."""
    return xp.exp(xp.maximum(x, full_like(x, math.log(floor), xp)))


def logsumexp(x: Array, axis: int, xp: ModuleType) -> Array:
    """``log(sum(exp(x), axis))`` with ``keepdims=True``, shifted by the maximum (finite ``x``)."""
    m = shift(x, axis, xp)
    return m + xp.log(xp.sum(floored_exp(x - m, tiny(xp.finfo(x.dtype)), xp), axis=axis, keepdims=True))


def log_softmax(x: Array, axis: int, xp: ModuleType) -> Array:
    """``log(softmax(x, axis))`` as ``(x − m) − log(sum(exp(x − m)))`` with ``m = max(x, axis)``.

    Subtracting ``m`` first (rather than ``x − logsumexp(x)``) keeps the result accurate when
    ``|x|`` is large (e.g. constant logits of magnitude 1e4 / τ).
    """
    d = x - shift(x, axis, xp)
    return d - xp.log(xp.sum(floored_exp(d, tiny(xp.finfo(x.dtype)), xp), axis=axis, keepdims=True))


def log_plus_eps(a: Array, a_max: float, eps: float, xp: ModuleType) -> Array:
    """``log(exp(a) + eps)`` for ``a <= a_max`` (a Python bound known in advance).

    Directly (4 passes) where the module docstring's guard holds: ``exp(a)`` stays finite, and
    where it is floored that is below ``eps``'s resolution. Otherwise as the max-shifted
    ``max(a, log eps) + log1p(exp(−|a − log eps|))``.
    """
    info = xp.finfo(a.dtype)
    if a_max < math.log(float(info.max)) - 1.0 and eps >= LOG_EPS_MARGIN * tiny(info) / float(info.eps):
        return xp.log(floored_exp(a, tiny(info), xp) + eps)
    b = full_like(a, math.log(eps), xp)
    return xp.maximum(a, b) + xp.log1p(floored_exp(-xp.abs(a - b), tiny(info), xp))
