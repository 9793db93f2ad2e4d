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
can underflow to 0. The log-space form subtracts log-probabilities of magnitude up to
``|s|/τ``, so its error grows with ``|s|/τ · (dtype eps)``: float32 logits agree with float64 within
8 · u · max|s| · ‖∇_s L‖₁ to first order (u the dtype's unit roundoff; about 1 % of the loss
for logits of 1e4 at τ = 0.05: the bound the tests check), logits of 1e30 give a finite loss
up to 1 % off. The linear-space form is unaffected. The two forms agree to rounding:

- linear space, the reference implementation's arithmetic (max-shifted softmaxes ``p``, ``q``,
  ``target = p / max(Σ_y p, eps)``, ``log((N/C)·q / max(Σ_n q, eps) + eps)``), where the dtype
  resolves what the ``exp`` floors drop (``eps = 1e-12``: always in float64, in float32 while
  ``N/C < 78,000``);
- log space (log-softmaxes and log-sum-exps, each row's maximum subtracted before
  exponentiating so that unclaimed rows do not underflow): ``clamp_sums=False`` or a tiny ``eps``.

Which form each side takes, and the floors of ``exp`` (it never underflows to slow denormal
numbers), are the :class:`~clusterlearn.self_classifier_guards.GuardPlan`, their only home. The
arithmetic itself is :func:`clusterlearn.self_classifier_closed_form.forward`, which this
module's loss records for the framework's autograd and whose gradient is written out there for
the adapters. On PyTorch CPU, denormal numbers in the backward pass of
this module's autograd still cost time; ``torch.set_flush_denormal(True)`` avoids that.

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

import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import array_api_compat as aac

from .backend import namespace
from . import self_classifier_closed_form as closed_form
from .self_classifier_guards import GuardPlan, guard_plan
from .self_classifier_inputs import (
    Gather,
    call_argument,
    check_gather,
    check_head,
    check_logits,
    check_positive,
    compute_dtype,
    parse_logits,
    prepare_heads,
)

Array = Any

__all__ = [
    "SelfClassifierLoss",
    "self_classifier_loss",
    "self_classifier_pair_loss",
    "self_classifier_targets",
    "self_classifier_log_predictions",
    "view_pairs",
    "head_plan",
    "NUM_GLOBAL_VIEWS",
]

#: Views ``0 .. NUM_GLOBAL_VIEWS - 1`` are global crops; pairs of two later (local) views are skipped.
NUM_GLOBAL_VIEWS = 2


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
    check_logits("logits", logits, xp)
    tau = check_positive("col_temperature", col_temperature)
    floor = None if sum_floor is None else check_positive("sum_floor", sum_floor)
    plan = _one_view_plan(logits, xp, col_temperature=tau, eps=floor or 1.0, sum_floor=floor, rows=rows)
    return closed_form.targets(plan, compute_dtype(logits, xp)[None, ...])[0][0, ...]


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
    check_logits("logits", logits, xp)
    tau = check_positive("row_temperature", row_temperature)
    eps = check_positive("eps", eps)
    floor = None if sum_floor is None else check_positive("sum_floor", sum_floor)
    plan = _one_view_plan(logits, xp, row_temperature=tau, eps=eps, sum_floor=floor, rows=rows)
    return closed_form.predictions(plan, compute_dtype(logits, xp)[None, ...])[0][0, ...]


def _one_view_plan(logits: Array, xp: ModuleType, *, sum_floor: float | None, **kwargs: Any) -> GuardPlan:
    """The plan of one view's targets or predictions (the other side's temperature unused)."""
    kwargs = {"row_temperature": 1.0, "col_temperature": 1.0, **kwargs}
    dtype = compute_dtype(logits, xp).dtype
    return guard_plan(
        xp.finfo(dtype), *logits.shape, clamp_sums=sum_floor is not None, sum_floor=sum_floor, pairs=(), **kwargs
    )


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
    row_temperature = check_positive("row_temperature", row_temperature)
    col_temperature = check_positive("col_temperature", col_temperature)
    eps = check_positive("eps", eps)
    heads, names = [[target_logits, pred_logits]], [["target_logits", "pred_logits"]]
    for x, name in zip(heads[0], names[0]):
        if not aac.is_array_api_obj(x):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    floor = eps if clamp_sums else None
    return _loss(heads, names, ((0, 1),), row_temperature, col_temperature, eps, floor, None, True)


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
    row_temperature = check_positive("row_temperature", row_temperature)
    col_temperature = check_positive("col_temperature", col_temperature)
    eps = check_positive("eps", eps)
    check_gather(gather)
    heads, names = parse_logits(logits)
    floor = eps if clamp_sums else None
    return _loss(
        heads, names, view_pairs(len(heads[0])), row_temperature, col_temperature, eps, floor,
        gather, check_finite,
    )


