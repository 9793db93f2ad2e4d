"""DeepClusterLabeler: per-epoch pseudo-labels, the NMI stability signal, state, bad input.

Planted features: k clusters whose centres span a (k - 1)-dimensional subspace of D dimensions,
plus small isotropic noise, so that PCA to k - 1 dimensions keeps the clusters and whitening
cannot promote noise directions to the same scale.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterlearn import backend as B
from clusterlearn import metrics
from clusterlearn._faiss import faiss_available
from clusterlearn.deepcluster import DeepClusterLabeler

from bounds import identical_partitions_nmi_rtol, unit_norm_atol


def planted(seed: int, n: int = 240, k: int = 4, d: int = 16, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 features of k clusters in a random (k - 1)-dim subspace, and the truth."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, max(k - 1, 1))))[0]  # (d, k - 1) orthonormal
    centres = np.eye(k, max(k - 1, 1)) if k > 1 else np.zeros((1, 1))  # simplex-like corners
    centres = (centres - centres.mean(axis=0)) @ basis.T * 10.0
    truth = np.arange(n) % k
    return (centres[truth] + noise * rng.normal(size=(n, d))).astype(np.float32), truth


def check_labels(backend, features, epoch, k: int) -> np.ndarray:
    assert B.namespace(labels=epoch.labels) is B.namespace(features=features)
    assert epoch.labels.dtype == backend.xp.__array_namespace_info__().default_dtypes()["integral"]
    labels = backend.to_numpy(epoch.labels)
    assert labels.shape == (features.shape[0],)
    assert labels.min() >= 0 and labels.max() < k
    assert (np.bincount(labels, minlength=k) > 0).all(), "empty cluster"
    assert epoch.n_empty_fixed >= 0 and np.isfinite(epoch.inertia)
    return labels


needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")


@pytest.mark.parametrize("method", ["array", pytest.param("auto", marks=needs_faiss)])
def test_epochs_on_every_backend(backend, method):
    # faiss (auto) starts from random points: two planted clusters cannot trap it.
    k = 4 if method == "array" else 2
    x, truth = planted(0, k=k)
    feats = backend.asarray(x)
    labeler = DeepClusterLabeler(k, pca_dim=k - 1, seed=3, backend=method)
    first = labeler(feats)
    labels = check_labels(backend, feats, first, k)
    assert first.nmi_previous is None and first.epoch == 0 and first.pca_dim == k - 1
    assert metrics.nmi(truth, labels) > 0.99
    second = labeler(feats)  # unchanged features: the same partition, a new seed
    check_labels(backend, feats, second, k)
    assert second.epoch == 1 and labeler.epoch == 2
    assert second.nmi_previous == pytest.approx(1.0, rel=identical_partitions_nmi_rtol(k), abs=0)


def test_nmi_previous_compares_consecutive_epochs():
    x, _ = planted(1, k=4)
    noisy = x + np.random.default_rng(0).normal(scale=4.0, size=x.shape).astype(np.float32)
    labeler = DeepClusterLabeler(6, pca_dim=3, backend="array")
    a, b, c = labeler(x), labeler(noisy), labeler(x)
    assert b.nmi_previous == metrics.nmi(a.labels, b.labels)  # the same call on the same labels
    assert c.nmi_previous == metrics.nmi(b.labels, c.labels)
    assert b.nmi_previous < 0.99


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**20),
    k=st.integers(1, 8),
    n=st.integers(8, 60),
    d=st.integers(1, 12),
    pca_dim=st.integers(1, 300),
    method=st.sampled_from(["array", "auto"]),
)
def test_labels_valid_and_pca_dim_clipped(numpy_backend, seed, k, n, d, pca_dim, method):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    k = min(k, n)
    labeler = DeepClusterLabeler(k, pca_dim=pca_dim, n_iter=5, seed=seed, backend=method)
    epoch = labeler(x)
    check_labels(numpy_backend, x, epoch, k)
    assert epoch.pca_dim == min(pca_dim, n, d) == labeler.pca_.dim
    np.testing.assert_allclose(np.linalg.norm(labeler.pca_.transform(x), axis=1), 1.0, rtol=0, atol=unit_norm_atol(epoch.pca_dim, np.float32))


def test_seeds_are_reproducible_and_state_resumes_the_run():
    x, _ = planted(2, n=300, k=5, noise=3.0)  # overlapping: the seed matters
    a = DeepClusterLabeler(12, pca_dim=4, seed=7, backend="array")
    b = DeepClusterLabeler(12, pca_dim=4, seed=7, backend="array")
    first = a(x)
    np.testing.assert_array_equal(b(x).labels, first.labels)
    state = a.state_dict()
    second = a(x)
    assert not np.array_equal(second.labels, first.labels), "every epoch should get a new seed"
    resumed = DeepClusterLabeler(12, pca_dim=4, seed=7, backend="array")
    resumed.load_state_dict(state)
    again = resumed(x)
    np.testing.assert_array_equal(again.labels, second.labels)
    assert again.epoch == 1 and again.nmi_previous == second.nmi_previous  # same labels, same call


def test_reset_forgets_the_previous_labels():
    x, _ = planted(3)
    labeler = DeepClusterLabeler(4, pca_dim=3, backend="array")
    labeler(x)
    with pytest.raises(ValueError, match="previous epoch had 240"):
        labeler(x[:100])
    assert labeler.epoch == 1
    labeler.reset()
    assert labeler(x[:100]).nmi_previous is None and labeler.epoch == 2


@pytest.mark.parametrize(
    ("features", "err", "match"),
    [
        (np.zeros((3, 4), np.float32) + np.arange(4, dtype=np.float32), ValueError, "num_clusters=4 exceeds"),
        (np.full((10, 4), np.nan, np.float32), ValueError, "NaN"),
        (np.ones(10, np.float32), ValueError, "2-D"),
        (np.ones((0, 4), np.float32), ValueError, "must not be empty"),
        (np.ones((10, 4), np.int64), TypeError, "real floating"),
        (np.ones((10, 4), np.float32), ValueError, "zero variance"),
        ([[1.0, 2.0]] * 10, TypeError, "must be an array"),
    ],
)
def test_bad_features(features, err, match):
    labeler = DeepClusterLabeler(4, pca_dim=2)
    with pytest.raises(err, match=match):
        labeler(features)
    assert labeler.epoch == 0 and labeler.state_dict()["previous_labels"] is None


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"num_clusters": 0}, ValueError, "num_clusters must be >= 1"),
        ({"num_clusters": 2.0}, TypeError, "num_clusters must be an integer"),
        ({"pca_dim": 0}, ValueError, "pca_dim"),
        ({"n_iter": 0}, ValueError, "n_iter"),
        ({"seed": -1}, ValueError, "seed"),
        ({"backend": "sklearn"}, ValueError, "backend must be one of"),
        ({"init": "kmeans++"}, ValueError, "init must be"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    kwargs = {"num_clusters": 3, **kwargs}
    with pytest.raises(err, match=match):
        DeepClusterLabeler(kwargs.pop("num_clusters"), **kwargs)


@pytest.mark.parametrize(
    ("state", "err", "match"),
    [
        ({"epoch": 1}, ValueError, "missing"),
        ({"epoch": -1, "previous_labels": None}, ValueError, "epoch"),
        ({"epoch": 1, "previous_labels": np.array([0.0, 1.0])}, TypeError, "integer"),
        ({"epoch": 1, "previous_labels": np.array([[0, 1]])}, ValueError, "1-D"),
        ({"epoch": 1, "previous_labels": np.array([0, 3])}, ValueError, r"\[0, 3\)"),
    ],
)
def test_bad_state(state, err, match):
    labeler = DeepClusterLabeler(3)
    with pytest.raises(err, match=match):
        labeler.load_state_dict(state)
    assert labeler.epoch == 0


def test_missing_scikit_learn_fails_at_construction(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        DeepClusterLabeler(3)
