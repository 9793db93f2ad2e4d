"""Clustering metrics: equal to scikit-learn's, Hungarian accuracy, validation, missing extras."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
import sklearn.metrics as skm
from hypothesis import given
from hypothesis import strategies as st

from clusterlearn.metrics import accuracy, ami, ari, nmi

from bounds import identical_partitions_nmi_rtol


@st.composite
def label_pairs(draw, max_n: int = 40, max_labels: int = 5) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, max_n))
    labels = st.lists(st.integers(-2, max_labels - 3), min_size=n, max_size=n)
    return np.array(draw(labels)), np.array(draw(labels))


def _brute_force_accuracy(t: np.ndarray, p: np.ndarray) -> float:
    """Best one-to-one matching by enumerating every injective map (tiny inputs only)."""
    classes, clusters = np.unique(t), np.unique(p)
    table = np.array([[np.sum((t == a) & (p == b)) for b in clusters] for a in classes])
    if len(classes) > len(clusters):
        table = table.T
    best = max(
        sum(table[i, j] for i, j in enumerate(cols))
        for cols in itertools.permutations(range(table.shape[1]), table.shape[0])
    )
    return best / len(t)


@given(pair=label_pairs())
def test_equal_to_scikit_learn(backend, pair):
    t, p = pair
    bt, bp = backend.asarray(t), backend.asarray(p)
    # scikit-learn's own scores of the same labellings; accuracy: the same integer over N
    assert nmi(bt, bp) == skm.normalized_mutual_info_score(t, p)
    assert ami(bt, bp) == skm.adjusted_mutual_info_score(t, p)
    assert ari(bt, bp) == skm.adjusted_rand_score(t, p)
    assert accuracy(bt, bp) == _brute_force_accuracy(t, p)
    for metric in (nmi, ami, ari, accuracy):
        assert isinstance(metric(bt, bp), float)


@given(pair=label_pairs(max_n=60, max_labels=8), seed=st.integers(0, 2**32 - 1))
def test_accuracy_is_one_under_relabelling(backend, pair, seed):
    t, _ = pair
    renamed = np.random.default_rng(seed).permutation(20)[t + 2] * 3 - 7  # injective renaming
    assert accuracy(backend.asarray(t), backend.asarray(renamed)) == 1.0
    k = len(np.unique(t))
    assert nmi(backend.asarray(t), backend.asarray(renamed)) == pytest.approx(1.0, rel=identical_partitions_nmi_rtol(k), abs=0)


def test_accuracy_when_cluster_and_class_counts_differ():
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # Over-segmentation: 4 clusters for 2 classes; unmatched clusters count as errors.
    assert accuracy(truth, np.array([0, 0, 1, 1, 2, 2, 3, 3])) == 0.5
    # Under-segmentation: 1 cluster for 2 classes.
    assert accuracy(truth, np.zeros(8, dtype=np.int64)) == 0.5
    assert accuracy(truth, np.array([5, 5, 5, 7, 9, 9, 9, 9])) == 7 / 8


def test_labels_from_different_backends_mix(backend, numpy_backend):
    t = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([1, 1, 0, 0, 2, 0])
    expected = skm.adjusted_rand_score(t, p)
    assert ari(numpy_backend.asarray(t), backend.asarray(p)) == expected  # scikit-learn's, same labels


@pytest.mark.parametrize("metric", [nmi, ami, ari, accuracy])
@pytest.mark.parametrize(
    ("t", "p", "error", "match"),
    [
        (np.array([0, 1, 1]), np.array([0, 1]), ValueError, "differ in length"),
        (np.zeros((2, 2), dtype=int), np.zeros((2, 2), dtype=int), ValueError, "labels_true must be 1-D"),
        (np.array([0, 1]), np.zeros((2, 1), dtype=int), ValueError, "labels_pred must be 1-D"),
        (np.array([], dtype=int), np.array([], dtype=int), ValueError, "must not be empty"),
        (np.array([0.0, 1.0]), np.array([0, 1]), TypeError, "labels_true must have an integer dtype"),
        (np.array([0, 1]), np.array([True, False]), TypeError, "labels_pred must have an integer"),
    ],
)
def test_bad_labels_raise(backend, metric, t, p, error, match):
    with pytest.raises(error, match=match):
        metric(backend.asarray(t), backend.asarray(p))


@pytest.mark.parametrize("metric", [nmi, ami, ari, accuracy])
def test_not_an_array_raises(metric):
    with pytest.raises(TypeError, match="labels_pred must be an array"):
        metric(np.array([0, 1]), [0, 1])


@pytest.mark.parametrize("metric", [nmi, ami, ari, accuracy])
def test_missing_scikit_learn_names_the_install(monkeypatch, metric):
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    with pytest.raises(ImportError, match="pip install scikit-learn scipy"):
        metric(np.array([0, 1]), np.array([1, 0]))


def test_missing_scipy_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match="pip install scikit-learn scipy"):
        accuracy(np.array([0, 1]), np.array([1, 0]))
