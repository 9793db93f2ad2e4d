"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018).

The protocol of instance discrimination, used by DINO, solo-learn and mmselfsup: features are
L2-normalised; each test feature takes the ``k`` training features of highest cosine
similarity ``s_i`` and gives class ``c`` the score ``sum over neighbours of class c of
exp(s_i / T)``; the prediction is the class of highest score.

Memory stays bounded: test features are processed in blocks of rows, so only a
(block, N_train) similarity matrix exists at a time, never a (N_test, N_train) one.

Ties are resolved deterministically, the same way on every backend:

* **Neighbours.** Training features are ranked by decreasing similarity, equal similarities
  by increasing training index (the first ``k`` of a stable sort). A fast native top-k
  finds the candidates; a block where a similarity equal to the k-th one lies outside them
  (duplicated training features, for instance) is re-ranked with a stable sort.
* **Classes.** Equal class scores go to the lowest class index. Scores that are equal in
  exact arithmetic can differ in the last bit between backends (their BLAS round
  differently), so such near-ties may resolve differently across backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat as aac
import numpy as np

from . import backend as B
from .validation import check_features, check_int, check_labels, check_real, check_same_device
from .sample_memory import l2_normalize

Array = Any

__all__ = ["knn_classify", "knn_accuracy", "DEFAULT_TEMPERATURE"]

#: The temperature ``T`` of the neighbours' vote weights ``exp(similarity / T)`` (Wu et al. 2018).
DEFAULT_TEMPERATURE = 0.07
_BLOCK_ELEMENTS = 1 << 24  # test rows x training rows per similarity block (64 MiB of float32)


def _top_k(s: Array, k: int) -> tuple[Array, Array]:
    """The ``k`` largest entries of each row of ``s`` (B, N) and their column indices.

    Rows come out ordered by decreasing value, equal values by increasing column index:
    exactly the first ``k`` columns of a stable descending sort, on every backend.
    """
    xp = aac.array_namespace(s)
    idx = B.top_k_indices(s, k) if k < s.shape[1] else None
    if idx is not None:
        vals = xp.take_along_axis(s, idx, axis=1)
        kth = xp.min(vals, axis=1, keepdims=True)
        if bool(xp.all(xp.count_nonzero(s >= kth, axis=1) == k)):
            # The candidate set is the unique top-k: order it by (value desc, index asc).
            by_index = xp.argsort(idx, axis=1)
            idx = xp.take_along_axis(idx, by_index, axis=1)
            vals = xp.take_along_axis(vals, by_index, axis=1)
            by_value = xp.argsort(-vals, axis=1, stable=True)
            return xp.take_along_axis(vals, by_value, axis=1), xp.take_along_axis(idx, by_value, axis=1)
    idx = xp.argsort(-s, axis=1, stable=True)[:, :k]  # a tie straddles the k-th place, or no native top-k
    return xp.take_along_axis(s, idx, axis=1), idx


def _check_ks(k: int | Sequence[int], n_train: int) -> tuple[int, ...]:
    ks = (k,) if isinstance(k, (int, np.integer)) or not isinstance(k, Sequence) else tuple(k)
    if not ks:
        raise ValueError("k must be a positive integer or a non-empty sequence of them, got an empty sequence")
    out = tuple(check_int(v, "k", minimum=1) for v in ks)
    too_big = [v for v in out if v > n_train]
    if too_big:
        raise ValueError(f"k must be <= the number of training features ({n_train}), got {too_big[0]}")
    return out


def _validate(
    train_features: Array,
    train_labels: Array,
    test_features: Array,
    k: int | Sequence[int],
    temperature: float,
    num_classes: int | None,
    block_size: int | None,
) -> tuple[Any, tuple[int, ...], float, int, int]:
    xp = B.namespace(train_features=train_features, train_labels=train_labels, test_features=test_features)
    check_features(train_features, "train_features")
    n, d = train_features.shape
    check_features(test_features, "test_features", dim=d)
    if test_features.dtype != train_features.dtype:
        raise TypeError(
            f"test_features ({test_features.dtype}) and train_features ({train_features.dtype}) "
            "must have the same dtype"
        )
    check_same_device(train_features=train_features, train_labels=train_labels, test_features=test_features)
    if not xp.isdtype(train_labels.dtype, "integral"):
        raise TypeError(f"train_labels must have an integer dtype, got {train_labels.dtype}")
    if train_labels.ndim != 1 or train_labels.shape[0] != n:
        raise ValueError(
            f"train_labels must have shape ({n},) to match train_features, got {tuple(train_labels.shape)}"
        )
    if num_classes is None:
        num_classes = int(xp.max(train_labels)) + 1
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    check_labels(train_labels, "train_labels", upper=num_classes, length=n)
    ks = _check_ks(k, n)
    temperature = check_real(temperature, "temperature", low=0.0)
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // n)
    block_size = check_int(block_size, "block_size", minimum=1)
    return xp, ks, temperature, num_classes, block_size


