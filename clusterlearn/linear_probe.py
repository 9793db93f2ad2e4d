"""Linear probe on frozen features: multinomial logistic regression on standardised features.

The small-data protocol of the field: a linear classifier fitted on the labelled train split
of frozen features and scored on a disjoint test split. Features are standardised with the
train split's mean and deviation; the regularisation is fixed, or chosen by stratified
cross-validation on the train split only (never on the test split).

Runs scikit-learn on a host NumPy copy (float64) of features of any backend; scikit-learn is
an optional dependency. Training a linear layer with a framework's optimiser, for features
that do not fit in host memory, is not provided here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import backend as B
from .validation import check_features, check_int, check_labels, check_real

Array = Any

__all__ = ["linear_probe"]

_INSTALL_HINT = "pip install scikit-learn"
_CS = [10.0**e for e in range(-4, 5)]  # candidate C for cross-validation


def _host_split(
    features: Array, labels: Array, fname: str, lname: str, dim: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 / int64 host copies of one split's features and labels."""
    B.namespace(**{fname: features, lname: labels})
    check_features(features, fname, dim=dim)
    check_labels(labels, lname, upper=np.iinfo(np.int64).max, length=features.shape[0])
    return np.asarray(B.to_numpy(features), dtype=np.float64), np.asarray(B.to_numpy(labels), dtype=np.int64)


def linear_probe(
    train_features: Array,
    train_labels: Array,
    test_features: Array,
    test_labels: Array,
    *,
    C: float | None = 1.0,
    cv_folds: int = 5,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Fit a linear classifier on the train split, report its top-1 accuracy on the test split.

    Parameters
    ----------
    train_features : (N, D) real floating array, finite, any supported backend
    train_labels : (N,) integer array, non-negative class ids; at least two classes
    test_features : (M, D) real floating array, finite
    test_labels : (M,) integer array, non-negative class ids
    C : float or None, default 1.0
        Inverse L2 regularisation strength of the logistic regression, positive. ``None``
        chooses it from ``10**-4 ... 10**4`` (9 values) by the log-loss of ``cv_folds``-fold
        stratified cross-validation on the train split (the standardisation refitted in
        every fold), then refits on the whole train split.
    cv_folds : int, default 5
        Folds for ``C=None``; at least 2 and at most the smallest class size of the train split.
    max_iter : int, default 1000
        Iterations of the L-BFGS solver.
    seed : int, default 0
        Seed of the cross-validation folds' shuffle.

    Returns
    -------
    dict with ``"probe_top1"`` (test accuracy in [0, 1]), ``"probe_train_top1"`` (train
    accuracy) and ``"C"`` (the regularisation used).

    Raises
    ------
    TypeError, ValueError
        Bad arrays (as :func:`clusterlearn.knn.knn_classify`), test features of another
        width, fewer than two classes in ``train_labels``, or bad ``C``, ``cv_folds``,
        ``max_iter``, ``seed``.
    ImportError
        scikit-learn is not installed.
    """
    x_train, y_train = _host_split(train_features, train_labels, "train_features", "train_labels", None)
    x_test, y_test = _host_split(test_features, test_labels, "test_features", "test_labels", x_train.shape[1])
    if C is not None:
        C = check_real(C, "C", low=0.0)
        if not 0.0 < C < float("inf"):
            raise ValueError(f"C must be positive and finite, got {C}")
    cv_folds = check_int(cv_folds, "cv_folds", minimum=2)
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    counts = np.bincount(y_train)
    counts = counts[counts > 0]
    if counts.shape[0] < 2:
        raise ValueError("train_labels must contain at least two classes")
    if C is None and cv_folds > counts.min():
        raise ValueError(f"cv_folds={cv_folds} exceeds the smallest class size of train_labels ({counts.min()})")
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:
        raise ImportError(f"clusterlearn.linear_probe needs scikit-learn: {_INSTALL_HINT}") from err
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=C or 1.0, max_iter=max_iter))
    if C is None:
        folds = StratifiedKFold(cv_folds, shuffle=True, random_state=seed)
        pipe = GridSearchCV(pipe, {"logisticregression__C": _CS}, cv=folds, scoring="neg_log_loss")
    pipe.fit(x_train, y_train)
    chosen = float(pipe.best_params_["logisticregression__C"]) if C is None else C
    return {
        "probe_top1": float(np.mean(pipe.predict(x_test) == y_test)),
        "probe_train_top1": float(np.mean(pipe.predict(x_train) == y_train)),
        "C": chosen,
    }
