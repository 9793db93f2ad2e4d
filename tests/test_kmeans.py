"""k-means: never an empty cluster, monotone objective, same result on every backend."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clusterlearn as cl
from clusterlearn.kmeans import relocate_empty


def planted(seed, n=120, k=4, d=5, spread=0.05, duplicates=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    x = centres[rng.integers(k, size=n)] + spread * rng.normal(size=(n, d))
    if duplicates:  # many identical points make k-means++ pick equal centres -> empty clusters
        x[:duplicates] = x[0]
    return x.astype(np.float32)


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 12), dup=st.integers(0, 100), init=st.sampled_from(["k-means++", "random"]))
def test_kmeans_invariants(backend, seed, k, dup, init):
    x = planted(seed, duplicates=dup)
    res = cl.kmeans(backend.asarray(x), k, n_iter=8, seed=seed, init=init)
    labels = backend.to_numpy(res.labels)
    assert labels.shape == (x.shape[0],)
    assert labels.min() >= 0 and labels.max() < k
    assert (np.bincount(labels, minlength=k) > 0).all(), "empty cluster returned"
    hist = np.asarray(res.inertia_history)
    assert np.all(np.diff(hist) <= 1e-4 * max(hist[0], 1.0)), hist
    assert res.inertia == pytest.approx(hist[-1])
    assert B_namespace_of(res.centroids) is B_namespace_of(backend.asarray(x))


def B_namespace_of(x):
    from clusterlearn._backend import namespace

    return namespace(x=x)


def test_kmeans_recovers_planted_clusters_and_agrees_across_backends(backend):
    from sklearn.metrics import normalized_mutual_info_score

    x = planted(3, n=300, k=5, spread=0.05)
    truth = cl.kmeans(x, 5, seed=1).labels
    res = cl.kmeans(backend.asarray(x), 5, seed=1)
    np.testing.assert_array_equal(backend.to_numpy(res.labels), truth)
    assert normalized_mutual_info_score(truth, backend.to_numpy(res.labels)) == 1.0
    np.testing.assert_allclose(backend.to_numpy(res.centroids), cl.kmeans(x, 5, seed=1).centroids, atol=1e-5)


def test_kmeans_repairs_empty_clusters_and_counts_them():
    x = np.zeros((50, 3), dtype=np.float32)  # all identical: every cluster but one starts empty
    x[-3:] += np.eye(3, dtype=np.float32)
    res = cl.kmeans(x, 4, seed=0, init="random")  # random init picks equal points
    assert (np.bincount(res.labels, minlength=4) > 0).all()
    assert res.n_empty_fixed > 0


def test_relocate_empty_takes_farthest_members_without_emptying_donors():
    labels = np.array([0, 0, 0, 1, 2, 2])
    d2 = np.array([0.1, 5.0, 0.2, 9.0, 0.3, 4.0])  # point 3 is farthest but alone in cluster 1
    sizes = np.bincount(labels, minlength=5)
    new, moved = relocate_empty(labels.copy(), d2, sizes)
    np.testing.assert_array_equal(moved, [1, 5])
    np.testing.assert_array_equal(new, [0, 3, 0, 1, 2, 4])


@pytest.mark.parametrize(
    ("x", "k", "err", "match"),
    [
        (np.zeros((5, 2), np.float32), 6, ValueError, "k must be <="),
        (np.zeros(5, np.float32), 2, ValueError, "x must be 2-D"),
        (np.zeros((0, 2), np.float32), 1, ValueError, "must not be empty"),
        (np.full((5, 2), np.nan, np.float32), 2, ValueError, "NaN"),
        (np.zeros((5, 2), np.int64), 2, TypeError, "real floating"),
        (np.zeros((5, 2), np.float32), 2.0, TypeError, "k must be an integer"),
        (np.zeros((5, 2), np.float32), 0, ValueError, "k must be >= 1"),
    ],
)
def test_kmeans_bad_input(x, k, err, match):
    with pytest.raises(err, match=match):
        cl.kmeans(x, k)
