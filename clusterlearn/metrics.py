"""Clustering quality metrics: NMI, AMI, ARI and clustering accuracy.

Each function takes two label arrays of any supported backend, copies them to NumPy and
delegates to scikit-learn (and SciPy for the Hungarian matching). scikit-learn and SciPy are
optional dependencies, imported on first use.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .backend import namespace, to_numpy

Array = Any

__all__ = ["nmi", "nmi_from_contingency", "ami", "ari", "accuracy"]

_INSTALL_HINT = "pip install scikit-learn scipy"


def _sklearn_metrics() -> ModuleType:
    try:
        import sklearn.metrics
    except ImportError as err:
        raise ImportError(f"clusterlearn.metrics needs scikit-learn: {_INSTALL_HINT}") from err
    return sklearn.metrics


def _check_labels(labels_true: Array, labels_pred: Array) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays on the host, validated: 1-D, same non-zero length, integer dtype."""
    checked = []
    for name, labels in (("labels_true", labels_true), ("labels_pred", labels_pred)):
        namespace(**{name: labels})  # TypeError naming the argument if not an array
        host = np.asarray(to_numpy(labels))
        if host.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {host.shape}")
        if host.shape[0] == 0:
            raise ValueError(f"{name} must not be empty")
        if host.dtype.kind not in "iu":
            raise TypeError(f"{name} must have an integer dtype, got {host.dtype}")
        checked.append(host)
    if checked[0].shape != checked[1].shape:
        raise ValueError(
            f"labels_true and labels_pred differ in length: "
            f"{checked[0].shape[0]} != {checked[1].shape[0]}"
        )
    return checked[0], checked[1]


def nmi(labels_true: Array, labels_pred: Array) -> float:
    """Normalised mutual information (arithmetic normalisation, as scikit-learn's default).

    Parameters
    ----------
    labels_true, labels_pred : (N,) integer arrays, any backend
        Two labellings of the same N samples; label values are arbitrary identifiers.

    Returns
    -------
    float in [0, 1]; symmetric in its arguments.

    Raises
    ------
    TypeError
        Not arrays, or not integer.
    ValueError
        Not 1-D, empty, or of different lengths.
    ImportError
        scikit-learn is not installed.
    """
    t, p = _check_labels(labels_true, labels_pred)
    return float(_sklearn_metrics().normalized_mutual_info_score(t, p))


def nmi_from_contingency(table: Array) -> float:
    """:func:`nmi` of two labellings given only their (K1, K2) contingency table.

    ``table[i, j]`` counts the samples labelled ``i`` by one labelling and ``j`` by the other.
    A table is all that shards need to exchange (one ``psum`` of K1·K2 counts) to score
    labellings whose samples none of them holds entirely. Rows and columns of zeros (labels
    that occur nowhere) are ignored, as :func:`nmi` ignores absent labels.

    Raises ``ValueError`` for a table that is not 2-D, has negative or non-integral counts,
    or counts no sample.
    """
    namespace(table=table)
    t = np.asarray(to_numpy(table), dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"table must be 2-D, got shape {t.shape}")
    if not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(t != np.round(t)):
        raise ValueError("table must hold non-negative integer counts")
    t = t[t.sum(axis=1) > 0][:, t.sum(axis=0) > 0]
    if t.size == 0:
        raise ValueError("table counts no sample")
    if t.shape[0] == t.shape[1] == 1:
        return 1.0  # one cluster in each labelling: identical, as scikit-learn scores it
    mi = float(_sklearn_metrics().mutual_info_score(None, None, contingency=t))
    if mi == 0.0:
        return 0.0
    p = t / t.sum()

    def entropy(marginal: np.ndarray) -> float:
        return float(-np.sum(marginal * np.log(marginal)))

    return mi / max((entropy(p.sum(axis=1)) + entropy(p.sum(axis=0))) / 2, float(np.finfo(np.float64).eps))


def ami(labels_true: Array, labels_pred: Array) -> float:
    """Adjusted mutual information (chance-corrected NMI), as scikit-learn computes it.

    Parameters and errors as `nmi`. Returns a float, 1 for identical partitions and about 0
    for independent ones (it can be negative).
    """
    t, p = _check_labels(labels_true, labels_pred)
    return float(_sklearn_metrics().adjusted_mutual_info_score(t, p))


def ari(labels_true: Array, labels_pred: Array) -> float:
    """Adjusted Rand index, as scikit-learn computes it.

    Parameters and errors as `nmi`. Returns a float in [-0.5, 1], 1 for identical partitions.
    """
    t, p = _check_labels(labels_true, labels_pred)
    return float(_sklearn_metrics().adjusted_rand_score(t, p))


def accuracy(labels_true: Array, labels_pred: Array) -> float:
    """Clustering accuracy under the best one-to-one matching of clusters to classes.

    The contingency table of classes x clusters is matched with the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``, maximising the matched samples). When the
    numbers of clusters and classes differ, only ``min(n_classes, n_clusters)`` pairs are
    matched and the samples of unmatched clusters (or classes) count as errors, so
    over-segmentation is not rewarded.

    Parameters
    ----------
    labels_true : (N,) integer array, any backend
        Ground-truth classes (arbitrary identifiers).
    labels_pred : (N,) integer array, any backend
        Cluster assignments (arbitrary identifiers).

    Returns
    -------
    float in (0, 1]: fraction of samples whose cluster is matched to their class; 1 exactly
    when the two labellings are equal up to a renaming of the labels.

    Raises
    ------
    As `nmi`; ImportError also when SciPy is missing.
    """
    t, p = _check_labels(labels_true, labels_pred)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:
        raise ImportError(f"clusterlearn.metrics.accuracy needs SciPy: {_INSTALL_HINT}") from err
    table = _sklearn_metrics().cluster.contingency_matrix(t, p)  # (n_classes, n_clusters)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / t.shape[0])
