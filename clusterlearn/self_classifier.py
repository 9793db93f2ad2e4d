"""Self-Classifier loss (Amrani et al., ECCV 2022): stable, multi-view, multi-head, global batch.

Amrani, Karlinsky, Bronstein, "Self-Supervised Classification Network" (arXiv 2103.10994). For logits ``s`` of shape ``(N, C)`` (N
samples, C classes) and temperatures ``τ_row`` (0.1) and ``τ_col`` (0.05)::

    target(s)[n, y] = p(x_n | y) / Σ_ỹ p(x_n | ỹ)          p(x|y) = softmax over dim 0 of s / τ_col
    pred(s)[n, y]   = p(y | x_n) / Σ_m p(y | x_m)           p(y|x) = softmax over dim 1 of s / τ_row
    ℓ(s_t, s_p)     = −(1/N) Σ_n Σ_y target(s_t)[n, y] · log((N/C) · pred(s_p)[n, y] + eps)

and for two views ``L = ½ (ℓ(s2, s1) + ℓ(s1, s2))`` (target from one view, prediction from
the other).

``eps`` is part of the objective, as in the reference's training (``eps = 1e-12``): it is
added inside the log, which bounds the loss by ``−log(eps)``, and (``clamp_sums=True``, the
default) the two L1 normalisations divide by ``max(sum, eps)`` as the reference implementation
does. ``clamp_sums=False`` divides by the exact sums instead (the formula above read
literally). The two differ only where a sum falls below ``eps``, which is common at
``τ_col = 0.05`` with peaked logits:

- a class whose row-softmax mass over the batch is below ``eps`` (a "dead" class) gets
  ``pred ≈ 0`` (log ≈ ``log eps``) when clamped, but a full distribution over the samples when
  exact; a collapsed batch (N=64, C=8, every sample +3 on class 0, −3 elsewhere) scores 24.38
  clamped (the reference's value) but only ``log 8 = 2.08`` exact;
- a sample that no class claims (its row of the column softmax sums below ``eps``) is
  down-weighted to ``sum/eps`` (0 once float32 underflows, as in the reference) when clamped,
  but keeps a full-weight target row when exact. On standard-normal logits (N=16, C=10) the
  loss is 14.55 clamped and 14.77 exact;
- the exact loss is invariant to repeating the batch (``[s; s]``); the clamped one only while
  no sum falls below ``eps``.

Numerics
--------
Logits of any finite magnitude give a finite loss and finite gradients: every softmax is
max-shifted (before dividing by τ, which can overflow) and no log is taken of a quantity that
can underflow to 0. The log-space form below subtracts log-probabilities of magnitude up to
``|s|/τ``, so its error grows with ``|s|/τ · (dtype eps)``: float32 logits agree with float64 within
8 · u · max|s| · ‖∇_s L‖₁ to first order (u the dtype's unit roundoff; about 1 % of the loss
for logits of 1e4 at τ = 0.05: the bound the tests check), logits of 1e30 give a finite loss
up to 1 % off. The linear-space form is unaffected. The quantity above is computed in one of
two ways, equal to rounding:

- in log space (``clamp_sums=False``, or an ``eps`` too small for the dtype to resolve what
  underflows below it: in float32 roughly ``eps < 4e-15 · sqrt(N/C)``)::

      log_q                 = log_softmax(s/τ_row, dim 1)                          # log p(y|x)
      log pred              = log_q − logsumexp_dim0(log_q)        (clamped: − max(logsumexp_dim0(log_q), log eps))
      log((N/C)·pred + eps) = logaddexp(log(N/C) + log pred, log eps)
      log p(x|y)            = log_softmax(s/τ_col, dim 0)
      target                = exp(log p(x|y) − logsumexp_dim1(log p(x|y)))   (clamped: − max(..., log eps))

  with the row maximum subtracted before exponentiating, so unclaimed rows do not underflow;
- in linear space for the clamped loss when ``eps`` resolves (``eps = 1e-12``: always in
  float64, in float32 while ``N/C < 78,000``): ``target = p / max(Σ_y p, eps)`` and ``log((N/C)·q / max(Σ_n q, eps) + eps)``
  with max-shifted softmaxes ``p``, ``q``, i.e. the reference implementation's arithmetic. The
  log's argument is at least ``eps``, and entries of ``p`` or ``q`` that underflow change it
  by less than ``eps · (dtype eps) / 16`` (the guards in the code check this from ``N``, ``C``,
  ``eps`` and the dtype), so it equals the log-space value to rounding with 2 instead of 5
  full-size ``exp`` per view.

``exp`` results are floored at 8 × the dtype's smallest normal number (negligible next to the
sums or ``eps`` they enter): underflowing and denormal ``exp`` is 10-30 times slower on CPUs.
On PyTorch CPU, denormal numbers in the backward pass still cost time;
``torch.set_flush_denormal(True)`` avoids that.

Nothing is detached: gradients flow through the targets as well as the predictions. (The
maximum subtracted inside a log-sum-exp cancels exactly and has no gradient; on PyTorch it is
detached, as ``torch.logsumexp`` does internally, which changes no gradient.)

The module uses only the Python array API standard through ``array_api_compat`` (no framework
import), so the same code runs eagerly on NumPy, array-api-strict, PyTorch (with autograd),
JAX (under ``jax.grad`` and ``jax.jit``) and CuPy.

Views and heads
---------------
A call receives the logits of one or more classification heads, each for ``V >= 2`` views of
the same batch. Views ``0`` and ``1`` are *global* crops and views ``2, 3, ...`` are *local*
crops (multi-crop). The loss of one head is the mean of ``ℓ(view i → target, view j →
prediction)`` over the ordered pairs (see :func:`view_pairs`)::

    {(i, j) : 0 <= i, j < V, i != j, and not (i >= 2 and j >= 2)}

i.e. every ordered pair of distinct views except local-local pairs: ``4V − 6`` terms (for
``V = 2`` the two terms of the symmetric loss above). With several heads the loss is the mean
over all ``(head, pair)`` terms; every head must have the same number of views, so this is
also the mean over heads of each head's loss.

Global batch (data parallelism)
-------------------------------
The column softmax and the column normalisation run over *samples*, so under data parallelism
they must see the global batch. Pass ``gather``: a callable applied to every logits array
(each head, each view) that returns ``(global_logits, rows)``, where ``global_logits`` has
shape ``(N_global, C)`` and contains this process's logits, and ``rows`` is a Python ``slice``
such that ``global_logits[rows]`` are this process's rows (the same slice for every view of
a head). Targets and predictions are computed on the global batch (``N = N_global`` in
``N/C``) and the loss is the mean over this process's rows only, so that the mean of the
per-process losses over processes is the global-batch loss (with unequal local batches, weight
process ``r`` by ``n_r / N_global``). For correct gradients the
gather's backward must **sum** (all-reduce) the incoming gradient over processes and return
this process's slice; the data-parallel wrapper's usual averaging of parameter gradients over
processes then yields the gradient of the global-batch loss. A plain all-gather without
gradient is wrong (it drops the other processes' contributions).

Without ``gather`` (the default, identity) each process computes the loss of its *local*
batch: the column softmax and normalisation see only the local samples and ``N/C`` uses the
local ``N``. Under data parallelism that is a different objective from the global-batch loss,
not an approximation of its value or of its gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from types import ModuleType
from typing import Any

import array_api_compat as aac

from .backend import namespace, unsupported_torch_dtype
from .validation import all_finite, check_same_device

Array = Any
Gather = Callable[[Array], "tuple[Array, slice]"]

__all__ = [
    "SelfClassifierLoss",
    "self_classifier_loss",
    "self_classifier_pair_loss",
    "self_classifier_targets",
    "self_classifier_log_predictions",
    "view_pairs",
    "NUM_GLOBAL_VIEWS",
]

#: Views ``0 .. NUM_GLOBAL_VIEWS - 1`` are global crops; pairs of two later (local) views are skipped.
NUM_GLOBAL_VIEWS = 2


# --------------------------------------------------------------------------------------------
# Stable primitives the array API standard lacks (max-shifted, plain standard functions only).
# --------------------------------------------------------------------------------------------


def _shift(x: Array, axis: int, xp: ModuleType) -> Array:
    """``max(x, axis, keepdims=True)``, the stabilising shift of a log-sum-exp.

    The shift cancels exactly, so its gradient is zero; where the array type can drop autograd
    history (PyTorch's ``.detach()``, found by duck typing, no import) it is dropped so that
    the backward pass does not spend full passes over ``x`` on the max's zero contribution, as
    ``torch.logsumexp`` does internally. Other arrays (JAX: traced through, zero contribution)
    are returned as is.
    """
    m = xp.max(x, axis=axis, keepdims=True)
    detach = getattr(m, "detach", None)
    return detach() if callable(detach) else m


def _scaled(logits: Array, axis: int, temperature: float, xp: ModuleType) -> Array:
    """``(s − max(s, axis)) / τ``, the max-shifted argument of a softmax along ``axis``.

    Shifted before dividing, because ``s / τ`` overflows where ``s − max`` does not (float32
    logits of 1e38), and floored at ``−(dtype max) / 4 · min(τ, 1)`` before dividing, so that
    no entry becomes −inf: a log-softmax over a line of −inf is NaN. An entry that low has
    ``exp = 0`` either way, so the floor changes no result.
    """
    d = logits - _shift(logits, axis, xp)
    low = -float(xp.finfo(d.dtype).max) / 4 * min(temperature, 1.0)
    return xp.maximum(d, _full_like(d, low, xp)) / temperature


def _tiny(dtype: Any, xp: ModuleType) -> float:
    """``8 ×`` the smallest normal number of ``dtype``: the floor of :func:`_exp`."""
    return 8.0 * float(xp.finfo(dtype).smallest_normal)


def _exp(x: Array, xp: ModuleType) -> Array:
    """``exp(x)`` with results below :func:`_tiny` (8 × the smallest normal number) raised to it.

    Every use adds the result to a max-shifted sum of at least 1 or to ``eps``, or scales it
    by a factor whose guard makes such values negligible, so this changes no result beyond
    rounding. It keeps ``exp`` away from underflowing and denormal results, which are 10-30
    times slower on CPUs, and peaked logits at τ = 0.05 produce many of them.
    """
    low = math.log(_tiny(x.dtype, xp))
    return xp.exp(xp.maximum(x, _full_like(x, low, xp)))


def _logsumexp(x: Array, axis: int, xp: ModuleType) -> Array:
    """``log(sum(exp(x), axis))`` with ``keepdims=True``, shifted by the maximum (finite ``x``)."""
    m = _shift(x, axis, xp)
    return m + xp.log(xp.sum(_exp(x - m, xp), axis=axis, keepdims=True))


def _log_softmax(x: Array, axis: int, xp: ModuleType) -> Array:
    """``log(softmax(x, axis))`` as ``(x − m) − log(sum(exp(x − m)))`` with ``m = max(x, axis)``.

    Subtracting ``m`` first (rather than ``x − logsumexp(x)``) keeps the result accurate when
    ``|x|`` is large (e.g. constant logits of magnitude 1e4 / τ).
    """
    d = x - _shift(x, axis, xp)
    return d - xp.log(xp.sum(_exp(d, xp), axis=axis, keepdims=True))


def _logaddexp(a: Array, b: Array, xp: ModuleType) -> Array:
    """Element-wise ``log(exp(a) + exp(b))`` as ``max(a, b) + log1p(exp(−|a − b|))``."""
    return xp.maximum(a, b) + xp.log1p(_exp(-xp.abs(a - b), xp))


def _logaddexp_eps(a: Array, a_max: float, eps: float, xp: ModuleType) -> Array:
    """``logaddexp(a, log eps)`` for ``a <= a_max`` (a Python bound known in advance).

    When ``exp(a_max)`` cannot overflow and ``eps >= 16 · _tiny / (dtype eps)``,
    ``log(exp(a) + eps)`` is exact to rounding: ``exp(a)`` stays finite, and where it is
    floored at ``_tiny`` that is below ``eps``'s resolution. That takes 4 passes instead of 8.
    Otherwise the max-shifted form is used.
    """
    info = xp.finfo(a.dtype)
    if a_max < math.log(float(info.max)) - 1.0 and eps >= 16 * _tiny(a.dtype, xp) / float(info.eps):
        return xp.log(_exp(a, xp) + eps)
    return _logaddexp(a, _full_like(a, math.log(eps), xp), xp)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_logits(name: str, x: Array, xp: ModuleType, *, min_rows: int = 2) -> None:
    """Shape and dtype checks (static: safe under ``jax.jit``)."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N samples, C classes) array, got shape {tuple(x.shape)}")
    if not xp.isdtype(x.dtype, "real floating") or unsupported_torch_dtype(x):
        raise TypeError(f"{name} must have a real floating dtype (float16 or wider), got {x.dtype}")
    n, c = x.shape
    if n is None or c is None:
        raise ValueError(f"{name} must have a known shape, got {tuple(x.shape)}")
    if n < min_rows:
        raise ValueError(
            f"{name} must have at least {min_rows} rows (samples), got N={n}: the column softmax "
            "over the samples needs a batch"
        )
    if c < 2:
        raise ValueError(f"{name} must have at least 2 columns (classes), got C={c}")


