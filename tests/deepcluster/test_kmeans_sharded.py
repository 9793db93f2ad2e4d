"""k-means over shards (``clusterlearn.kmeans_sharded``), run as S threads of one process.

The points are never gathered: the sample and the farthest-point seeds move as exact bit
patterns, the Lloyd sums as all-reduced (k, D) arrays. Checked: planted clusters are found;
the result does not depend on the number of shards (labels equal, centroids within the
rounding of float64 sums added in another order); no cluster is ever empty, also on data
built to empty clusters (duplicated points, k close to N).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from clusterlearn.kmeans_sharded import kmeans_sharded
from shard_threads import ThreadGroup


def run_sharded(backend, x: np.ndarray, k: int, shards: int, **kwargs):
    n = x.shape[0]
    bounds = [s * n // shards for s in range(shards + 1)]
    group = ThreadGroup(shards)

    def one(s: int):
        part = backend.asarray(x[bounds[s] : bounds[s + 1]])
        return kmeans_sharded(part, k, offset=bounds[s], num_samples=n, shard=s, num_shards=shards, psum=group.psum(s), **kwargs)

    results = group.run(one)
    labels = np.concatenate([backend.to_numpy(r.labels) for r in results])
    return labels, results


def planted(seed: int, k: int = 8, per: int = 60, d: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 6
    truth = np.repeat(np.arange(k), per)
    x = centres[truth] + rng.normal(size=(k * per, d))
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), truth[perm]


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_planted_clusters_are_found_on_every_backend(backend, shards):
    if backend.name == "array_api_strict":
        pytest.skip("array-api-strict has no bit views")
    x, truth = planted(0)
    labels, results = run_sharded(backend, x, 8, shards, sample_per_centroid=16, n_iter=10)
    assert normalized_mutual_info_score(truth, labels) > 0.99
    assert np.bincount(labels, minlength=8).min() > 0
    for r in results[1:]:  # the centroids are replicated: equal on every shard
        np.testing.assert_array_equal(backend.to_numpy(r.centroids), backend.to_numpy(results[0].centroids))


def test_result_does_not_depend_on_the_number_of_shards(numpy_backend):
    x, _ = planted(1, k=6, per=50)
    x = x + np.random.default_rng(2).normal(size=x.shape).astype(np.float32) * 2  # overlapping clusters
    one, r1 = run_sharded(numpy_backend, x, 6, 1, sample_per_centroid=20, n_iter=15)
    three, r3 = run_sharded(numpy_backend, x, 6, 3, sample_per_centroid=20, n_iter=15)
    np.testing.assert_array_equal(one, three)
    bound = 16 * float(np.finfo(np.float32).eps) * float(np.abs(x).max())
    np.testing.assert_allclose(r1[0].centroids, r3[0].centroids, rtol=0, atol=bound)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_no_cluster_is_ever_empty(numpy_backend, shards):
    """Half the points are one repeated point and k is close to N: Lloyd empties clusters
    every round, and every one is re-seeded by a point whose cluster keeps a member."""
    rng = np.random.default_rng(3)
    x = np.concatenate([np.zeros((30, 4)), rng.normal(size=(30, 4)) * 0.01]).astype(np.float32)
    labels, results = run_sharded(numpy_backend, x, 40, shards, sample_per_centroid=1, n_iter=5)
    assert np.bincount(labels, minlength=40).min() >= 1
    assert results[0].n_empty_fixed > 0  # the relocation really ran


def test_bad_arguments_raise_naming_them(numpy_backend):
    x = np.ones((4, 2), np.float32)
    common = dict(offset=0, num_samples=4, shard=0, num_shards=1, psum=lambda a: a)
    with pytest.raises(ValueError, match="k"):
        kmeans_sharded(x, 0, **common)
    with pytest.raises(ValueError, match="exceed num_samples"):
        kmeans_sharded(x, 2, **{**common, "offset": 1})
    with pytest.raises(ValueError, match="shard must be"):
        kmeans_sharded(x, 2, **{**common, "shard": 1})
    with pytest.raises(ValueError, match="x"):
        kmeans_sharded(np.full((4, 2), np.nan, np.float32), 2, **common)
