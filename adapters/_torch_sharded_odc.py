"""ODC with the sample memory sharded over ``torch.distributed`` ranks.

Rank ``r`` of W keeps the features of the samples ``[r * ceil(N / W), (r + 1) * ceil(N / W))``
(:class:`~clusterlearn.shards.ShardLayout`; ``torch.chunk``'s split of N rows, so the
features are also a ``DTensor`` sharded along dim 0); labels (4 or 8 bytes per sample, so
``labels_of`` needs no lookup), centroids, sizes and sums are replicated. A step all-gathers
the global batch (B D floats), then moves the B memory rows from their owners in one
all-reduce of bit patterns (:func:`clusterlearn.odc_shard.step`): O(B D) bytes per rank,
never O(N D), and no all-reduce of the (C, D) sums. Every rank then applies the same update,
so the replicated arrays are bit-identical on every rank and equal to one process stepping
on the concatenated batches; each owner writes back its rows.

Small-cluster handling is the core's :class:`~clusterlearn.SmallClusterHandler` on every rank
(labels are replicated, so every rank makes the same decisions); the feature rows it reads
(the small clusters' and the split clusters' members) are fetched from their owners with
:func:`clusterlearn.shards.gather_rows`.

Checkpoints: :meth:`ShardedOnlineDeepClustering.save` and :meth:`load` go through
``torch.distributed.checkpoint`` with the features as a ``DTensor``, so a run saved by W
ranks resumes on any other number of ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib

import os
from pathlib import Path
from typing import Any

import torch

from clusterlearn import kmeans_sharded, odc_shard
from clusterlearn.centroid_memory import CentroidMemory
from clusterlearn.odc_state import ODCConfig, ODCState
from clusterlearn.assignment import METRICS
from clusterlearn.backend import exact_bytes
from clusterlearn.reweighting import loss_weights
from clusterlearn.sample_memory import SampleMemory, l2_normalize
from clusterlearn.shards import ShardLayout, gather_rows
from clusterlearn.small_clusters import SmallClusterHandler, SmallClusterStats
from clusterlearn.validation import check_features, check_int, check_labels

from . import _torch_distributed as D
from ._torch_row_shards import local_rows, row_sharded

__all__ = ["ShardedOnlineDeepClustering"]


class _ShardSamples(SampleMemory):
    """The sample memory as the small-cluster handler sees it: all labels, this rank's rows,
    and :meth:`rows` fetching any rows from their owners (a collective)."""

    def __init__(self, block: torch.Tensor, labels: torch.Tensor, offset: int, num_samples: int, psum: Any) -> None:
        self.xp = SampleMemory.wrap(block, labels).xp
        self.num_samples, self.feat_dim = num_samples, block.shape[1]
        self.device, self.dtype = block.device, block.dtype
        self.features, self.labels, self.initialized = block, labels, True
        self._offset, self._psum = offset, psum

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.features, indices.cpu().numpy(), self._offset, self._psum).to(self.device)


class ShardedOnlineDeepClustering:
    """ODC memories whose (N, D) features are split over the ranks of a process group.

    Parameters
    ----------
    num_samples, num_clusters, feat_dim : N, C, D
    device : where this rank's memory lives (default: the CPU; the current CUDA device for NCCL)
    dtype : floating dtype of the features and centroids (default ``torch.float32``)
    group : the ``torch.distributed`` process group (default: the world; one process works too)
    **settings : the :class:`~clusterlearn.odc_state.ODCConfig` settings (``momentum``,
        ``min_cluster_size``, ``centroid_update_interval``, ``small_cluster_interval``,
        ``reweight_power``, ``metric``, ``seed``, ``resync_interval``)

    Notes
    -----
    Every method but :meth:`labels_of`, :meth:`loss_weights` and the properties is a
    collective: every rank calls it, with batches of equal size. A bad argument on one rank
    raises on every rank (``ValueError``/``TypeError`` there, ``ValueError`` naming the rank
    elsewhere) before anything changes.

    Examples
    --------
    >>> odc = ShardedOnlineDeepClustering(len(dataset), 10_000, 256)      # doctest: +SKIP
    >>> rows = odc.shard_indices()             # the samples this rank extracts  # doctest: +SKIP
    >>> odc.initialize(extract_features(model, DataLoader(Subset(dataset, rows), batch_size=256), local=True))  # doctest: +SKIP
    >>> for idx, x in loader:                                               # doctest: +SKIP
    ...     f = model(x); loss = cross_entropy(head(f), odc.labels_of(idx), weight=odc.loss_weights(f))
    ...     loss.backward(); opt.step(); opt.zero_grad()
    ...     stats = odc.step(idx, f.detach())
    """

    def __init__(
        self,
        num_samples: int,
        num_clusters: int,
        feat_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        group: Any = None,
        **settings: Any,
    ) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.config = ODCConfig(num_samples, num_clusters, feat_dim, **settings)
        self.group = group
        self.world_size, self.rank = D.world_size(group), D.rank(group)
        self.layout = ShardLayout(self.config.num_samples, self.world_size)
        self.device = D.comm_device(group) if device is None else torch.device(device)
        self.dtype = dtype
        c = self.config
        self.handler = SmallClusterHandler(c.min_cluster_size, metric=c.metric, seed=c.seed)
        self.state: ODCState | None = None
        self._psum = D.psum(group)

    # ------------------------------------------------------------------ helpers
    @property
    def offset(self) -> int:
        """Global row of this rank's first sample."""
        return self.layout.start(self.rank)

    def shard_indices(self) -> torch.Tensor:
        """(n,) int64 dataset indices whose features this rank holds (and :meth:`initialize` takes)."""
        stop = min(self.offset + self.layout.block, self.config.num_samples)
        return torch.arange(self.offset, stop, dtype=torch.int64)


    def _agree(self, what: str, check: Any, header: list[Any], names: list[str]) -> None:
        """Run ``check`` here, then raise on every rank if any rank failed or ``header`` differs."""
        _, err = D.first_error(check)
        settings = [repr(self.config), str(self.dtype), -1 if self.state is None else int(self.state.iteration)]
        D.agree([*header, *settings], err, what=what, names=[*names, "settings", "memory dtype", "iteration"],
                group=self.group)

    def _require_initialized(self) -> None:
        if self.state is None:
            raise RuntimeError("the memories are empty: call initialize() or load() first")

    # ------------------------------------------------------------------ API
    def initialize(self, features: torch.Tensor, labels: torch.Tensor | None = None, *, n_iter: int = 20) -> dict[str, int]:
        """Fill the memories from this rank's features (a collective; nothing is gathered).

        Parameters
        ----------
        features : (n, D) features of the samples :meth:`shard_indices` (in that order)
        labels : (N,) initial labels of all samples, equal on every rank; omitted: k-means
            over all ranks' features (:func:`clusterlearn.kmeans_sharded.kmeans_sharded`)
        n_iter : Lloyd rounds of that k-means

        Returns
        -------
        dict
            The small-cluster handling's ``num_small_clusters`` and ``num_splits``.
        """
        rows = self.shard_indices().shape[0]

        def check() -> None:
            if not isinstance(features, torch.Tensor):
                raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
            check_features(features, "features", dim=self.config.feat_dim, rows=rows)
            if labels is not None:
                if not isinstance(labels, torch.Tensor):
                    raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
                check_labels(labels, "labels", upper=self.config.num_clusters, length=self.config.num_samples)
            check_int(n_iter, "n_iter", minimum=0)

        self._agree("ShardedOnlineDeepClustering.initialize", check, [labels is None], ["labels omitted"])
        unit = l2_normalize(l2_normalize(features.to(self.device, self.dtype)))
        if labels is None:
            local = kmeans_sharded.kmeans_sharded(
                unit, self.config.num_clusters, offset=self.offset, num_samples=self.config.num_samples,
                shard=self.rank, num_shards=self.world_size, psum=self._psum, n_iter=n_iter, seed=self.config.seed,
            ).labels
            everyone = torch.zeros(self.config.num_samples, dtype=torch.int64, device=self.device)
            everyone[self.offset : self.offset + rows] = local.to(torch.int64)
            labels = self._psum(everyone)  # O(N) integers, once
        block = torch.zeros((self.layout.block, self.config.feat_dim), dtype=self.dtype, device=self.device)
        block[:rows] = unit
        self.state = odc_shard.init(block, labels.to(self.device), self.config.num_clusters, self.layout, self.rank, self._psum)
        handled = self._handle_small_clusters(key=0)
        return {"num_small_clusters": handled.num_small_clusters, "num_splits": handled.num_splits}

    def step(self, indices: torch.Tensor, features: torch.Tensor) -> dict[str, float | int | bool]:
        """One ODC memory iteration on this rank's batch (a collective).

        ``indices`` (b,) and ``features`` (b, D), the same b on every rank. Returns what the
        replicated :meth:`clusterlearn.OnlineDeepClustering.step` returns, for the global batch.
        """
        if isinstance(features, torch.Tensor):
            features = features.detach()

        def check() -> None:
            self._require_initialized()
            for name, x in (("indices", indices), ("features", features)):
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            check_labels(indices, "indices", upper=self.config.num_samples)
            check_features(features, "features", dim=self.config.feat_dim, rows=indices.shape[0])
            if not bool(torch.isfinite(features.to(self.dtype)).all()):
                raise ValueError(f"features exceed the range of the memory's dtype {self.dtype}")

        shape = list(features.shape) if isinstance(features, torch.Tensor) else []
        self._agree("ShardedOnlineDeepClustering.step", check, shape, ["batch shape"])
        dev = D.comm_device(self.group)
        idx = D.all_gather_cat(indices.to(dev, torch.int64), self.group).to(self.device)
        feats = D.all_gather_cat(features.to(dev, self.dtype), self.group).to(self.device)
        self.state, stats = odc_shard.step(self.state, idx, feats, self.config, self.layout, self.rank, self._psum)
        handled = SmallClusterStats(0, 0, 0)
        if int(self.state.iteration) % self.config.small_cluster_interval == 0:
            handled = self._handle_small_clusters(key=int(self.state.iteration))
        return {
            "change_ratio": int(stats["num_changed"]) / int(stats["num_distinct"]),
            "num_small_clusters": handled.num_small_clusters,
            "num_splits": handled.num_splits,
            "centroids_refreshed": bool(stats["centroids_refreshed"]),
        }

    def _handle_small_clusters(self, key: int) -> SmallClusterStats:
        s = self.state
        if not bool((s.sizes < self.config.min_cluster_size).any()):
            return SmallClusterStats(0, 0, 0)
        samples = _ShardSamples(s.features, s.labels, self.offset, self.config.num_samples, self._psum)
        centroids = CentroidMemory(self.config.num_clusters, self.config.feat_dim, xp=samples.xp, device=self.device, dtype=self.dtype)
        centroids.set_state(s.centroids, s.sizes, s.sums)
        handled = self.handler(samples, centroids, key=key)
        self.state = s._replace(labels=samples.labels, centroids=centroids.centroids, sizes=centroids.sizes, sums=centroids.sums)
        return handled

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        """(B,) pseudo-labels of dataset ``indices`` (local: the labels are replicated)."""
        self._require_initialized()
        check_labels(indices, "indices", upper=self.config.num_samples)
        return self.state.labels[indices.to(self.device)].to(indices.device)

    def loss_weights(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """(C,) class weights ``w_c ∝ n_c ** -p`` (see :func:`clusterlearn.reweighting.loss_weights`), on ``like``'s device/dtype."""
        self._require_initialized()
        w = loss_weights(self.state.sizes, self.config.reweight_power)
        return w if like is None else w.to(like.device, like.dtype if like.is_floating_point() else w.dtype)

    @property
    def labels(self) -> torch.Tensor:
        """(N,) copy of all pseudo-labels."""
        self._require_initialized()
        return self.state.labels.clone()

    @property
    def cluster_sizes(self) -> torch.Tensor:
        """(C,) copy of the cluster sizes."""
        self._require_initialized()
        return self.state.sizes.clone()

    def _replicated_digest(self) -> str:
        """SHA-256 of the replicated arrays' exact bytes (labels, centroids, sizes, sums, iteration)."""
        digest = hashlib.sha256()
        for name in ODCState._fields[1:]:
            dtype, shape, data = exact_bytes(getattr(self.state, name))
            digest.update(f"{name} {dtype} {list(shape)}".encode() + data)
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the replicated arrays and the settings: equal on every rank
        of a healthy run (each rank's feature rows are its own and are not digested)."""
        self._require_initialized()
        return hashlib.sha256((self._replicated_digest() + repr(self.config)).encode()).hexdigest()

    def check_consistency(self) -> None:
        """Raise ``ValueError`` on every rank if the replicated arrays differ between ranks (a collective)."""
        self._require_initialized()
        self._agree("ShardedOnlineDeepClustering.check_consistency", lambda: None, [self._replicated_digest()],
                    ["replicated memory digest"])

    def local_features(self) -> torch.Tensor:
        """(n, D) this rank's memory features (rows :meth:`shard_indices`), the live buffer."""
        self._require_initialized()
        return self.state.features[: self.shard_indices().shape[0]]

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Write the memories to the directory ``path`` with ``torch.distributed.checkpoint`` (a collective).

        The features are saved as one (N, D) ``DTensor`` sharded along dim 0, the rest once;
        :meth:`load` reads them back under any number of ranks.
        """
        import torch.distributed.checkpoint as dcp

        self._require_initialized()
        dcp.save(self._checkpoint_dict(), checkpoint_id=str(path), no_dist=self.world_size == 1)

    def load(self, path: str | os.PathLike) -> None:
        """Read memories written by :meth:`save` under any number of ranks (a collective).

        The settings must equal this object's (``ValueError`` on every rank otherwise).
        """
        import torch.distributed.checkpoint as dcp

        path = Path(path)

        def check() -> None:
            if not (path / ".metadata").is_file():
                raise ValueError(f"path {str(path)!r} holds no torch.distributed.checkpoint (no .metadata)")

        self._agree("ShardedOnlineDeepClustering.load", check, [], [])
        target = self._checkpoint_dict(empty=True)
        dcp.load(target, checkpoint_id=str(path), no_dist=self.world_size == 1)
        saved = target["settings"]
        want = _settings_tensor(self.config)
        if not torch.equal(saved, want):
            raise ValueError(f"the checkpoint at {str(path)!r} was written with other settings than {self.config}")
        features = local_rows(target["features"])
        block = torch.zeros((self.layout.block, self.config.feat_dim), dtype=self.dtype, device=self.device)
        block[: features.shape[0]] = features.to(self.device, self.dtype)
        self.state = ODCState(
            block, *(target[k].to(self.device) for k in ("labels", "centroids", "sizes", "sums", "iteration"))
        )

    def _checkpoint_dict(self, empty: bool = False) -> dict[str, Any]:
        c = self.config
        rows = self.shard_indices().shape[0]
        if empty:
            acc = torch.float64
            s = ODCState(
                torch.zeros((self.layout.block, c.feat_dim), dtype=self.dtype, device=self.device),
                torch.zeros(c.num_samples, dtype=torch.int64, device=self.device),
                torch.zeros((c.num_clusters, c.feat_dim), dtype=self.dtype, device=self.device),
                torch.zeros(c.num_clusters, dtype=torch.int64, device=self.device),
                torch.zeros((c.num_clusters, c.feat_dim), dtype=acc, device=self.device),
                torch.zeros((), dtype=torch.int64, device=self.device),
            )
        else:
            s = self.state
        return {
            "features": row_sharded(s.features[:rows].contiguous(), c.num_samples, self.group),
            **{k: getattr(s, k) for k in ("labels", "centroids", "sizes", "sums", "iteration")},
            "settings": _settings_tensor(c),
        }


def _settings_tensor(config: ODCConfig) -> torch.Tensor:
    """The settings, field by field, as float64 numbers (the metric by its index in
    :data:`~clusterlearn.assignment.METRICS`, None as -1), for a checkpoint and its check:
    a tensor of fixed size, as ``torch.distributed.checkpoint`` loads into a given shape."""
    def number(value: Any) -> float:
        return -1.0 if value is None else float(METRICS.index(value)) if isinstance(value, str) else float(value)

    return torch.tensor([number(getattr(config, f.name)) for f in dataclasses.fields(config)], dtype=torch.float64)