def _check_finite(name: str, x: Array, xp: ModuleType) -> None:
    """Raise ValueError on NaN/inf; skipped for traced JAX arrays (inside ``jit``), whose values
    are unknown at trace time."""
    try:
        ok = all_finite(x, xp)
    except TypeError:  # jax.errors.ConcretizationTypeError is a TypeError
        if aac.is_jax_array(x):
            return
        raise
    if not ok:
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def _as_float(x: Array, xp: ModuleType) -> Array:
    """Half-precision logits are computed in float32 (``s / τ`` overflows float16)."""
    if xp.finfo(x.dtype).bits < 32:
        return xp.astype(x, xp.float32)
    return x


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def view_pairs(num_views: int) -> tuple[tuple[int, int], ...]:
    """Ordered ``(target view, prediction view)`` pairs averaged by the multi-view loss.

    Views ``0`` and ``1`` are global, the others local; a pair is kept when its two views
    differ and at least one of them is global::

        {(i, j) : i != j and not (i >= 2 and j >= 2)}

    Parameters
    ----------
    num_views : int
        Number of views ``V >= 2``.

    Returns
    -------
    tuple of (int, int)
        ``4 V − 6`` pairs ``(i, j)``: the target is computed from view ``i`` and the
        prediction from view ``j``. Ordered by ``i``, then ``j``.

    Examples
    --------
    >>> view_pairs(2)
    ((0, 1), (1, 0))
    >>> len(view_pairs(8))
    26
    """
    if isinstance(num_views, bool) or not isinstance(num_views, int):
        raise TypeError(f"num_views must be an int, got {type(num_views).__name__}")
    if num_views < 2:
        raise ValueError(f"num_views must be >= 2, got {num_views}")
    g = NUM_GLOBAL_VIEWS
    return tuple(
        (i, j)
        for i in range(num_views)
        for j in range(num_views)
        if i != j and not (i >= g and j >= g)
    )


