"""Evaluation of frozen features: a fixed split, clustering scores, and cluster assignment.

The k-NN classifier and the linear probe live in :mod:`clusterlearn.knn` and
:mod:`clusterlearn.linear_probe`; this module holds the rest of the protocol:

* :func:`stratified_split`: a train/test split of a data set without one, the same on
  every machine and NumPy version for a given seed.
* :func:`cluster_scores`: k-means of the L2-normalised features, scored against the labels
  by NMI, ARI, Hungarian accuracy and many-to-one accuracy.
* :func:`many_to_one_accuracy`: each cluster mapped to its majority class, the score for
  over-clustering (more clusters than classes, as DeepCluster and ODC train with).
* :func:`odc_assign`: clusters of new features under an ODC model's centroid memory.
"""

from __future__ import annotations

from typing import Any

import array_api_compat as aac
import numpy as np

from . import backend as B
from . import metrics
from .validation import check_features, check_int, check_real
from .kmeans import BACKENDS, Backend, Init, kmeans
from .odc import NotInitializedError, OnlineDeepClustering
from .sample_memory import l2_normalize

Array = Any

__all__ = ["stratified_split", "many_to_one_accuracy", "cluster_scores", "odc_assign"]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _host_labels(labels: Array, name: str, length: int | None = None) -> np.ndarray:
    """``labels`` as a validated 1-D host integer array (values are arbitrary identifiers)."""
    B.namespace(**{name: labels})
    host = np.asarray(B.to_numpy(labels))
    if host.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, got {host.dtype}")
    if host.ndim != 1 or host.shape[0] == 0:
        raise ValueError(f"{name} must be 1-D and non-empty, got shape {host.shape}")
    if length is not None and host.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {host.shape[0]}")
    return host


