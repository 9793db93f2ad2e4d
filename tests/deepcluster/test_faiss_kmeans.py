"""Host-side faiss k-means helper: shapes, non-empty clusters, nearest-centroid labels, repairs."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import clusterlearn._faiss
from clusterlearn._faiss import faiss_available, faiss_gpu_available, faiss_kmeans

from bounds import distance_atol, inertia_atol

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")


def _planted(seed: int, n: int, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) float32 points around k centres 20 apart-ish, and their true components."""
    gen = np.random.default_rng(seed)
    centres = gen.normal(size=(k, d)) * 20.0
    truth = np.arange(n) % k
    return (centres[truth] + gen.normal(size=(n, d))).astype(np.float32), truth


def _squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    x, centroids = x.astype(np.float64), centroids.astype(np.float64)
    return ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)


@needs_faiss
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 8),
    d=st.integers(1, 16),
    n_per=st.integers(1, 30),
)
def test_planted_mixture(seed, k, d, n_per):
    x, _ = _planted(seed, k * n_per, k, d)
    centroids, labels, history, n_fixed = faiss_kmeans(x, k, n_iter=10, seed=seed)
    assert centroids.shape == (k, d) and centroids.dtype == np.float32
    assert labels.shape == (k * n_per,) and labels.dtype == np.int64
    assert np.bincount(labels, minlength=k).min() >= 1
    dist = _squared_distances(x, centroids)
    own = dist[np.arange(len(x)), labels]
    assert np.all(own <= dist.min(axis=1) + 2 * distance_atol(x, centred=False))  # two float32 distances compared
    assert 1 <= len(history) <= 10 and all(isinstance(v, float) for v in history)
    assert isinstance(n_fixed, int) and n_fixed >= 0
    if n_fixed == 0:  # Lloyd's objective never increases without repairs
        assert all(b <= a + 2 * inertia_atol(x, a, centred=False) for a, b in zip(history, history[1:]))

    again = faiss_kmeans(x, k, n_iter=10, seed=seed)
    np.testing.assert_array_equal(again[0], centroids)
    np.testing.assert_array_equal(again[1], labels)


@needs_faiss
@pytest.mark.parametrize("seed", [0, 3])
def test_training_starts_from_the_given_centroids(seed):
    x, _ = _planted(seed, 300, 5, 6)
    start = x[np.random.default_rng(seed).choice(300, 5, replace=False)]
    centroids, labels, history, _ = faiss_kmeans(x, 5, n_iter=1, seed=seed, init_centroids=start.astype(np.float64))
    dist = _squared_distances(x, start)
    # faiss' first objective is the start's, in float32 (relative error a few D * eps)
    assert history[0] == pytest.approx(dist.min(axis=1).sum(), rel=1e-5)
    assignment = dist.argmin(axis=1)  # one iteration: centroids are the means of that assignment
    means = np.stack([x[assignment == j].astype(np.float64).mean(axis=0) for j in range(5)])
    np.testing.assert_allclose(centroids, means, rtol=1e-5, atol=1e-4)


@needs_faiss
def test_converges_on_separated_clusters():
    x, truth = _planted(7, 600, 4, 8)
    centroids, labels, history, _ = faiss_kmeans(x, 4, n_iter=20, seed=7)
    table = np.zeros((4, 4), dtype=int)
    np.add.at(table, (truth, labels), 1)
    assert (table.max(axis=1) == 150).all()  # a well-started run recovers the mixture
    direct = ((x.astype(np.float64) - centroids[labels]) ** 2).sum()
    assert abs(history[-1] - direct) <= inertia_atol(x, direct, centred=False)