def self_classifier_targets(
    logits: Array,
    col_temperature: float = 0.05,
    *,
    sum_floor: float | None = None,
    rows: slice | None = None,
) -> Array:
    """Targets ``p(x|y)`` normalised per sample: column softmax, then L1-normalised rows.

    Parameters
    ----------
    logits : array of shape (N, C), real floating
        Logits of one view; the column softmax runs over all ``N`` rows.
    col_temperature : float
        ``τ_col > 0``.
    sum_floor : float, optional
        If given, divide each row by ``max(row sum, sum_floor)`` as the reference
        implementation does (``sum_floor = eps``); rows whose column-softmax mass is below the
        floor then sum to less than 1. Exact normalisation if None (the default here).
    rows : slice, optional
        Rows to return (this process's rows of a gathered batch); all rows by default.

    Returns
    -------
    array of shape (n, C), same dtype as ``logits`` (float32 for half precision)
        Non-negative; each row sums to 1 (at most 1 with ``sum_floor``). ``n`` is the number of
        selected rows.
    """
    xp = namespace(logits=logits)
    _check_logits("logits", logits, xp)
    tau = _check_positive("col_temperature", col_temperature)
    floor = None if sum_floor is None else _check_positive("sum_floor", sum_floor)
    return _targets(_as_float(logits, xp), tau, floor, rows, xp)


