"""Small-cluster handling: dissolve clusters below a size threshold, re-seed them by splitting.

One call does, in order (ODC's rule, done in a constant number of passes over the N labels
instead of the reference's full scan per small cluster):

1. **Dissolve.** Every cluster with fewer than ``min_cluster_size`` members is *small*
   (empty ones included). All members of all small clusters move, in one batched assignment,
   to their nearest *normal* centroid. One pass over the labels.
2. **Split.** Each now-empty cluster ``e`` (in increasing id order) takes a share of the
   currently largest cluster (ties: lowest id): its members are 2-means clustered (seeded by
   ``(seed, key, e)``) and the second half becomes cluster ``e``. If a half has fewer than
   ``min(min_cluster_size, m // 2)`` of the ``m`` members, the members of the other half
   nearest to its mean move into it until it has that many. The members of every cluster
   that may be split are gathered in one more pass over the labels: greedy splitting only
   ever takes the k largest clusters or halves of them, for k empty clusters.
3. **Fill** (only when ``N < 2 * C * min_cluster_size``, where a split cluster can be too
   small to give both halves the threshold): every cluster still short takes the samples
   nearest to its mean from clusters with members to spare (more than the threshold),
   nearest first, never taking a donor below the threshold. Host-side, O(N D) per short
   cluster; it never runs when ``N >= 2 * C * min_cluster_size``.
4. Centroids of every cluster touched are set to their members' means.

Guarantee: with ``N >= C * min_cluster_size`` no cluster is smaller than ``min_cluster_size``
afterwards (with ``N >= 2 * C * min_cluster_size`` the largest cluster always has twice the
threshold, so the splits alone suffice; below that the fill takes the rest from the clusters'
total surplus, which is at least the total deficit). ``N < C * min_cluster_size`` is
impossible to satisfy and rejected by :class:`~clusterlearn.OnlineDeepClustering`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat as aac
import numpy as np

from . import backend as B
from .validation import check_int
from .assignment import METRICS, Metric
from .centroid_memory import CentroidMemory
from .kmeans import kmeans
from .odc_state import ODCConfig, ODCState
from .sample_memory import SampleMemory

Array = Any

__all__ = ["SmallClusterHandler", "SmallClusterStats", "handle_small_clusters"]


@dataclass(frozen=True)
class SmallClusterStats:
    """What one handling call did."""

    num_small_clusters: int  # clusters below the threshold (all dissolved and re-seeded)
    num_splits: int  # clusters split to re-seed them (equals num_small_clusters)
    num_moved: int  # samples moved out of small clusters in the dissolve step


class SmallClusterHandler:
    """Keeps every cluster at or above ``min_cluster_size`` members.

    Parameters
    ----------
    min_cluster_size : threshold (20 in ODC); 0 or 1 disables dissolving but still refills
        empty clusters when ``min_cluster_size == 1``
    metric : nearest-centroid rule for the dissolve step, ``"l2"`` or ``"dot"``
    n_iter : Lloyd iterations of each 2-means split (``split_iters=`` is its deprecated name)
    seed : base seed of the splits
    """

    def __init__(
        self, min_cluster_size: int = 20, *, metric: Metric = "l2", n_iter: int = 10, seed: int = 0,
        split_iters: int | None = None,
    ):
        if split_iters is not None:
            warnings.warn("SmallClusterHandler(split_iters=...) is deprecated, use n_iter=... (docs/glossary.md)",
                          DeprecationWarning, stacklevel=2)
            n_iter = split_iters
        self.min_cluster_size = check_int(min_cluster_size, "min_cluster_size", minimum=0)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        self.n_iter = check_int(n_iter, "n_iter", minimum=1)
        self.seed = check_int(seed, "seed")

    @property
    def split_iters(self) -> int:
        """Deprecated name of ``n_iter``."""
        warnings.warn("SmallClusterHandler.split_iters is deprecated, use n_iter (docs/glossary.md)",
                      DeprecationWarning, stacklevel=2)
        return self.n_iter

    def __call__(self, samples: SampleMemory, centroids: CentroidMemory, *, key: int = 0) -> SmallClusterStats:
        """Handle small clusters of the memories in place; ``key`` varies the split seeds."""
        xp = samples.xp
        small = centroids.sizes < self.min_cluster_size
        num_small = int(xp.sum(xp.astype(small, centroids.sizes.dtype)))
        if num_small == 0:
            return SmallClusterStats(0, 0, 0)
        if B.compiles_per_shape(xp):
            return self._on_host(samples, centroids, key)
        moved, receivers = self._dissolve(samples, centroids, small)
        empties = B.to_numpy(xp.nonzero(small)[0])
        touched = self._split(samples, centroids, empties, key)
        if bool(xp.any(centroids.sizes < self.min_cluster_size)):
            touched += self._fill(samples, centroids)
        refresh = np.unique(np.concatenate([receivers, np.asarray(touched, dtype=np.int64)]))
        centroids.refresh(xp.asarray(refresh, device=samples.device))
        return SmallClusterStats(num_small, len(empties), moved)

    def _on_host(self, samples: SampleMemory, centroids: CentroidMemory, key: int) -> SmallClusterStats:
        """The handling (some cluster is small) on NumPy copies of the memories, features read
        through a host view, the changed arrays written back in their namespace, dtypes and
        device: eager JAX would compile every operation anew for each data-dependent shape,
        seconds per call. NumPy's integer and accumulator dtypes (bfloat16 features widened to
        float32), as the JAX adapter's ``handle_small_clusters``: given the same state, the core
        on JAX arrays and the adapter hand back the same bits."""
        xp, device = samples.xp, samples.device
        features = B.to_numpy(samples.features)  # a view on CPU; the handler never writes features
        host_samples = SampleMemory.wrap(features, B.to_numpy(samples.labels).astype(np.int64), momentum=samples.momentum)
        host_centroids = CentroidMemory(centroids.num_clusters, centroids.feat_dim, xp=np, device="cpu", dtype=features.dtype)
        host_centroids.set_state(np.array(B.to_numpy(centroids.centroids)), B.to_numpy(centroids.sizes).astype(np.int64),
                                 B.to_numpy(centroids.sums).astype(host_centroids.acc_dtype))
        stats = self(host_samples, host_centroids, key=key)

        def back(new: np.ndarray, like: Array) -> Array:
            return xp.asarray(new.astype(np.dtype(like.dtype)), device=device)  # cast on the host

        samples.set_state(samples.features, back(host_samples.labels, samples.labels))
        centroids.set_state(back(host_centroids.centroids, centroids.centroids),
                            back(host_centroids.sizes, centroids.sizes), back(host_centroids.sums, centroids.sums))
        return stats

    def _dissolve(self, samples: SampleMemory, centroids: CentroidMemory, small: Array) -> tuple[int, np.ndarray]:
        """Move members of small clusters to their nearest normal centroid.

        Returns the number of samples moved and the ids of the clusters that received them.
        """
        xp = samples.xp
        members = xp.nonzero(xp.take(small, samples.labels))[0]
        if members.shape[0] == 0:
            return 0, np.zeros(0, dtype=np.int64)
        feats = samples.rows(members)
        old = xp.take(samples.labels, members)
        new = xp.astype(centroids.assign(feats, metric=self.metric, exclude=small), old.dtype)
        samples.set_labels(members, new)
        centroids.move(old, new, feats, feats)
        receivers = B.to_numpy(xp.nonzero(B.bincount(new, centroids.num_clusters) > 0)[0])
        return int(members.shape[0]), receivers.astype(np.int64)

    def _split(self, samples: SampleMemory, centroids: CentroidMemory, empties: np.ndarray, key: int) -> list[int]:
        """Re-seed each empty cluster by splitting the largest; returns the touched ids."""
        xp = samples.xp
        sizes = B.to_numpy(centroids.sizes).astype(np.int64)
        candidates = np.argsort(-sizes, kind="stable")[: len(empties)]
        members = self._members_of(samples, candidates, centroids.num_clusters)
        touched: list[int] = []
        for e in empties.tolist():
            c = int(np.argmax(sizes))  # first maximum: ties go to the lowest id
            idx = members[c]
            halves = self._two_halves(B.to_numpy(samples.rows(idx)), key, e)
            keep, give = (xp.asarray(h, device=samples.device) for h in halves)
            moving = xp.take(idx, give)
            feats = samples.rows(moving)
            old = xp.full(moving.shape, c, dtype=samples.labels.dtype, device=samples.device)
            new = xp.full(moving.shape, e, dtype=samples.labels.dtype, device=samples.device)
            samples.set_labels(moving, new)
            centroids.move(old, new, feats, feats)
            members[c], members[e] = xp.take(idx, keep), moving
            sizes[c], sizes[e] = int(keep.shape[0]), int(give.shape[0])
            touched += [c, e]
        return touched

    def _fill(self, samples: SampleMemory, centroids: CentroidMemory) -> list[int]:
        """Top up clusters still below the threshold from clusters with spare members."""
        xp, m = samples.xp, self.min_cluster_size
        labels = B.to_numpy(samples.labels).astype(np.int64)
        feats = B.to_numpy(samples.rows(xp.arange(samples.num_samples, device=samples.device)))
        sizes = np.bincount(labels, minlength=centroids.num_clusters)
        touched: list[int] = []
        for e in np.flatnonzero(sizes < m).tolist():
            spare = np.maximum(sizes - m, 0)
            donors = np.flatnonzero(spare[labels] > 0)
            d2 = ((feats[donors] - feats[labels == e].mean(axis=0)) ** 2).sum(axis=1)
            order = donors[np.argsort(d2, kind="stable")]
            # rank of each candidate among its donor's candidates, nearest first
            by_donor = np.argsort(labels[order], kind="stable")
            starts = np.searchsorted(labels[order][by_donor], labels[order][by_donor])
            rank = np.empty(len(order), dtype=np.int64)
            rank[by_donor] = np.arange(len(order)) - starts
            take = order[rank < spare[labels[order]]][: m - sizes[e]]
            old = labels[take]
            labels[take] = e
            np.add.at(sizes, old, -1)
            sizes[e] += len(take)
            moving = xp.asarray(take, device=samples.device)
            rows = samples.rows(moving)
            old_x = xp.asarray(old, dtype=samples.labels.dtype, device=samples.device)
            new_x = xp.full(moving.shape, e, dtype=samples.labels.dtype, device=samples.device)
            samples.set_labels(moving, new_x)
            centroids.move(old_x, new_x, rows, rows)
            touched += [e, *np.unique(old).tolist()]
        return touched

    @staticmethod
    def _members_of(samples: SampleMemory, clusters: np.ndarray, num_clusters: int) -> dict[int, Array]:
        """Sample indices of each listed cluster, from one pass over the labels."""
        xp = samples.xp
        table = np.zeros(num_clusters, dtype=bool)
        table[clusters] = True
        hit = xp.nonzero(xp.take(xp.asarray(table, device=samples.device), samples.labels))[0]
        lab = xp.take(samples.labels, hit)
        order = xp.argsort(lab, stable=True)
        hit, lab = xp.take(hit, order), B.to_numpy(xp.take(lab, order))
        bounds = np.searchsorted(lab, clusters, side="left"), np.searchsorted(lab, clusters, side="right")
        return {int(c): hit[int(lo) : int(hi)] for c, lo, hi in zip(clusters, *bounds)}

    def _two_halves(self, feats: np.ndarray, key: int, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions (into ``feats``) of the half that stays and the half that leaves.

        Runs on the host: one cluster's members are few (N / C on average), so the copy is
        cheap on any device, and every backend gets bit-identical splits.
        """
        m = feats.shape[0]
        halves = kmeans(
            feats, 2, n_iter=self.n_iter, seed=int(B.rng(self.seed, key, e).integers(2**31)), backend="array"
        )  # array backend: k-means++ splits, identical whether or not faiss is installed
        second = halves.labels == 1
        target = min(self.min_cluster_size, m // 2)
        count = int(second.sum())
        if count < target:  # pull the nearest of the first half into the second
            second[_nearest_outside(feats, second, target - count)] = True
        elif m - count < target:  # and vice versa
            second[_nearest_outside(feats, ~second, target - m + count)] = False
        return np.flatnonzero(~second), np.flatnonzero(second)


def _nearest_outside(feats: np.ndarray, inside: np.ndarray, count: int) -> np.ndarray:
    """Positions of the ``count`` rows outside the mask ``inside`` nearest to its rows' mean."""
    outside = np.flatnonzero(~inside)
    d2 = ((feats[outside] - feats[inside].mean(axis=0)) ** 2).sum(axis=1)
    return outside[np.argsort(d2, kind="stable")[:count]]


class _FetchedSamples(SampleMemory):
    """A sample memory whose :meth:`rows` come from a given function (a memory held elsewhere)."""

    fetch: Callable[[Array], Array]

    def rows(self, indices: Array) -> Array:
        return self.fetch(indices)


def handle_small_clusters(
    state: ODCState, config: ODCConfig, *, key: int, rows: Callable[[Array], Array] | None = None
) -> tuple[ODCState, SmallClusterStats]:
    """:class:`SmallClusterHandler` (``config``'s threshold, metric and seed) on an
    :class:`~clusterlearn.odc_state.ODCState`, returning the new state.

    Eager (data-dependent shapes): for a state held outside an
    :class:`~clusterlearn.OnlineDeepClustering`, such as the JAX adapter's host copy. The
    features are read, never written (the returned state holds the same ``features`` object);
    labels, centroids, sizes and sums are copied (labels and sizes to the namespace's index
    dtype, sums to its accumulator dtype) before the handler changes them.

    ``rows``, if given, is how the handler reads features: ``rows(indices)`` returns the (R, D)
    features of the samples ``indices`` (R,), both in the state's namespace. For a memory
    whose features are not all here (sharded over processes), ``rows`` fetches them and
    ``state.features`` only gives the namespace, device and dtype: any (N, D) array of them,
    such as a zero-stride ``numpy.broadcast_to``. The handler asks for the members of the
    small clusters, of the clusters it splits, and all N rows only in its fill step (which
    needs ``N < 2 * C * min_cluster_size``); every call asks for the same rows given the same
    labels and sizes.
    """
    if rows is not None and not callable(rows):
        raise TypeError(f"rows must be callable (indices -> features) or None, got {type(rows).__name__}")
    xp = B.namespace(**{f"state.{k}": v for k, v in state._asdict().items()})
    device = aac.device(state.features)
    index, acc = B.index_dtype(xp, device), B.accumulator_dtype(xp, device)
    cls = SampleMemory if rows is None else _FetchedSamples
    samples = cls.wrap(state.features, xp.astype(state.labels, index), momentum=config.momentum)
    if rows is not None:
        samples.fetch = rows
    centroids = CentroidMemory(config.num_clusters, config.feat_dim, xp=xp, device=device, dtype=state.features.dtype)
    centroids.set_state(xp.astype(state.centroids, state.features.dtype, copy=True), xp.astype(state.sizes, index),
                        xp.astype(state.sums, acc))
    handler = SmallClusterHandler(config.min_cluster_size, metric=config.metric, seed=config.seed)
    stats = handler(samples, centroids, key=key)
    new = state._replace(labels=samples.labels, centroids=centroids.centroids, sizes=centroids.sizes, sums=centroids.sums)
    return new, stats