def head_plan(
    views: Sequence[Array],
    rows: slice | None = None,
    *,
    row_temperature: float = 0.1,
    col_temperature: float = 0.05,
    eps: float = 1e-12,
    clamp_sums: bool = True,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> tuple[list[Array], GuardPlan]:
    """The first step of every executor of one head's loss (the core's, the adapters' closed
    form and fused kernel): check the head, bring it to one dtype, build its guard plan.

    Parameters
    ----------
    views : sequence of K arrays of shape (N, C), real floating
        The head's (gathered) views; checked with :func:`~clusterlearn.self_classifier_inputs.check_head`.
    rows : slice, optional
        This process's rows of a gathered global batch (all rows by default).
    row_temperature, col_temperature, eps, clamp_sums
        As in :class:`SelfClassifierLoss` (checked).
    pairs : sequence of (int, int), optional
        The ordered (target, prediction) view pairs; :func:`view_pairs` ``(K)`` by default.

    Returns
    -------
    views : list of K arrays of shape (N, C)
        In the dtype the loss computes in: the views' promoted dtype, float32 for half precision.
    plan : GuardPlan
        The head's :class:`~clusterlearn.self_classifier_guards.GuardPlan`.
    """
    xp = check_head(views, rows)
    full = [compute_dtype(x, xp) for x in views]
    dtype = xp.result_type(*full)
    full = [xp.astype(x, dtype, copy=False) for x in full]
    plan = guard_plan(
        xp.finfo(dtype), *full[0].shape,
        row_temperature=check_positive("row_temperature", row_temperature),
        col_temperature=check_positive("col_temperature", col_temperature),
        eps=check_positive("eps", eps), clamp_sums=bool(clamp_sums),
        pairs=tuple(view_pairs(len(full)) if pairs is None else pairs), rows=rows,
    )
    return full, plan


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
    xp, prepared = prepare_heads(heads, names, gather, check_finite)
    total = None
    for views, rows in prepared:
        full, plan = head_plan(
            views, rows, row_temperature=row_temperature, col_temperature=col_temperature, eps=eps,
            clamp_sums=sum_floor is not None, pairs=pairs,
        )
        term = closed_form.forward(plan, xp.stack(full))[0]  # recorded by the framework's autograd
        total = term if total is None else total + term
    out = total / len(heads)
    if aac.is_numpy_array(out):  # NumPy reductions return scalars: return a 0-d array
        out = xp.asarray(out)
    return out


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
    gather : callable, optional, keyword-only
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

    #: The constructor's parameters, in the order :meth:`__repr__` shows them.
    parameters: tuple[str, ...] = ("row_temperature", "col_temperature", "eps", "gather", "check_finite", "clamp_sums")

    def __init__(
        self,
        row_temperature: float = 0.1,
        col_temperature: float = 0.05,
        eps: float = 1e-12,
        *args: Gather | None,
        gather: Gather | None = None,
        check_finite: bool = True,
        clamp_sums: bool = True,
    ) -> None:
        if args:  # the form before 0.2: gather as the fourth positional argument
            if len(args) > 1 or gather is not None:
                raise TypeError("SelfClassifierLoss takes gather once, as a keyword argument")
            warnings.warn(
                "passing gather as the fourth positional argument of SelfClassifierLoss is deprecated "
                "and will be removed in the next release; pass gather=... instead",
                DeprecationWarning,
                stacklevel=2,
            )
            gather = args[0]
        self.row_temperature = check_positive("row_temperature", row_temperature)
        self.col_temperature = check_positive("col_temperature", col_temperature)
        self.eps = check_positive("eps", eps)
        self.gather = check_gather(gather)
        self.check_finite = bool(check_finite)
        self.clamp_sums = bool(clamp_sums)

    def __call__(self, *logits: Any) -> Array:
        """Loss of ``criterion(s1, s2, ...)``, ``criterion([views])`` or ``criterion([[head views], ...])``."""
        return self.forward(*logits)

    def settings(self) -> dict[str, Any]:
        """The constructor's parameters (:attr:`parameters`) and their values: the keyword
        arguments of the loss function this object calls."""
        return {name: getattr(self, name) for name in self.parameters}

    def forward(self, *logits: Any) -> Array:
        """The loss of a call's arguments, by :func:`self_classifier_loss` (the adapters' losses
        call their own executors with the same :meth:`settings`)."""
        return self_classifier_loss(call_argument(logits), **self.settings())

    def __repr__(self) -> str:
        def show(name: str) -> str:
            value = getattr(self, name)
            if name == "gather" and callable(value):
                return getattr(value, "__name__", repr(value))
            return repr(value)

        return f"{type(self).__name__}({', '.join(f'{name}={show(name)}' for name in self.parameters)})"
