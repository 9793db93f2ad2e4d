"""DeepCluster over shards, run as S threads of one process: PCA from an all-reduced
covariance, the sharded labeler, the NMI from a contingency table, the shards' sampler.

Checked against the unsharded computations: the whitening equals the fit on all rows within
the rounding of float64 sums added in another order and is bit-identical on every shard;
planted clusters are found with the labels left on their shards; the NMI between epochs is
the NMI of the gathered labels; one shard's sampler is the unsharded sampler, and S shards
draw every cluster equally often even when one cluster holds half of the data.
"""

from __future__ import annotations

import numpy as np
import pytest

from clusterlearn import metrics
from clusterlearn.deepcluster_shard import ShardedDeepClusterLabeler
from clusterlearn.pca import PCAWhitening
from clusterlearn.sampler import ShardedUniformLabelSampler, UniformLabelSampler
from shard_threads import ThreadGroup


def bounds_of(n: int, shards: int) -> list[int]:
    return [s * n // shards for s in range(shards + 1)]


def planted(seed: int, k: int = 5, per: int = 60, d: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 8
    truth = np.repeat(np.arange(k), per)
    x = centres[truth] + rng.normal(size=(k * per, d)) * np.linspace(0.5, 2.0, d)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), truth[perm]


@pytest.mark.parametrize("cuts", [[0, 300], [0, 120, 300], [0, 0, 170, 300]], ids=["1", "2", "3-one-empty"])
def test_pca_from_all_reduced_moments_equals_the_fit_on_all_rows(backend, cuts):
    x, _ = planted(0)
    x = x * np.float32(3e30)  # the shards must agree on one power-of-two scaling
    shards = len(cuts) - 1
    group = ThreadGroup(shards)
    whole = PCAWhitening(6).fit(backend.asarray(x))
    fits = group.run(lambda s: PCAWhitening(6).fit(backend.asarray(x[cuts[s] : cuts[s + 1]]), psum=group.psum(s),
                                                   shard=s, num_shards=shards))
    ref = backend.to_numpy(fits[0].projection_)
    for f in fits[1:]:
        np.testing.assert_array_equal(backend.to_numpy(f.projection_), ref)  # one transform on every shard
    # float64 moments (float32 where the backend has no float64) summed in another order:
    # relative differences of a few units of the accumulator's rounding, amplified by the
    # conditioning of the eigenvectors (eigenvalue gaps of this data are > 1 % of the largest)
    eps = float(np.finfo(backend.to_numpy(whole.projection_).dtype).eps)
    scale = np.abs(backend.to_numpy(whole.projection_)).max()
    np.testing.assert_allclose(ref, backend.to_numpy(whole.projection_), rtol=0, atol=1e4 * eps * scale)
    y = backend.to_numpy(fits[-1].transform(backend.asarray(x[:7])))
    np.testing.assert_allclose(y, backend.to_numpy(whole.transform(backend.asarray(x[:7]))), rtol=0, atol=1e-4)


def test_pca_shards_refuse_bad_arguments():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="shard"):
        PCAWhitening(2).fit(x, psum=lambda a: a, shard=1, num_shards=1)
    with pytest.raises(ValueError, match="no rows"):
        PCAWhitening(2).fit(x[:0], psum=lambda a: a)
    with pytest.raises(ValueError, match="x contains NaN"):
        PCAWhitening(2).fit(np.full((4, 3), np.nan, np.float32), psum=lambda a: a)


@pytest.mark.parametrize("shards", [1, 3])
def test_sharded_labeler_finds_planted_clusters_and_scores_epochs_like_gathered_labels(numpy_backend, shards):
    x, truth = planted(1)
    cuts = bounds_of(len(x), shards)
    group = ThreadGroup(shards)

    def run(s: int):
        labeler = ShardedDeepClusterLabeler(5, offset=cuts[s], num_samples=len(x), shard=s, num_shards=shards,
                                            psum=group.psum(s), pca_dim=8, n_iter=10, sample_per_centroid=20)
        part = x[cuts[s] : cuts[s + 1]]
        first = labeler(part)
        noisy = part + np.random.default_rng(s).normal(size=part.shape).astype(np.float32) * 6
        second = labeler(noisy)
        return first, second, labeler

    results = group.run(run)
    first = np.concatenate([r[0].labels for r in results])
    second = np.concatenate([r[1].labels for r in results])
    assert metrics.nmi(truth, first) > 0.99
    assert all(r[0].nmi_previous is None for r in results)
    expected = metrics.nmi(first, second)
    assert expected < 0.99  # the second epoch really moved labels
    for r in results:
        assert r[1].nmi_previous == pytest.approx(expected, abs=1e-12)
        np.testing.assert_array_equal(r[2].centroids_, results[0][2].centroids_)
    sizes = group.run(lambda s: results[s][2].cluster_sizes(results[s][1].labels))
    np.testing.assert_array_equal(sizes[0], np.bincount(second, minlength=5))