def knn_classify(
    train_features: Array,
    train_labels: Array,
    test_features: Array,
    *,
    k: int | Sequence[int] = 20,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    block_size: int | None = None,
) -> Array | dict[int, Array]:
    """Predict the class of each test feature by a similarity-weighted vote of its k neighbours.

    Parameters
    ----------
    train_features : (N, D) real floating array, finite
        The labelled bank (frozen features of the training split); L2-normalised here.
    train_labels : (N,) integer array with values in [0, num_classes)
    test_features : (M, D) array, same namespace, device and dtype as ``train_features``
    k : int or sequence of int, default 20
        Number of neighbours, each in [1, N]. A sequence (``(20, 200)``) is answered from a
        single neighbour search of its largest value.
    temperature : float, default 0.07
        T in the weight ``exp(s / T)``; positive.
    num_classes : int, optional
        Number of classes C; ``max(train_labels) + 1`` when omitted.
    block_size : int, optional
        Test rows per block; memory is O(block_size x N) on top of a normalised copy of the
        bank. Default: as many rows as keep a block at 2**24 similarities (at least one row).
        On NumPy a block costs about 12 bytes per similarity (float32 similarities and the
        int64 indices of ``argpartition``); larger blocks make fewer passes over the bank
        (worth it on a GPU). The result does not depend on it.

    Returns
    -------
    (M,) array of the namespace's default integer dtype and ``test_features``' device with
    predictions in [0, C) when ``k`` is an int; a dict mapping each ``k`` to such an array
    when ``k`` is a sequence. Ties: see the module docstring.

    Raises
    ------
    TypeError
        A non-array, arrays of different namespaces, non-floating features, features of
        different dtypes, non-integer labels or integer arguments.
    ValueError
        Features not 2-D, empty or not finite; ``test_features`` of another width; labels of
        the wrong shape or outside [0, num_classes); ``k`` outside [1, N]; a non-positive
        temperature or block size; arrays on different devices.

    Examples
    --------
    >>> import numpy as np
    >>> train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    >>> labels = np.array([0, 0, 1])
    >>> knn_classify(train, labels, np.array([[0.2, 1.0]], dtype=np.float32), k=1)
    array([1])
    """
    xp, ks, temperature, num_classes, block_size = _validate(
        train_features, train_labels, test_features, k, temperature, num_classes, block_size
    )
    device = aac.device(test_features)
    labels_dtype = B.index_dtype(xp, device)
    # Frozen features: no autograd graph over the bank (B.convert detaches torch tensors).
    bank = l2_normalize(B.convert(train_features, xp))
    bank_t = xp.matrix_transpose(bank)
    train_labels = xp.astype(train_labels, labels_dtype)
    queries = l2_normalize(B.convert(test_features, xp))
    k_max = max(ks)
    m = queries.shape[0]
    preds: dict[int, list[Array]] = {v: [] for v in ks}
    for start in range(0, m, block_size):
        sims = xp.matmul(queries[start : min(start + block_size, m), :], bank_t)
        vals, idx = _top_k(sims, k_max)
        rows = vals.shape[0]
        # Shift by each row's best similarity: exp cannot overflow for any T, argmax unchanged.
        weights = xp.exp((vals - vals[:, :1]) / temperature)
        neighbour_labels = xp.take(train_labels, xp.reshape(idx, (-1,)))
        neighbour_labels = xp.reshape(neighbour_labels, (rows, k_max))
        offsets = xp.arange(rows, dtype=labels_dtype, device=device)[:, None] * num_classes
        slots = neighbour_labels + offsets
        for v in ks:
            votes = xp.zeros((rows * num_classes,), dtype=weights.dtype, device=device)
            votes = B.scatter_add(votes, xp.reshape(slots[:, :v], (-1,)), xp.reshape(weights[:, :v], (-1,)))
            preds[v].append(xp.astype(xp.argmax(xp.reshape(votes, (rows, num_classes)), axis=1), labels_dtype))
    out = {v: parts[0] if len(parts) == 1 else xp.concat(parts) for v, parts in preds.items()}
    if isinstance(k, Sequence):
        return out
    return out[ks[0]]


def knn_accuracy(
    train_features: Array,
    train_labels: Array,
    test_features: Array,
    test_labels: Array,
    *,
    k: int | Sequence[int] = (20, 200),
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    block_size: int | None = None,
) -> dict[str, float]:
    """Top-1 accuracy of :func:`knn_classify` on labelled test features.

    Parameters
    ----------
    train_features, train_labels, test_features, temperature, num_classes, block_size
        As :func:`knn_classify`; ``num_classes`` defaults to the larger of the two label
        arrays' maxima plus one.
    test_labels : (M,) integer array, same namespace as the features
    k : int or sequence of int, default (20, 200)

    Returns
    -------
    dict ``{"knn_top1@<k>": accuracy in [0, 1]}`` for every ``k``.

    Raises
    ------
    As :func:`knn_classify`; also for ``test_labels`` that are not 1-D integers of length M
    in [0, num_classes).
    """
    xp = B.namespace(test_features=test_features, test_labels=test_labels)
    if not xp.isdtype(test_labels.dtype, "integral"):
        raise TypeError(f"test_labels must have an integer dtype, got {test_labels.dtype}")
    if num_classes is None and test_labels.ndim == 1 and test_labels.shape[0] > 0:
        train_max = int(xp.max(train_labels)) if xp.isdtype(train_labels.dtype, "integral") else 0
        num_classes = max(int(xp.max(test_labels)), train_max) + 1
    m = test_features.shape[0] if test_features.ndim >= 1 else None
    check_labels(test_labels, "test_labels", upper=num_classes or 1, length=m)
    preds = knn_classify(
        train_features,
        train_labels,
        test_features,
        k=tuple(k) if isinstance(k, Sequence) else (k,),
        temperature=temperature,
        num_classes=num_classes,
        block_size=block_size,
    )
    truth = xp.astype(test_labels, B.index_dtype(xp, aac.device(test_labels)))
    hits = {v: int(xp.sum(xp.astype(p == truth, truth.dtype))) for v, p in preds.items()}
    return {f"knn_top1@{v}": hit / truth.shape[0] for v, hit in hits.items()}