def _targets(
    logits: Array, col_temperature: float, sum_floor: float | None, rows: slice | None, xp: ModuleType
) -> Array:
    z = _scaled(logits, 0, col_temperature, xp)
    resolution = float(xp.finfo(z.dtype).eps) / 1024
    if sum_floor is not None and z.shape[1] * _tiny(z.dtype, xp) / sum_floor <= resolution:
        # p / max(sum(p), floor) directly: an entry of p below _tiny changes the target by
        # less than _tiny / floor, and a whole row by less than (dtype eps)/1024, so this
        # equals the log-space value to rounding (1 exp, not 2).
        e = _exp(z, xp)
        p = e / xp.sum(e, axis=0, keepdims=True)  # column softmax p(x | y) over all N samples
        if rows is not None:
            p = p[rows, :]
        total = xp.sum(p, axis=1, keepdims=True)
        return p / xp.maximum(total, _full_like(total, sum_floor, xp))
    log_p = _log_softmax(z, 0, xp)  # log p(x | y): column log-softmax over the samples
    if rows is not None:
        log_p = log_p[rows, :]
    # Row L1 normalisation of exp(log_p), shifted by the row maximum m so no row underflows:
    # p / sum(p) = e / sum(e) with e = exp(log_p - m).
    m = _shift(log_p, 1, xp)  # cancels below in both branches
    e = _exp(log_p - m, xp)
    total = xp.sum(e, axis=1, keepdims=True)
    if sum_floor is None:
        return e / total
    # p / max(sum(p), floor) = e * exp(m - max(m + log sum(e), log floor)); the exponent is <= 0.
    log_floor = _full_like(m, math.log(sum_floor), xp)
    return e * xp.exp(m - xp.maximum(m + xp.log(total), log_floor))


def _full_like(x: Array, value: float, xp: ModuleType) -> Array:
    """0-d array holding ``value`` with ``x``'s dtype and device."""
    return xp.asarray(value, dtype=x.dtype, device=aac.device(x))


def self_classifier_log_predictions(
    logits: Array,
    row_temperature: float = 0.1,
    eps: float = 1e-12,
    *,
    sum_floor: float | None = None,
    rows: slice | None = None,
) -> Array:
    """``log((N/C) · pred + eps)`` where ``pred`` is the row softmax L1-normalised per column.

    Parameters
    ----------
    logits : array of shape (N, C), real floating
        Logits of one view; the column normalisation runs over all ``N`` rows and ``N/C``
        uses this ``N``.
    row_temperature : float
        ``τ_row > 0``.
    eps : float
        ``eps > 0`` added inside the log; the result is ``>= log(eps)``.
    sum_floor : float, optional
        If given, divide each column by ``max(column sum, sum_floor)`` as the reference
        implementation does (``sum_floor = eps``). Exact normalisation if None (the default
        here).
    rows : slice, optional
        Rows to return (this process's rows of a gathered batch); all rows by default.

    Returns
    -------
    array of shape (n, C), same dtype as ``logits`` (float32 for half precision)
        Computed as ``logaddexp(log(N/C) + log pred, log eps)`` with
        ``log pred = log_softmax(s/τ_row, 1) − logsumexp_0(log_softmax(s/τ_row, 1))`` (the
        ``logsumexp`` floored at ``log(sum_floor)`` if given).
    """
    xp = namespace(logits=logits)
    _check_logits("logits", logits, xp)
    tau = _check_positive("row_temperature", row_temperature)
    eps = _check_positive("eps", eps)
    floor = None if sum_floor is None else _check_positive("sum_floor", sum_floor)
    return _log_predictions(_as_float(logits, xp), tau, eps, floor, rows, xp)