@needs_faiss
def test_duplicates_left_empty_by_faiss_are_reseeded(monkeypatch):
    # Three distinct points for three clusters: when faiss starts from duplicates, its split
    # copies of a centroid tie on them and its final assignment leaves a cluster empty, which
    # the helper repairs.
    final_repairs = []
    reseed = clusterlearn._faiss._reseed_empty
    monkeypatch.setattr(
        clusterlearn._faiss, "_reseed_empty", lambda *a: final_repairs.append(reseed(*a)) or final_repairs[-1]
    )
    for seed in range(5):
        points = np.random.default_rng(seed).normal(size=(3, 3)).astype(np.float32)
        x = np.repeat(points, [50, 50, 1], axis=0)
        centroids, labels, _, n_fixed = faiss_kmeans(x, 3, seed=seed)
        groups = np.repeat(np.arange(3), [50, 50, 1])
        assert len(set(zip(groups.tolist(), labels.tolist()))) == 3  # one label per group
        assert np.bincount(labels, minlength=3).min() == 1
        assert n_fixed >= (final_repairs[-1] if final_repairs else 0)
    assert sum(final_repairs) >= 1


@needs_faiss
@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        (np.ones(6, dtype=np.float32), {"k": 2}, ValueError, "2-D"),
        (np.ones((0, 3), dtype=np.float32), {"k": 1}, ValueError, "non-empty"),
        (np.ones((4, 3), dtype=np.float32), {"k": 5}, ValueError, "k=5 exceeds the number of points N=4"),
        (np.ones((4, 3), dtype=np.float32), {"k": 0}, ValueError, "k must be"),
        (np.full((4, 3), np.nan, dtype=np.float32), {"k": 2}, ValueError, "NaN or Inf"),
        (np.arange(12).reshape(4, 3), {"k": 2}, TypeError, "floating"),
        (np.ones((4, 3), dtype=np.float32), {"k": 2, "n_iter": 0}, ValueError, "n_iter"),
        (np.ones((4, 3), dtype=np.float32), {"k": 2, "seed": -1}, ValueError, "seed"),
        (np.ones((4, 3), dtype=np.float32), {"k": 2, "seed": 2**31}, ValueError, "seed"),
        (np.ones((4, 3), dtype=np.float32), {"k": 2.0}, TypeError, "k must be an integer"),
        (np.ones((4, 3), dtype=np.float32), {"k": 2, "max_points_per_centroid": 0}, ValueError, "max_points"),
        (np.ones((4, 3), np.float32), {"k": 2, "init_centroids": np.ones((3, 3))}, ValueError, "init_centroids must have"),
        (np.ones((4, 3), np.float32), {"k": 2, "init_centroids": np.ones((2, 2))}, ValueError, "init_centroids must have"),
        (np.ones((4, 3), np.float32), {"k": 2, "init_centroids": np.full((2, 3), np.inf)}, ValueError, "init_centroids"),
        (np.ones((4, 3), np.float32), {"k": 2, "init_centroids": np.full((2, 3), 1e39)}, ValueError, "init_centroids"),
        (np.ones((4, 3), np.float32), {"k": 2, "init_centroids": np.ones((2, 3), int)}, TypeError, "init_centroids"),
        (np.ones((4, 3), np.float32), {"k": 2, "init_centroids": [[1.0] * 3] * 2}, TypeError, "init_centroids"),
    ],
)
def test_bad_input_raises(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        faiss_kmeans(x, **kwargs)


@needs_faiss
def test_non_numpy_input_raises(backend):
    if backend.name == "numpy":
        pytest.skip("NumPy input is accepted")
    with pytest.raises(TypeError, match="NumPy array"):
        faiss_kmeans(backend.asarray(np.ones((4, 3))), 2)


@needs_faiss
def test_gpu_without_gpu_faiss_raises():
    if faiss_gpu_available():
        pytest.skip("faiss has a GPU here")
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        faiss_kmeans(np.ones((4, 3), dtype=np.float32), 2, gpu=True)


@pytest.mark.skipif(not faiss_gpu_available(), reason="needs faiss with a GPU")
def test_gpu_index_matches_cpu():
    x, _ = _planted(0, 400, 4, 8)
    cpu = faiss_kmeans(x, 4, seed=3)
    gpu = faiss_kmeans(x, 4, seed=3, gpu=True)
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-3)


def test_missing_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert not faiss_available() and not faiss_gpu_available()
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        faiss_kmeans(np.ones((4, 3), dtype=np.float32), 2)