@pytest.mark.parametrize("seed", range(4))
def test_nmi_from_contingency_equals_nmi_of_the_labels(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(5, size=200), rng.integers(1 + seed, size=200)
    b[:100] = a[:100] % (1 + seed)
    table = np.zeros((7, 9), np.int64)
    np.add.at(table, (a, b), 1)
    assert metrics.nmi_from_contingency(table) == pytest.approx(metrics.nmi(a, b), abs=1e-12)


@pytest.mark.parametrize("bad", [np.ones(3), -np.ones((2, 2)), np.full((2, 2), 0.5), np.zeros((2, 2))])
def test_nmi_from_contingency_refuses_bad_tables(bad):
    with pytest.raises(ValueError, match="table"):
        metrics.nmi_from_contingency(bad)


def test_one_shard_samples_as_the_unsharded_sampler():
    labels = np.random.default_rng(3).integers(7, size=500)
    labels[labels == 4] = 2  # an absent cluster
    whole = UniformLabelSampler(labels, 450, seed=9)
    shard = ShardedUniformLabelSampler(labels, np.bincount(labels, minlength=7), offset=0, num_samples=450, seed=9)
    for epoch in range(3):
        np.testing.assert_array_equal(shard.epoch_indices(epoch), whole.epoch_indices(epoch))


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_shards_draw_every_cluster_equally_often_although_one_cluster_holds_half_the_data(shards):
    rng = np.random.default_rng(shards)
    n, k = 1200, 6
    labels = np.where(rng.random(n) < 0.5, 0, rng.integers(1, k, size=n))  # cluster 0: half the data
    cuts = bounds_of(n, shards)
    sizes = np.bincount(labels, minlength=k)
    per_shard = 300
    draws = np.concatenate([
        ShardedUniformLabelSampler(labels[cuts[s] : cuts[s + 1]], sizes, offset=cuts[s], num_samples=per_shard,
                                   seed=1, shard=s).epoch_indices(0)
        for s in range(shards)
    ])
    assert draws.shape == (shards * per_shard,)
    for s in range(shards):
        mine = draws[s * per_shard : (s + 1) * per_shard]
        assert mine.min() >= cuts[s] and mine.max() < cuts[s + 1]  # every shard draws its own samples
    counts = np.bincount(labels[draws], minlength=k)
    target = shards * per_shard / k
    # the shards hold slightly different mixes of the clusters (random labels): each cluster
    # gets its target up to those differences, far from the half cluster 0 would get by size
    assert np.all(np.abs(counts - target) < 0.15 * target), counts
    assert counts[0] < 0.25 * draws.shape[0]


def test_sharded_labeler_refuses_bad_arguments():
    with pytest.raises(ValueError, match="shard"):
        ShardedDeepClusterLabeler(3, offset=0, num_samples=10, shard=2, num_shards=2, psum=lambda a: a)
    with pytest.raises(ValueError, match="num_samples"):
        ShardedDeepClusterLabeler(30, offset=0, num_samples=10, shard=0, num_shards=1, psum=lambda a: a)
    with pytest.raises(TypeError, match="psum"):
        ShardedDeepClusterLabeler(3, offset=0, num_samples=10, shard=0, num_shards=1, psum=None)
    labeler = ShardedDeepClusterLabeler(3, offset=8, num_samples=10, shard=0, num_shards=1, psum=lambda a: a)
    with pytest.raises(ValueError, match="exceed num_samples"):
        labeler(np.ones((4, 3), np.float32))
    assert labeler.epoch == 0
    with pytest.raises(ValueError, match="global_sizes"):
        ShardedUniformLabelSampler(np.array([0, 1, 1]), np.array([1, 1]), offset=0)
