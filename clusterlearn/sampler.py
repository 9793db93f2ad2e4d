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

__all__ = ["UniformLabelSampler"]


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
        _, self._cluster, self._sizes = np.unique(host, return_inverse=True, return_counts=True)
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
        quota = np.full(m, self.num_samples // m, dtype=np.int64)
        quota[gen.permutation(m)[: self.num_samples % m]] += 1
        # Sample indices grouped by cluster (cluster c at _starts[c]: _starts[c] + _sizes[c]),
        # in a fresh random order inside each cluster.
        members = np.lexsort((gen.random(self._cluster.shape[0]), self._cluster))
        # Draw j of cluster c takes member j mod size_c of the cluster's permutation.
        draw_cluster = np.repeat(np.arange(m), quota)
        draw_rank = np.arange(self.num_samples) - np.repeat(np.cumsum(quota) - quota, quota)
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
