"""Sample memory: one momentum-updated, L2-normalised feature and one pseudo-label per sample."""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat as aac

from . import backend as B
from .validation import all_finite, check_features, check_int, check_labels, check_real

Array = Any

__all__ = ["SampleMemory", "MemoryUpdate", "l2_normalize", "momentum_update", "merge_duplicates", "merge_sorted_duplicates"]


def l2_normalize(x: Array) -> Array:
    """Rows of ``x`` (B, D) scaled to unit L2 norm; all-zero rows stay zero.

    Each row is first divided by its largest magnitude, so squaring can neither overflow nor
    underflow (float16 rows of norm 1e3, float32 rows of norm 1e20 or 1e-25 all come out
    unit-norm).
    """
    xp = aac.array_namespace(x)
    one = xp.ones((), dtype=x.dtype, device=aac.device(x))
    peak = xp.max(xp.abs(x), axis=1, keepdims=True)
    y = x / xp.where(peak > 0, peak, one)
    norms = xp.sqrt(xp.sum(y * y, axis=1, keepdims=True))
    return y / xp.where(norms > 0, norms, one)


def momentum_update(old: Array, new: Array, momentum: float) -> Array:
    """``normalize(m * normalize(new) + (1 - m) * old)``: the ODC sample-memory rule.

    Parameters
    ----------
    old : (B, D) unit-norm features from the memory
    new : (B, D) fresh features from the network (any norm)
    momentum : weight m in [0, 1] of the *new* feature (0.5 in the paper)

    Returns
    -------
    (B, D) unit-norm rows, dtype of ``old``. Where the blend is exactly zero (a fresh feature
    antipodal to the stored one at m = 0.5, common with D = 1, or a zero fresh feature at
    m = 1) it has no direction: the row keeps ``old``, so the memory never holds a zero row.
    """
    xp = aac.array_namespace(old, new)
    out = l2_normalize(momentum * l2_normalize(new) + (1.0 - momentum) * old)
    return xp.where(xp.all(out == 0, axis=1, keepdims=True), old, out)


def merge_duplicates(indices: Array, features: Array) -> tuple[Array, Array, Array, Array | None]:
    """Sort a batch by sample index and merge the rows of repeated indices.

    A batch gathered from a ``DistributedSampler`` repeats indices to pad the last batch. The
    repeated sample's contribution is the normalised mean of its L2-normalised features; the
    sample is then counted once. Shapes stay (B, ...) (no data-dependent sizes): every copy
    of a repeated index carries the same merged row, and ``first`` marks one copy of each.

    The merged rows are a function of the *multiset* of (index, feature row) pairs, bit for
    bit: the order of the batch does not change a single bit of them (see
    :func:`merge_sorted_duplicates`).

    Parameters
    ----------
    indices : (B,) integer array
    features : (B, D) real floating array

    Returns
    -------
    sorted_indices : (B,) ``indices`` in increasing order (stable)
    merged : (B, D) for every position, the normalised mean of the normalised features of
        all rows with that index (the normalised row itself for an index seen once)
    first : (B,) bool, True at the first position of each distinct index
    lead : (B,) integer array or None, position of each row's first copy (None when no index
        repeats); use it to give all copies the result computed for the first one
    """
    xp = aac.array_namespace(indices, features)
    order = xp.argsort(indices, stable=True)
    s = xp.take(indices, order)
    unit = xp.take(l2_normalize(features), order, axis=0)
    first = xp.concat([xp.ones((1,), dtype=xp.bool, device=aac.device(s)), s[1:] != s[:-1]])
    if bool(xp.all(first)):
        return s, unit, first, None
    merged, lead = merge_sorted_duplicates(s, unit, B.accumulator_dtype(xp, aac.device(features)))
    return s, merged, first, lead