def _log_predictions(
    logits: Array,
    row_temperature: float,
    eps: float,
    sum_floor: float | None,
    rows: slice | None,
    xp: ModuleType,
) -> Array:
    n_global, n_classes = logits.shape
    z = _scaled(logits, 1, row_temperature, xp)
    tiny, resolution = _tiny(z.dtype, xp), float(xp.finfo(z.dtype).eps) / 16
    if (
        sum_floor is not None
        and (n_global / n_classes) * tiny / sum_floor / eps <= resolution
        and n_global * tiny / sum_floor <= resolution
    ):
        # Clamped and eps well above the dtype's resolution: log((N/C)·q/max(Q, floor) + eps)
        # directly. Entries of q below _tiny change the log's argument by less than
        # eps·(dtype eps)/16 and the column sums Q by less than floor·(dtype eps)/16, so this
        # equals the log-space value to rounding, and it is finite for any finite logits (the
        # log's argument is >= eps). 1 exp + 1 log instead of 3 exp + 3 log.
        e = _exp(z, xp)
        q = e / xp.sum(e, axis=1, keepdims=True)  # p(y | x)
        scale = (n_global / n_classes) / xp.maximum(
            xp.sum(q, axis=0, keepdims=True), _full_like(q, sum_floor, xp)
        )
        if rows is not None:
            q = q[rows, :]
        return xp.log(q * scale + eps)
    log_q = _log_softmax(z, 1, xp)  # log p(y | x)
    if sum_floor is None:
        log_pred = _log_softmax(log_q, 0, xp)  # log_q − logsumexp over the samples (dim 0)
    else:
        log_norm = _logsumexp(log_q, 0, xp)  # log of the column sums over the samples
        log_norm = xp.maximum(log_norm, _full_like(log_norm, math.log(sum_floor), xp))
        log_pred = log_q - log_norm
    if rows is not None:
        log_pred = log_pred[rows, :]
    # log pred <= 0, so a = log(N/C) + log pred <= log(N/C).
    log_ratio = math.log(n_global / n_classes)
    return _logaddexp_eps(log_pred + log_ratio, log_ratio, eps, xp)


def _pair_term(target: Array, log_pred: Array, xp: ModuleType) -> Array:
    """``−(1/n) Σ_n Σ_y target · log_pred`` for (n, C) arrays."""
    return -xp.sum(target * log_pred) / target.shape[0]


def self_classifier_pair_loss(
    target_logits: Array,
    pred_logits: Array,
    *,
    row_temperature: float = 0.1,
    col_temperature: float = 0.05,
    eps: float = 1e-12,
    clamp_sums: bool = True,
) -> Array:
    """One ordered term ``ℓ(target from target_logits, prediction from pred_logits)``.

    Parameters
    ----------
    target_logits, pred_logits : arrays of shape (N, C), real floating, same namespace
        Logits of two views of the same ``N`` samples (row ``n`` of both is sample ``n``).
    row_temperature, col_temperature, eps, clamp_sums
        As in :class:`SelfClassifierLoss`.

    Returns
    -------
    0-d array, dtype of the logits
        ``−(1/N) Σ_n Σ_y target[n, y] · log((N/C) pred[n, y] + eps)``; the symmetric two-view
        loss is ``(pair(s2, s1) + pair(s1, s2)) / 2``.
    """
    row_temperature = _check_positive("row_temperature", row_temperature)
    col_temperature = _check_positive("col_temperature", col_temperature)
    eps = _check_positive("eps", eps)
    heads, names = [[target_logits, pred_logits]], [["target_logits", "pred_logits"]]
    for x, name in zip(heads[0], names[0]):
        if not aac.is_array_api_obj(x):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    floor = eps if clamp_sums else None
    return _loss(heads, names, ((0, 1),), row_temperature, col_temperature, eps, floor, None, True)