def _mix(seed: int, index: np.ndarray) -> np.ndarray:
    """SplitMix64 of ``(seed, index)``: a fixed pseudo-random uint64 per index.

    Integer arithmetic modulo 2**64 only, so the keys (and the split) do not depend on the
    machine, the NumPy version or its random generators.
    """
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def stratified_split(labels: Array, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified train/test split of a labelled data set.

    Every class is shuffled by a seeded hash of the sample indices and its first
    ``round(test_fraction * n_c)`` samples (halves rounded up) go to the test split, capped
    at ``n_c - 1`` so that every class keeps a training sample (a class of one sample is
    train only).

    Parameters
    ----------
    labels : (N,) integer array, any backend; class identifiers (any integer values)
    test_fraction : float in (0, 1), default 0.2
    seed : int >= 0, default 0

    Returns
    -------
    train_index, test_index : int64 NumPy arrays, sorted, disjoint, together ``0..N-1``.
        The same for the same labels and seed on every machine and NumPy version.

    Raises
    ------
    TypeError
        ``labels`` is not an integer array, or ``seed`` is not an integer.
    ValueError
        ``labels`` is not 1-D or empty; ``test_fraction`` outside (0, 1); negative ``seed``.

    Examples
    --------
    >>> import numpy as np
    >>> train, test = stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]), 0.5)
    >>> len(train), len(test)
    (5, 5)
    """
    host = _host_labels(labels, "labels")
    test_fraction = check_real(test_fraction, "test_fraction", low=0.0, high=1.0)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    seed = check_int(seed, "seed", minimum=0)
    n = host.shape[0]
    classes, inverse, counts = np.unique(host, return_inverse=True, return_counts=True)
    index = np.arange(n, dtype=np.int64)
    order = np.lexsort((index, _mix(seed, index), inverse))  # by class, then hash, then index
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = index - starts[inverse[order]]
    n_test = np.minimum(np.floor(test_fraction * counts + 0.5).astype(np.int64), counts - 1)
    is_test = rank < n_test[inverse]
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def many_to_one_accuracy(labels_true: Array, labels_pred: Array) -> float:
    """Accuracy when every cluster predicts its majority class (over-clustering score).

    Parameters
    ----------
    labels_true : (N,) integer array, any backend; class identifiers
    labels_pred : (N,) integer array, any backend; cluster identifiers

    Returns
    -------
    float in (0, 1]: ``sum over clusters of (size of its largest class) / N``. It never
    decreases when clusters are split, so report the number of clusters with it; with one
    cluster per sample it is 1.

    Raises
    ------
    TypeError
        Not integer arrays.
    ValueError
        Not 1-D, empty or of different lengths.
    """
    t = _host_labels(labels_true, "labels_true")
    p = _host_labels(labels_pred, "labels_pred", length=t.shape[0])
    _, ti = np.unique(t, return_inverse=True)
    clusters, pi = np.unique(p, return_inverse=True)
    n_classes = int(ti.max()) + 1
    table = np.bincount(pi * n_classes + ti, minlength=clusters.shape[0] * n_classes)
    return float(table.reshape(clusters.shape[0], n_classes).max(axis=1).sum() / t.shape[0])


def cluster_scores(
    features: Array,
    labels: Array,
    num_clusters: int | None = None,
    *,
    seed: int = 0,
    n_iter: int = 20,
    init: Init | None = None,
    backend: Backend = "array",
) -> dict[str, float]:
    """k-means of L2-normalised frozen features, scored against class labels.

    Parameters
    ----------
    features : (N, D) real floating array, finite, any supported backend
    labels : (N,) integer array, class identifiers
    num_clusters : int, optional
        k of k-means, in [1, N]; the number of distinct labels when omitted. Larger values
        (over-clustering) are judged by ``"many_to_one"``.
    seed, n_iter, init, backend
        Passed to :func:`clusterlearn.kmeans`. The default ``backend="array"`` gives the
        same clustering whether or not faiss is installed.

    Returns
    -------
    dict with ``"nmi"``, ``"ari"``, ``"acc"`` (Hungarian one-to-one accuracy, see
    :func:`clusterlearn.metrics.accuracy`), ``"many_to_one"`` (see
    :func:`many_to_one_accuracy`), ``"num_clusters"`` and ``"inertia"``.

    Raises
    ------
    TypeError, ValueError
        Bad features or labels, labels of another length, or bad k-means arguments.
    ImportError
        scikit-learn or SciPy (for the metrics) is missing.
    """
    B.namespace(features=features, labels=labels)
    check_features(features, "features")
    host = _host_labels(labels, "labels", length=features.shape[0])
    if num_clusters is None:
        num_clusters = int(np.unique(host).shape[0])
    num_clusters = check_int(num_clusters, "num_clusters", minimum=1)
    if num_clusters > features.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} exceeds the number of feature rows ({features.shape[0]})")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    result = kmeans(l2_normalize(features), num_clusters, n_iter=n_iter, seed=seed, init=init, backend=backend)
    pred = np.asarray(B.to_numpy(result.labels), dtype=np.int64)
    return {
        "nmi": metrics.nmi(host, pred),
        "ari": metrics.ari(host, pred),
        "acc": metrics.accuracy(host, pred),
        "many_to_one": many_to_one_accuracy(host, pred),
        "num_clusters": num_clusters,
        "inertia": result.inertia,
    }


def odc_assign(odc: OnlineDeepClustering, features: Array) -> Array:
    """Clusters of new features under an ODC model's centroid memory.

    The features are L2-normalised (as the sample memory stores them) and assigned to the
    nearest centroid by the model's own rule (``odc.metric``: ``"l2"`` or ``"dot"``); the
    model is not changed.

    Parameters
    ----------
    odc : OnlineDeepClustering, initialised
    features : (B, D) real floating array, finite, D = ``odc.feat_dim``; any namespace

    Returns
    -------
    (B,) integer array of cluster ids in [0, num_clusters), in the namespace and on the
    device of ``features``; ties go to the lowest id.

    Raises
    ------
    TypeError
        ``odc`` is not an OnlineDeepClustering; ``features`` not a real floating array.
    ValueError
        ``features`` not 2-D, empty, not finite or of another width.
    NotInitializedError
        ``odc.initialize`` has not been called.
    """
    if not isinstance(odc, OnlineDeepClustering):
        raise TypeError(f"odc must be an OnlineDeepClustering, got {type(odc).__name__}")
    xp_in = B.namespace(features=features)
    check_features(features, "features", dim=odc.feat_dim)
    if not odc.samples.initialized:
        raise NotInitializedError("call odc.initialize(features) before odc_assign")
    memory = odc.samples
    feats = l2_normalize(memory.xp.astype(memory.to_memory(features), memory.dtype))
    labels = odc.centroid_memory.assign(feats, metric=odc.metric)
    return B.convert(labels, xp_in, aac.device(features))