def merge_sorted_duplicates(sorted_indices: Array, unit: Array, acc_dtype: Any) -> tuple[Array, Array]:
    """Merged rows of a batch sorted by index: static shapes, no host syncs (``jax.jit``-able).

    Parameters
    ----------
    sorted_indices : (B,) integer array in increasing order
    unit : (B, D) unit-norm rows, in the order of ``sorted_indices``
    acc_dtype : floating dtype the sums are formed in (float64 where available)

    Returns
    -------
    merged : (B, D) dtype of ``unit``; at every position of an index seen k > 1 times the
        normalised sum of its k rows, elsewhere the row of ``unit`` itself
    lead : (B,) position of the first copy of each row's index (``searchsorted``)

    Exact order independence: the k values of each column of a repeated index are sorted
    before they are summed, and summed by a segmented scan (Hillis-Steele, ceil(log2 B)
    elementwise passes) whose tree depends only on the positions of the index's block, which
    are fixed by the multiset of indices. So any permutation of the batch yields the same
    sequence of floating-point operations on the same operands: the same bits, on every
    backend and device (no atomics, no reduction whose order the library chooses).
    """
    xp = aac.array_namespace(sorted_indices, unit)
    b, d = unit.shape
    lead = xp.searchsorted(sorted_indices, sorted_indices, side="left")
    last = xp.searchsorted(sorted_indices, sorted_indices, side="right") - 1
    # Per column, order the rows by (index, value): value first, then a stable sort by index.
    by_value = xp.argsort(unit, axis=0, stable=True)
    index_of = xp.reshape(xp.take(sorted_indices, xp.reshape(by_value, (-1,))), (b, d))
    order = _take_along_rows(by_value, xp.argsort(index_of, axis=0, stable=True))
    vals = xp.astype(_take_along_rows(unit, order), acc_dtype)
    vals = xp.where(vals == 0, xp.zeros_like(vals), vals)  # -0.0 and 0.0 sort as equals: one sign
    stride = 1
    while stride < b:  # ceil(log2 B) passes: an inclusive scan within each index's block
        same = (sorted_indices[stride:] == sorted_indices[:-stride])[:, None]
        added = xp.where(same, vals[stride:, ...] + vals[:-stride, ...], vals[stride:, ...])
        vals = xp.concat([vals[:stride, ...], added], axis=0)
        stride *= 2
    sums = xp.take(vals, last, axis=0)  # the scan's value at the last row of each block
    merged = xp.astype(l2_normalize(sums), unit.dtype)
    repeated = (last != lead)[:, None]
    return xp.where(repeated, merged, unit), lead


def _take_along_rows(x: Array, order: Array) -> Array:
    """``x[order[i, j], j]`` for (B, D) ``x`` and (B, D) integer ``order`` (flat ``take``)."""
    xp = aac.array_namespace(x, order)
    b, d = x.shape
    cols = xp.arange(d, dtype=order.dtype, device=aac.device(order))
    flat = xp.reshape(order * d + cols[None, :], (-1,))
    return xp.reshape(xp.take(xp.reshape(x, (-1,)), flat), (b, d))


def check_nonzero_rows(x: Array, name: str) -> None:
    """Raise ValueError naming ``name`` and the first row of ``x`` (B, D) that is all zero.

    A zero row has no direction: the memory stores unit vectors only.
    """
    xp = aac.array_namespace(x)
    zero = xp.all(x == 0, axis=1)
    if bool(xp.any(zero)):
        row = int(xp.argmax(xp.astype(zero, xp.int8)))
        raise ValueError(f"{name} has an all-zero row (row {row}, in the memory's dtype), which has no direction to store")


class MemoryUpdate(NamedTuple):
    """What :meth:`SampleMemory.update` wrote, sorted by index (B rows, repeats kept).

    Attributes
    ----------
    indices : (B,) the sample indices written, sorted
    first : (B,) bool, True at one copy of each distinct index
    old : (B, D) their features before the update
    new : (B, D) their features after the update
    lead : (B,) position of each row's first copy (``arange(B)`` without repeats)
    """

    indices: Array
    first: Array
    old: Array
    new: Array
    lead: Array


