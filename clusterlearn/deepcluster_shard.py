"""DeepCluster's pseudo-labelling when the features are split over S shards.

Each shard (process or device) holds the features of a contiguous block of the N samples.
:class:`ShardedDeepClusterLabeler` does per epoch what
:class:`~clusterlearn.deepcluster.DeepClusterLabeler` does, as collectives over a ``psum``
(element-wise sum over shards: ``torch.distributed.all_reduce``, ``jax.lax.psum``):

* PCA-whitening fitted on all rows from the all-reduced mean and (D, D) scatter
  (:meth:`clusterlearn.pca.PCAWhitening.fit` with ``psum``), the same transform on every shard;
* k-means over all shards without gathering the points (:func:`~clusterlearn.kmeans_sharded.kmeans_sharded`:
  seeds from a bounded sample, Lloyd with all-reduced sums, no empty cluster);
* labels left sharded: each shard keeps its rows' labels (no shard holds N labels); the
  stability signal, the NMI between consecutive epochs, comes from one ``psum`` of the (k, k)
  contingency table (:func:`clusterlearn.metrics.nmi_from_contingency`); the cluster sizes
  from one ``psum`` of a (k,) bincount, which is what the shards'
  :class:`~clusterlearn.sampler.ShardedUniformLabelSampler` need to draw uniformly over clusters.

Bytes moved per epoch: O(D^2 + k·D·iterations + k^2), independent of N, plus the seeding
sample (at most ``sample_per_centroid · k`` rows).
"""

from __future__ import annotations

from typing import Any

import array_api_compat as aac
import numpy as np

from . import backend as B
from . import metrics
from .deepcluster import _MAX_SEED, DeepClusterEpoch, DeepClusterLabeler
from .kmeans_sharded import kmeans_sharded
from .pca import PCAWhitening
from .sampler import ShardedUniformLabelSampler
from .shards import Psum
from .validation import check_features, check_int

Array = Any

__all__ = ["ShardedDeepClusterLabeler"]


class ShardedDeepClusterLabeler(DeepClusterLabeler):
    """Per-epoch PCA-whitening + L2 + k-means of features split over shards; labels stay sharded.

    Parameters
    ----------
    num_clusters : k
    offset : global row of this shard's first sample
    num_samples : N, the rows of all shards together (k <= N)
    shard, num_shards : this shard's number in [0, num_shards) and the number of shards
    psum : element-wise sum over shards, the result on every shard
    pca_dim, n_iter, seed : as :class:`~clusterlearn.deepcluster.DeepClusterLabeler`
    sample_per_centroid : rows per cluster of the k-means seeding sample (faiss' default 256)

    Notes
    -----
    Every call is a collective: all shards call it in the same order with their (n_s, D)
    features of rows ``offset .. offset + n_s - 1``. The returned
    :class:`~clusterlearn.deepcluster.DeepClusterEpoch` holds this shard's (n_s,) labels;
    ``nmi_previous`` and ``inertia`` are global. :meth:`assign` and the state dict work as in
    the unsharded labeler (the previous labels are this shard's).
    """

    def __init__(
        self,
        num_clusters: int,
        *,
        offset: int,
        num_samples: int,
        shard: int,
        num_shards: int,
        psum: Psum,
        pca_dim: int = 256,
        n_iter: int = 20,
        seed: int = 0,
        sample_per_centroid: int = 256,
    ) -> None:
        super().__init__(num_clusters, pca_dim=pca_dim, n_iter=n_iter, seed=seed, backend="array", init="k-means++")
        self.offset = check_int(offset, "offset", minimum=0)
        self.num_samples = check_int(num_samples, "num_samples", minimum=self.num_clusters)
        self.num_shards = check_int(num_shards, "num_shards", minimum=1)
        self.shard = check_int(shard, "shard", minimum=0)
        if self.shard >= self.num_shards:
            raise ValueError(f"shard must be in [0, num_shards={self.num_shards}), got {shard}")
        if not callable(psum):
            raise TypeError(f"psum must be callable, got {type(psum).__name__}")
        self.psum = psum
        self.sample_per_centroid = check_int(sample_per_centroid, "sample_per_centroid", minimum=1)

    def __call__(self, features: Array) -> DeepClusterEpoch:
        """Cluster one epoch's features, this shard's rows (a collective); see the class."""
        xp = B.namespace(features=features)
        check_features(features, "features", allow_empty=True)
        n, d = features.shape
        if self.offset + n > self.num_samples:
            raise ValueError(f"rows [offset, offset + n) = [{self.offset}, {self.offset + n}) exceed num_samples={self.num_samples}")
        if self._previous is not None and self._previous.shape[0] != n:
            raise ValueError(f"features has {n} rows but the previous epoch had {self._previous.shape[0]}; call reset()")
        dim = min(self.pca_dim, self.num_samples, d)
        shards = {"shard": self.shard, "num_shards": self.num_shards}
        pca = PCAWhitening(dim).fit(features, psum=self.psum, **shards)
        reduced = pca.transform(features) if n else xp.zeros((0, dim), dtype=features.dtype, device=aac.device(features))
        seed = int(B.rng(self.seed, self.epoch).integers(_MAX_SEED))
        result = kmeans_sharded(reduced, self.num_clusters, offset=self.offset, num_samples=self.num_samples,
                                psum=self.psum, n_iter=self.n_iter, seed=seed,
                                sample_per_centroid=self.sample_per_centroid, **shards)
        host = np.array(B.to_numpy(result.labels), dtype=np.int64)
        score = None
        if self._previous is not None:
            k = self.num_clusters
            table = np.bincount(self._previous * k + host, minlength=k * k).reshape(k, k)
            score = metrics.nmi_from_contingency(self.psum(xp.asarray(table, device=aac.device(features))))
        epoch = self.epoch
        self.pca_, self.centroids_, self._previous, self.epoch = pca, result.centroids, host, epoch + 1
        return DeepClusterEpoch(result.labels, score, result.n_empty_fixed, result.inertia, epoch, dim)

    def cluster_sizes(self, labels: Array) -> Array:
        """(k,) sizes of the clusters over all shards, from this shard's ``labels`` (a collective)."""
        return self.psum(B.bincount(labels, self.num_clusters))

    def sampler(self, labels: Array, num_samples: int | None = None, seed: int = 0) -> ShardedUniformLabelSampler:
        """This shard's :class:`~clusterlearn.sampler.ShardedUniformLabelSampler` over ``labels`` (a collective)."""
        return ShardedUniformLabelSampler(labels, self.cluster_sizes(labels), offset=self.offset,
                                          num_samples=num_samples, seed=seed, shard=self.shard)

    def __repr__(self) -> str:
        return (
            f"ShardedDeepClusterLabeler(num_clusters={self.num_clusters}, shard={self.shard}/{self.num_shards}, "
            f"offset={self.offset}, num_samples={self.num_samples}, pca_dim={self.pca_dim}, n_iter={self.n_iter}, "
            f"seed={self.seed}, epoch={self.epoch})"
        )