def _is_seq(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def _parse(logits: Any) -> tuple[list[list[Array]], list[list[str]]]:
    """Normalise a sequence of views or a sequence of heads to ``heads[h][v]`` plus names."""
    if aac.is_array_api_obj(logits):
        raise ValueError("need at least 2 views, got a single logits array")
    if not _is_seq(logits):
        raise TypeError(f"logits must be a list/tuple of views or of heads, got {type(logits).__name__}")
    items = list(logits)
    if not items:
        raise ValueError("logits is empty: pass at least two views")
    if all(_is_seq(h) for h in items):
        heads = [list(h) for h in items]
        names = [[f"logits[{h}][{v}]" for v in range(len(views))] for h, views in enumerate(heads)]
    elif not any(_is_seq(h) for h in items):
        heads = [items]
        names = [[f"logits[{v}]" for v in range(len(items))]]
    else:
        raise TypeError(
            "logits mixes arrays and lists: pass either a list of views (arrays) for one head, "
            "or a list of heads, each a list of views"
        )
    for h, views in enumerate(heads):
        for v, x in enumerate(views):
            if not aac.is_array_api_obj(x):
                raise TypeError(f"{names[h][v]} must be an array, got {type(x).__name__}")
        if len(views) < 2:
            where = "" if len(heads) == 1 else f" (head {h})"
            raise ValueError(f"need at least 2 views per head{where}, got {len(views)}")
    counts = {len(views) for views in heads}
    if len(counts) > 1:
        raise ValueError(
            f"every head must have the same number of views, got {[len(v) for v in heads]}"
        )
    return heads, names


def _gathered(
    name: str, x: Array, gather: Gather, xp: ModuleType
) -> tuple[Array, slice]:
    out = gather(x)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"gather must return a tuple (global_logits, rows), got {type(out).__name__} for {name}"
        )
    g, rows = out
    if not aac.is_array_api_obj(g) or aac.array_namespace(g) is not xp:
        raise TypeError(f"gather must return an array of the logits' namespace for {name}, got {type(g).__name__}")
    if not isinstance(rows, slice):
        raise TypeError(f"gather must return a slice of this process's rows for {name}, got {type(rows).__name__}")
    _check_logits(f"gather({name})", g, xp)
    if g.shape[1] != x.shape[1]:
        raise ValueError(f"gather({name}) has {g.shape[1]} columns, {name} has {x.shape[1]}")
    if len(range(*rows.indices(g.shape[0]))) != x.shape[0]:
        raise ValueError(
            f"gather({name}) returned rows={rows} selecting "
            f"{len(range(*rows.indices(g.shape[0])))} of {g.shape[0]} rows, expected {x.shape[0]} "
            f"(the rows of {name})"
        )
    return g, rows


def self_classifier_loss(
    logits: Sequence[Array] | Sequence[Sequence[Array]],
    *,
    row_temperature: float = 0.1,
    col_temperature: float = 0.05,
    eps: float = 1e-12,
    gather: Gather | None = None,
    check_finite: bool = True,
    clamp_sums: bool = True,
) -> Array:
    """Self-Classifier loss over views and heads (the function behind :class:`SelfClassifierLoss`).

    Parameters
    ----------
    logits : list of arrays, or list of lists of arrays
        Either the views of one head, ``[v0, v1, ...]``, or several heads, each a list of
        views: ``[[h0v0, h0v1, ...], [h1v0, h1v1, ...], ...]``. An element that is a list or
        tuple is a head, an array is a view; mixing both is an error. Within a head every view
        has the same shape ``(N, C)`` (row ``n`` is sample ``n`` in all views), a real floating
        dtype, and ``N >= 2``, ``C >= 2``; heads may differ in ``C``. Every head has the same
        number of views ``V >= 2``; views 0, 1 are global, the others local.
    row_temperature : float, default 0.1
        ``τ_row > 0`` of the row softmax ``p(y|x)`` (predictions).
    col_temperature : float, default 0.05
        ``τ_col > 0`` of the column softmax ``p(x|y)`` (targets).
    eps : float, default 1e-12
        ``eps > 0`` inside ``log((N/C)·pred + eps)``; part of the objective (the loss is at most
        ``−log(eps)``).
    gather : callable, optional
        ``gather(local_logits) -> (global_logits, rows)``, see the module docstring. Identity
        (local batch only) by default.
    check_finite : bool, default True
        Raise ValueError if a (gathered) logits array holds NaN or inf. The check reads the
        values (a device synchronisation on GPUs) and is skipped inside ``jax.jit``.
    clamp_sums : bool, default True
        Divide both L1 normalisations by ``max(sum, eps)`` as the reference implementation
        does (True), or by the exact sums (False); see the module docstring.

    Returns
    -------
    0-d array of the logits' namespace and (promoted) dtype; float32 for half precision
        Mean of :func:`self_classifier_pair_loss`-terms over every head and every pair of
        :func:`view_pairs`, each term averaged over this process's rows.

    Raises
    ------
    TypeError
        Arrays from different namespaces, non-floating dtypes, malformed ``logits`` or
        ``gather`` output; the message names the argument.
    ValueError
        Shapes that differ between the views of a head, logits on different devices,
        ``N < 2``, ``C < 2``, non-2-D logits, fewer than 2 views, non-finite logits,
        temperatures or ``eps`` not > 0.
    """
    row_temperature = _check_positive("row_temperature", row_temperature)
    col_temperature = _check_positive("col_temperature", col_temperature)
    eps = _check_positive("eps", eps)
    if gather is not None and not callable(gather):
        raise TypeError(f"gather must be callable or None, got {type(gather).__name__}")
    heads, names = _parse(logits)
    floor = eps if clamp_sums else None
    return _loss(
        heads, names, view_pairs(len(heads[0])), row_temperature, col_temperature, eps, floor,
        gather, check_finite,
    )