class SampleMemory:
    """Features and pseudo-labels of every training sample.

    Parameters
    ----------
    num_samples : N, the data set size
    feat_dim : D, the feature dimension
    momentum : weight of the fresh feature in :meth:`update` (0.5 in ODC)
    like : array, optional
        The memory lives in this array's namespace, on its device, with its floating dtype
        (default: NumPy float32).
    device : optional device overriding ``like``'s

    Attributes
    ----------
    features : (N, D) unit-norm rows, floating dtype of ``like`` (float32 by default)
    labels : (N,) default integer dtype of the namespace, values in [0, C)
    """

    def __init__(
        self,
        num_samples: int,
        feat_dim: int,
        *,
        momentum: float = 0.5,
        like: Array | None = None,
        device: Any = None,
    ) -> None:
        self.num_samples = check_int(num_samples, "num_samples", minimum=1)
        self.feat_dim = check_int(feat_dim, "feat_dim", minimum=1)
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0)
        if like is None:
            import array_api_compat.numpy as xp

            dtype = xp.float32
        else:
            xp = B.namespace(like=like)
            dtype = like.dtype if xp.isdtype(like.dtype, "real floating") else xp.float32
            device = aac.device(like) if device is None else device
        self.xp, self.device, self.dtype = xp, device, dtype
        self.features = xp.zeros((self.num_samples, self.feat_dim), dtype=dtype, device=device)
        self.labels = xp.zeros((self.num_samples,), dtype=B.index_dtype(xp, device), device=device)
        self.initialized = False

    @classmethod
    def wrap(cls, features: Array, labels: Array, *, momentum: float = 0.5) -> SampleMemory:
        """An initialised memory holding ``features`` (N, D) and ``labels`` (N,) themselves.

        No copy and no check (the arrays must be unit-norm rows and integer labels of one
        namespace and device): for handing existing arrays to the small-cluster handler.
        """
        xp = B.namespace(features=features, labels=labels)
        self = cls.__new__(cls)
        self.num_samples, self.feat_dim = features.shape
        self.momentum = check_real(momentum, "momentum", low=0.0, high=1.0)
        self.xp, self.device, self.dtype = xp, aac.device(features), features.dtype
        self.set_state(features, labels)
        return self

    def set_state(self, features: Array, labels: Array) -> None:
        """Hold ``features`` (N, D) and ``labels`` (N,) (memory namespace, not checked) as the state."""
        self.features, self.labels, self.initialized = features, labels, True

    # ------------------------------------------------------------------ conversions
    def to_memory(self, x: Array) -> Array:
        """``x`` in the memory's namespace and on its device."""
        return B.convert(x, self.xp, self.device)

    def check_indices(self, indices: Array, name: str = "indices") -> Array:
        """Validate sample indices and return them in the memory's namespace."""
        B.eager_namespace(**{name: indices})
        check_labels(indices, name, upper=self.num_samples)
        return self.xp.astype(self.to_memory(indices), self.labels.dtype)

    # ------------------------------------------------------------------ state changes
    def initialize(self, features: Array, labels: Array) -> None:
        """Set every sample's feature (normalised here) and label.

        features : (N, D) real floating; labels : (N,) integers (range checked by the caller).
        """
        feats = self.xp.astype(l2_normalize(self.to_memory(features)), self.dtype)
        check_nonzero_rows(feats, "features")
        self.features = feats
        self.labels = self.xp.astype(self.to_memory(labels), self.labels.dtype)
        self.initialized = True

    def update(self, indices: Array, features: Array) -> MemoryUpdate:
        """Momentum-update the features of a batch (memory namespace, validated inputs).

        Repeated indices are merged first (:func:`merge_duplicates`); all outputs keep the
        batch's length B, sorted by index, copies of a repeated index carrying equal rows.
        Returns a :class:`MemoryUpdate`.
        """
        indices, merged, first, lead = merge_duplicates(indices, self.xp.astype(features, self.dtype))
        old = self.xp.take(self.features, indices, axis=0)
        new = momentum_update(old, merged, self.momentum)
        self.features = B.set_rows(self.features, indices, new)
        if lead is None:  # no repeats: every row is its own first copy
            lead = self.xp.arange(indices.shape[0], dtype=indices.dtype, device=aac.device(indices))
        return MemoryUpdate(indices, first, old, new, lead)

    def rows(self, indices: Array) -> Array:
        """(R, D) the features of the samples ``indices`` (R,) (memory namespace, not checked).

        How the small-cluster handler reads features, so that a memory holding only some rows
        (a shard) can fetch the others.
        """
        return self.xp.take(self.features, indices, axis=0)

    def set_labels(self, indices: Array, labels: Array) -> None:
        """``labels[indices] = labels`` (repeated indices must carry equal labels)."""
        self.labels = B.set_rows(self.labels, indices, labels)

    def validate_batch(self, indices: Array, features: Array) -> tuple[Array, Array]:
        """Check a (indices, features) batch and return both in the memory's namespace."""
        B.eager_namespace(indices=indices, features=features)
        check_labels(indices, "indices", upper=self.num_samples)
        check_features(features, "features", dim=self.feat_dim, rows=indices.shape[0])
        # Checked again in the memory's dtype: float64 input may overflow or underflow there.
        feats = self.xp.astype(self.to_memory(features), self.dtype)
        if not all_finite(feats, self.xp):
            raise ValueError(f"features exceed the range of the memory's dtype {self.dtype}")
        check_nonzero_rows(feats, "features")
        return self.xp.astype(self.to_memory(indices), self.labels.dtype), feats
