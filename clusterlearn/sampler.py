"""Dataset indices drawn uniformly over clusters (DeepCluster's defence against one giant cluster).

The sampler is framework-free and produces host NumPy index arrays; the torch adapter wraps it as
a (DDP-aware) ``torch.utils.data.Sampler`` and JAX loops can use `UniformLabelSampler.epoch_indices`
directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .backend import namespace, rng, to_numpy
from .validation import check_int

Array = Any

__all__ = ["UniformLabelSampler", "ShardedUniformLabelSampler", "largest_remainder"]


def largest_remainder(share: np.ndarray, total: int, gen: np.random.Generator) -> np.ndarray:
    """Integers that round the non-negative ``share`` (m,) to sum ``total`` (``sum(share)``
    up to rounding): each entry gets its floor, and the largest fractional parts one more,
    ties broken by one random permutation of the m entries (drawn from ``gen``).

    With equal shares this gives every entry ``total // m`` and ``total % m`` entries, the
    first of the permutation, one more.
    """
    m = share.shape[0]
    base = np.floor(share).astype(np.int64)
    order = gen.permutation(m)
    position = np.empty(m, dtype=np.int64)
    position[order] = np.arange(m)
    extra = total - int(base.sum())
    if extra < 0 or extra > m:
        raise ValueError(f"the shares sum to {share.sum()}, not to total={total}")
    base[np.lexsort((position, -(share - np.floor(share))))[:extra]] += 1
    return base


class UniformLabelSampler:
    """Indices for one epoch, spread evenly over the non-empty clusters of ``labels``.

    With ``m`` distinct label values and ``num_samples`` draws, every cluster gets
    ``num_samples // m`` draws and ``num_samples % m`` clusters, chosen at random each epoch,
    get one more. Within a cluster the draws walk through a random permutation of its members,
    starting over only when the cluster needs more draws than it has members, so a member is
    repeated only when necessary and then as evenly as possible. The epoch is shuffled.

    Parameters
    ----------
    labels : (N,) integer array, any backend
        Cluster assignment of each dataset sample (arbitrary identifiers; ids that do not occur
        are empty clusters and are ignored). Copied to the host once, at construction.
    num_samples : int, optional
        Draws per epoch; defaults to N.
    seed : int, default 0
        Non-negative; with the epoch, it determines the draws entirely.

    Examples
    --------
    >>> import numpy as np
    >>> sampler = UniformLabelSampler(np.array([0, 0, 0, 0, 1, 1]), seed=1)
    >>> idx = sampler.epoch_indices()
    >>> np.bincount(np.array([0, 0, 0, 0, 1, 1])[idx]).tolist()
    [3, 3]
    """

    def __init__(self, labels: Array, num_samples: int | None = None, seed: int = 0) -> None:
        namespace(labels=labels)
        host = np.asarray(to_numpy(labels))
        if host.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {host.shape}")
        if host.shape[0] == 0:
            raise ValueError("labels must not be empty")
        if host.dtype.kind not in "iu":
            raise TypeError(f"labels must have an integer dtype, got {host.dtype}")
        self.num_samples = check_int(
            host.shape[0] if num_samples is None else num_samples, "num_samples", minimum=1
        )
        self.seed = check_int(seed, "seed", minimum=0)
        self.epoch = 0
        # Dense cluster ids 0..m-1 (empty clusters dropped) and the size of each cluster.
        self._ids, self._cluster, self._sizes = np.unique(host, return_inverse=True, return_counts=True)
        self._starts = np.cumsum(self._sizes) - self._sizes

    @property
    def num_clusters(self) -> int:
        """Number of non-empty clusters (distinct label values)."""
        return int(self._sizes.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose indices `__iter__` yields (like ``DistributedSampler``)."""
        self.epoch = check_int(epoch, "epoch", minimum=0)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """All the indices of one epoch, in order.

        Parameters
        ----------
        epoch : int, optional
            Defaults to the epoch set by `set_epoch` (0 initially).

        Returns
        -------
        (num_samples,) int64 NumPy array of dataset indices in [0, N); the same for the same
        (seed, epoch).
        """
        epoch = self.epoch if epoch is None else check_int(epoch, "epoch", minimum=0)
        gen = rng(self.seed, epoch)
        m = self.num_clusters
        return self._draw(gen, largest_remainder(np.full(m, self.num_samples / m), self.num_samples, gen))

    def _draw(self, gen: np.random.Generator, quota: np.ndarray) -> np.ndarray:
        """The epoch's shuffled indices: ``quota[c]`` draws of (dense) cluster ``c``."""
        m, draws = quota.shape[0], int(quota.sum())
        # Sample indices grouped by cluster (cluster c at _starts[c]: _starts[c] + _sizes[c]),
        # in a fresh random order inside each cluster.
        members = np.lexsort((gen.random(self._cluster.shape[0]), self._cluster))
        # Draw j of cluster c takes member j mod size_c of the cluster's permutation.
        draw_cluster = np.repeat(np.arange(m), quota)
        draw_rank = np.arange(draws) - np.repeat(np.cumsum(quota) - quota, quota)
        picks = self._starts[draw_cluster] + draw_rank % self._sizes[draw_cluster]
        return gen.permutation(members[picks]).astype(np.int64, copy=False)

    def __iter__(self) -> Iterator[int]:
        """Yield the current epoch's indices as Python ints."""
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        """``num_samples``: the number of indices per epoch."""
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"UniformLabelSampler(num_samples={self.num_samples}, "
            f"num_clusters={self.num_clusters}, seed={self.seed}, epoch={self.epoch})"
        )