def _check_head(views: Sequence[Array], rows: slice | None) -> ModuleType:
    """Check the K views of one head for the adapters' per-head losses; return their namespace.

    ``rows`` not None (a gathered global batch) allows a single row per process.
    """
    named = {f"logits[{v}]": x for v, x in enumerate(views)}
    xp = namespace(**named)
    check_same_device(**named)
    if len(views) < 2:
        raise ValueError(f"need at least 2 views, got {len(views)}")
    for v, x in enumerate(views):
        _check_logits(f"logits[{v}]", x, xp, min_rows=1 if rows is not None else 2)
        if tuple(x.shape) != tuple(views[0].shape):
            raise ValueError(
                f"views of one head must have the same shape, got {tuple(views[0].shape)} and {tuple(x.shape)}"
            )
    if rows is not None:
        n = views[0].shape[0]
        if not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice, got {type(rows).__name__}")
        if len(range(*rows.indices(n))) == 0:
            raise ValueError(f"rows must select at least one of the {n} rows, got {rows}")
    return xp


def _prepare(
    heads: list[list[Array]],
    names: list[list[str]],
    gather: Gather | None,
    check_finite: bool,
) -> tuple[ModuleType, list[tuple[list[Array], slice | None]]]:
    """Check every head's views, gather them, and return ``(xp, [(views, rows), ...])``.

    ``views`` are the (gathered, finiteness-checked) logits of one head, in their own dtype;
    ``rows`` is the slice of this process's rows in them (None: all rows). Shared by the core
    and the adapters' fast losses, so that all raise the same errors.
    """
    named = {names[h][v]: x for h, views in enumerate(heads) for v, x in enumerate(views)}
    xp = namespace(**named)
    check_same_device(**named)

    min_rows = 1 if gather is not None else 2
    for views, labels in zip(heads, names):
        for x, name in zip(views, labels):
            _check_logits(name, x, xp, min_rows=min_rows)
        shape = tuple(views[0].shape)
        for x, name in zip(views[1:], labels[1:]):
            if tuple(x.shape) != shape:
                raise ValueError(
                    f"views of one head must have the same shape: {labels[0]} has {shape}, "
                    f"{name} has {tuple(x.shape)}"
                )

    prepared = []
    for views, labels in zip(heads, names):
        rows: slice | None = None
        full: list[Array] = []
        for x, name in zip(views, labels):
            if gather is not None:
                g, r = _gathered(name, x, gather, xp)
                n_g = g.shape[0]
                if rows is not None and rows.indices(n_g) != r.indices(n_g):
                    raise ValueError(
                        f"gather returned different rows for the views of one head: {rows} and "
                        f"{r} (for {name})"
                    )
                if full and tuple(g.shape) != tuple(full[0].shape):
                    raise ValueError(
                        f"gather returned different shapes for the views of one head: "
                        f"{tuple(full[0].shape)} and {tuple(g.shape)} (for {name})"
                    )
                rows = r
                x, name = g, f"gather({name})"
            if check_finite:
                _check_finite(name, x, xp)
            full.append(x)
        if rows is not None and rows.indices(full[0].shape[0]) == slice(None).indices(full[0].shape[0]):
            rows = None  # whole batch: skip the no-op slice
        prepared.append((full, rows))
    return xp, prepared


def _loss(
    heads: list[list[Array]],
    names: list[list[str]],
    pairs: Sequence[tuple[int, int]],
    row_temperature: float,
    col_temperature: float,
    eps: float,
    sum_floor: float | None,
    gather: Gather | None,
    check_finite: bool,
) -> Array:
    """Validated parameters; checks the arrays, then averages the pair terms over heads."""
    xp, prepared = _prepare(heads, names, gather, check_finite)
    total = None
    for views, rows in prepared:
        full = [_as_float(x, xp) for x in views]
        used_t = sorted({i for i, _ in pairs})
        used_p = sorted({j for _, j in pairs})
        targets = {i: _targets(full[i], col_temperature, sum_floor, rows, xp) for i in used_t}
        log_preds = {
            j: _log_predictions(full[j], row_temperature, eps, sum_floor, rows, xp) for j in used_p
        }
        for i, j in pairs:
            term = _pair_term(targets[i], log_preds[j], xp)
            total = term if total is None else total + term
    out = total / (len(pairs) * len(heads))
    if aac.is_numpy_array(out):  # NumPy reductions return scalars: return a 0-d array
        out = xp.asarray(out)
    return out


