"""UniformLabelSampler: equal draws per cluster, even member reuse, determinism, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterlearn.sampler import UniformLabelSampler


@st.composite
def labellings(draw) -> np.ndarray:
    """1-D labels with a skewed cluster-size distribution and arbitrary (negative, gappy) ids."""
    n = draw(st.integers(1, 120))
    ids = draw(st.lists(st.integers(-5, 1000), min_size=1, max_size=12, unique=True))
    weights = np.array(draw(st.lists(st.floats(0.01, 1.0), min_size=len(ids), max_size=len(ids))))
    seed = draw(st.integers(0, 2**32 - 1))
    choice = np.random.default_rng(seed).choice(len(ids), size=n, p=weights / weights.sum())
    return np.array(ids)[choice]


@given(
    labels=labellings(),
    num_samples=st.one_of(st.none(), st.integers(1, 300)),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 10**6),
)
def test_uniform_over_clusters_and_even_within(backend, labels, num_samples, seed, epoch):
    sampler = UniformLabelSampler(backend.asarray(labels), num_samples=num_samples, seed=seed)
    idx = sampler.epoch_indices(epoch)
    expected = len(labels) if num_samples is None else num_samples
    assert isinstance(idx, np.ndarray) and idx.dtype == np.int64
    assert idx.shape == (expected,) and len(sampler) == expected
    assert idx.min() >= 0 and idx.max() < len(labels)

    clusters, dense = np.unique(labels, return_inverse=True)
    assert sampler.num_clusters == len(clusters)
    per_cluster = np.bincount(dense[idx], minlength=len(clusters))
    assert per_cluster.max() - per_cluster.min() <= 1
    # Within a cluster, members are reused only once all of them have been drawn.
    per_sample = np.bincount(idx, minlength=len(labels))
    for c in range(len(clusters)):
        members = per_sample[dense == c]
        assert members.max() - members.min() <= 1

    again = UniformLabelSampler(backend.asarray(labels), num_samples=num_samples, seed=seed)
    np.testing.assert_array_equal(again.epoch_indices(epoch), idx)


@given(seed=st.integers(0, 2**32 - 1), epoch=st.integers(0, 10**6))
def test_deterministic_per_seed_and_epoch_and_shuffled(backend, seed, epoch):
    labels = np.repeat(np.arange(5), [1, 3, 10, 30, 56])  # N = 100
    sampler = UniformLabelSampler(backend.asarray(labels), seed=seed)
    sampler.set_epoch(epoch)
    assert sampler.epoch == epoch
    idx = sampler.epoch_indices()
    assert list(sampler) == idx.tolist()
    np.testing.assert_array_equal(sampler.epoch_indices(epoch), idx)
    assert not np.array_equal(sampler.epoch_indices(epoch + 1), idx)
    assert not np.array_equal(UniformLabelSampler(labels, seed=seed + 1).epoch_indices(epoch), idx)
    # Shuffled across clusters, not grouped.
    assert np.count_nonzero(np.diff(labels[idx])) > 20
    np.testing.assert_array_equal(np.bincount(labels[idx]), [20] * 5)


def test_small_cluster_members_are_cycled():
    labels = np.array([0] * 9 + [1])
    idx = UniformLabelSampler(labels, seed=3).epoch_indices()
    np.testing.assert_array_equal(np.sort(idx[labels[idx] == 1]), [9] * 5)
    assert len(set(idx[labels[idx] == 0].tolist())) == 5  # no repeats while members remain


def test_fewer_samples_than_clusters():
    labels = np.arange(10)
    idx = UniformLabelSampler(labels, num_samples=3, seed=0).epoch_indices()
    assert len(set(idx.tolist())) == 3


@pytest.mark.parametrize(
    ("labels", "kwargs", "error", "match"),
    [
        (np.zeros((2, 2), dtype=int), {}, ValueError, "1-D"),
        (np.array([], dtype=int), {}, ValueError, "empty"),
        (np.array([0.0, 1.0]), {}, TypeError, "integer dtype"),
        (np.array([0, 1]), {"num_samples": 0}, ValueError, "num_samples"),
        (np.array([0, 1]), {"num_samples": -3}, ValueError, "num_samples"),
        (np.array([0, 1]), {"num_samples": 2.5}, TypeError, "num_samples"),
        (np.array([0, 1]), {"seed": -1}, ValueError, "seed"),
        (np.array([0, 1]), {"seed": True}, TypeError, "seed"),
    ],
)
def test_bad_arguments_raise(backend, labels, kwargs, error, match):
    with pytest.raises(error, match=match):
        UniformLabelSampler(backend.asarray(labels), **kwargs)


def test_bad_epoch_and_non_array_raise():
    sampler = UniformLabelSampler(np.array([0, 1]))
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)
    with pytest.raises(TypeError, match="epoch"):
        sampler.epoch_indices(1.5)
    with pytest.raises(TypeError, match="labels must be an array"):
        UniformLabelSampler([0, 1, 1])