class ShardedUniformLabelSampler(UniformLabelSampler):
    """One shard's indices of an epoch spread evenly over clusters whose labels are sharded.

    When no process holds all N labels (each holds those of its block of samples, as
    :class:`~clusterlearn.deepcluster_shard.ShardedDeepClusterLabeler` leaves them), each shard
    draws its ``num_samples`` indices from its own samples, cluster ``c`` in proportion to the
    fraction of that cluster it holds, ``count_c / global_sizes[c]`` (largest-remainder
    rounding), walking the cluster's members as :class:`UniformLabelSampler` does. A cluster
    thus gets ``num_samples · S / m`` draws over the S shards, exactly when the shards hold
    the clusters in equal proportions (a shuffled data set cut into blocks) and otherwise up
    to the differences between the shards' mixes. Only the (C,) global sizes are exchanged.
    Shard 0 draws exactly what :class:`UniformLabelSampler` draws from the same labels, so
    one shard is the unsharded sampler.

    Parameters
    ----------
    labels : (n,) integer array, any backend: the labels of this shard's samples, rows
        ``offset .. offset + n - 1`` of the data set
    global_sizes : (C,) integer array: every cluster's size over all shards (a ``psum`` of
        the shards' bincounts), positive wherever this shard has a member
    offset : global index of this shard's first sample
    num_samples : draws of this shard per epoch (the same on every shard for DDP); default n
    seed : int, default 0; with the epoch and the shard it determines the draws
    shard : this shard's number (0 for the first)

    Notes
    -----
    ``epoch_indices`` returns global dataset indices in ``[offset, offset + n)``.
    """

    def __init__(
        self, labels: Array, global_sizes: Array, *, offset: int, num_samples: int | None = None, seed: int = 0,
        shard: int = 0,
    ) -> None:
        super().__init__(labels, num_samples, seed)
        namespace(global_sizes=global_sizes)
        sizes = np.asarray(to_numpy(global_sizes))
        if sizes.ndim != 1 or sizes.dtype.kind not in "iu":
            raise ValueError(f"global_sizes must be a 1-D integer array, got shape {sizes.shape} and dtype {sizes.dtype}")
        if self._ids[0] < 0 or self._ids[-1] >= sizes.shape[0]:
            raise ValueError(f"labels must lie in [0, len(global_sizes)={sizes.shape[0]})")
        whole = sizes[self._ids]
        if np.any(whole < self._sizes):
            raise ValueError("global_sizes must count at least this shard's members of every cluster")
        self.offset = check_int(offset, "offset", minimum=0)
        self.shard = check_int(shard, "shard", minimum=0)
        self._fraction = self._sizes / whole

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This shard's (num_samples,) int64 global indices of the epoch (default: `set_epoch`'s)."""
        epoch = self.epoch if epoch is None else check_int(epoch, "epoch", minimum=0)
        gen = rng(self.seed, epoch) if self.shard == 0 else rng(self.seed, epoch, self.shard)
        share = self.num_samples * self._fraction / self._fraction.sum()
        return self._draw(gen, largest_remainder(share, self.num_samples, gen)) + self.offset

    def __repr__(self) -> str:
        return (
            f"ShardedUniformLabelSampler(num_samples={self.num_samples}, num_clusters={self.num_clusters}, "
            f"offset={self.offset}, shard={self.shard}, seed={self.seed}, epoch={self.epoch})"
        )