def _call_argument(logits: tuple[Any, ...]) -> Any:
    """The ``logits`` argument from a loss object's positional arguments.

    ``criterion(v0, v1, ...)`` (two or more arrays) or ``criterion(views_or_heads)`` (one list).
    """
    if len(logits) == 1:
        return logits[0]
    if len(logits) >= 2:
        if not all(aac.is_array_api_obj(x) for x in logits):
            raise TypeError(
                "pass either two or more view arrays as positional arguments, or a single "
                "list of views / list of heads"
            )
        return list(logits)
    raise ValueError("need at least 2 views, got none")


class SelfClassifierLoss:
    """Self-Classifier loss: a callable over two or more views and one or more heads.

    Parameters
    ----------
    row_temperature : float, default 0.1
        ``τ_row > 0`` of the row softmax ``p(y|x)`` (predictions).
    col_temperature : float, default 0.05
        ``τ_col > 0`` of the column softmax ``p(x|y)`` (targets).
    eps : float, default 1e-12
        ``eps > 0`` inside ``log((N/C)·pred + eps)``, as in the reference's training; part of
        the objective, it bounds the loss by ``−log(eps)``.
    gather : callable, optional
        ``gather(local_logits) -> (global_logits, rows)``: returns the global batch of
        ``local_logits`` (shape ``(N_global, C)``) and the ``slice`` of this process's rows in
        it; applied to every logits array. Its backward must all-reduce (sum) the gradient and
        return this process's slice. The default (identity) uses the local batch only, which
        under data parallelism is a *different loss* (the column softmax and normalisation
        see only the local samples). See the module docstring.
    check_finite : bool, default True
        Raise ValueError on NaN/inf logits (reads the values; skipped inside ``jax.jit``).
    clamp_sums : bool, default True
        Divide both L1 normalisations by ``max(sum, eps)`` like the reference implementation
        and its training (True), or by the exact sums (False). They differ only where a sum
        falls below ``eps`` (dead classes, unclaimed samples); see the module docstring.

    Notes
    -----
    Call forms:

    ``criterion(s1, s2)``
        Two views ``(N, C)``: ``½ (ℓ(s2 → target, s1 → prediction) + ℓ(s1 → target, s2 →
        prediction))``.
    ``criterion(s0, s1, s2, ...)`` or ``criterion([s0, s1, s2, ...])``
        ``V >= 2`` views of one head; views 0, 1 global, 2.. local. Mean over the ``4V − 6``
        ordered pairs ``(i, j)``, ``i != j``, not both local (:func:`view_pairs`).
    ``criterion([[h0v0, h0v1, ...], [h1v0, h1v1, ...], ...])``
        Several heads (a list whose elements are lists or tuples), each with the same number of
        views; mean over all ``(head, pair)`` terms = mean over heads.

    The result is a 0-d array of the logits' namespace; with PyTorch tensors that require
    gradients, or under ``jax.grad``, it is differentiable (nothing is detached).

    Examples
    --------
    >>> import numpy as np
    >>> criterion = SelfClassifierLoss()
    >>> s = np.zeros((4, 3))
    >>> bool(np.isclose(criterion(s, s), np.log(3)))
    True
    """

    def __init__(
        self,
        row_temperature: float = 0.1,
        col_temperature: float = 0.05,
        eps: float = 1e-12,
        gather: Gather | None = None,
        *,
        check_finite: bool = True,
        clamp_sums: bool = True,
    ) -> None:
        self.row_temperature = _check_positive("row_temperature", row_temperature)
        self.col_temperature = _check_positive("col_temperature", col_temperature)
        self.eps = _check_positive("eps", eps)
        if gather is not None and not callable(gather):
            raise TypeError(f"gather must be callable or None, got {type(gather).__name__}")
        self.gather = gather
        self.check_finite = bool(check_finite)
        self.clamp_sums = bool(clamp_sums)

    #: The function computing the loss (an adapter's subclass swaps in its fast one).
    _loss_function = staticmethod(self_classifier_loss)

    def __call__(self, *logits: Any) -> Array:
        """Loss of ``criterion(s1, s2, ...)``, ``criterion([views])`` or ``criterion([[head views], ...])``."""
        return self._loss_function(
            _call_argument(logits),
            row_temperature=self.row_temperature,
            col_temperature=self.col_temperature,
            eps=self.eps,
            gather=self.gather,
            check_finite=self.check_finite,
            clamp_sums=self.clamp_sums,
        )

    def __repr__(self) -> str:
        gather = "None" if self.gather is None else getattr(self.gather, "__name__", repr(self.gather))
        return (
            f"{type(self).__name__}(row_temperature={self.row_temperature}, "
            f"col_temperature={self.col_temperature}, eps={self.eps}, gather={gather}, "
            f"check_finite={self.check_finite}, clamp_sums={self.clamp_sums})"
        )
