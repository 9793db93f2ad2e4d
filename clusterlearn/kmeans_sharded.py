"""k-means over points split across shards (processes or devices), never gathering them.

Each shard holds a contiguous block of the N points (its first row is global row
``offset``) and passes a ``psum`` collective (element-wise sum over shards, the result on
every shard: ``torch.distributed.all_reduce``, ``jax.lax.psum``). The algorithm:

1. **Seeds from a bounded sample.** ``min(N, sample_per_centroid * k)`` global rows, drawn
   from ``seed`` alone (so the sample does not depend on the number of shards), are put
   together on every shard by one ``psum`` of their bit patterns (exact), and clustered there
   by :func:`clusterlearn.kmeans` (array backend, k-means++): every shard computes the same
   centroids. This is faiss' ``max_points_per_centroid`` training.
2. **Lloyd over all points** (``n_iter`` rounds): each shard assigns its rows to the nearest
   centroid; the (k, D) sums and (k,) counts are all-reduced and the centroids become the
   means. A cluster left empty takes the point farthest from its centroid over all shards
   (each shard offers its farthest rows; ties go to the lower global row), as
   :func:`clusterlearn.kmeans.relocate_empty` does on one shard: no cluster is ever empty.
3. The returned labels are each shard's rows' final assignment.

Communication per Lloyd round: O(k D) (never O(N D)). The sums are float64 where the
backend has it, so the centroids agree with a one-shard run to rounding.
"""

from __future__ import annotations

from typing import Any

import array_api_compat as aac
import numpy as np

from . import backend as B
from .assignment import nearest_centroid
from .kmeans import KMeansResult, kmeans
from .shards import Psum, gather_rows
from .validation import check_features, check_int

Array = Any

__all__ = ["kmeans_sharded"]


def _fill_empty(
    x: Array, labels: Array, d2: Array, centroids: Array, sizes: Array, where: tuple[int, int, int], psum: Psum
) -> tuple[Array, Array, int]:
    """Seed every empty cluster with the farthest point over all shards (a collective).

    ``where`` is (offset, shard, num_shards). Each shard offers its ``want`` farthest rows
    (distance, global row, cluster); every shard then walks the offers farthest first (ties:
    lower row) and takes a point unless that would empty its cluster, doubling ``want`` until
    every empty cluster has one (always possible: N >= k). Returns this shard's labels, the
    centroids, and the number of clusters seeded.
    """
    xp = aac.array_namespace(x)
    dev = aac.device(x)
    offset, shard, num_shards = where
    empty = np.flatnonzero(B.to_numpy(sizes) == 0)
    if len(empty) == 0:
        return labels, centroids, 0
    host_d2, host_labels = B.to_numpy(d2).astype(np.float64), B.to_numpy(labels).astype(np.int64)
    by_distance = np.argsort(-host_d2, kind="stable")
    want = len(empty)
    while True:
        mine = by_distance[:want]
        offers = np.zeros((num_shards, want, 4))  # distance, global row, cluster, valid
        offers[shard, : len(mine)] = np.stack([host_d2[mine], offset + mine, host_labels[mine], np.ones(len(mine))], axis=1)
        offers = B.to_numpy(psum(xp.asarray(offers, device=dev))).reshape(-1, 4)
        offers = offers[offers[:, 3] > 0]
        offers = offers[np.lexsort((offers[:, 1], -offers[:, 0]))]
        counts = B.to_numpy(sizes).astype(np.int64)
        picked: list[int] = []
        for _, row, c, _ in offers:  # at most num_shards * want offers: host bookkeeping
            if counts[int(c)] > 1:
                counts[int(c)] -= 1
                picked.append(int(row))
                if len(picked) == len(empty):
                    break
        everyone_done = int(B.to_numpy(psum(xp.asarray([int(want >= x.shape[0])], device=dev)))[0]) == num_shards
        if len(picked) == len(empty) or everyone_done:
            break
        want *= 2
    picked_rows = np.asarray(picked, dtype=np.int64)
    points = gather_rows(x, picked_rows, offset, psum)
    seeded = empty[: len(picked)]
    centroids = B.set_rows(centroids, xp.asarray(seeded, device=dev), points)
    own = (picked_rows >= offset) & (picked_rows < offset + x.shape[0])
    if own.any():
        pos = xp.asarray(picked_rows[own] - offset, dtype=labels.dtype, device=dev)
        labels = B.set_rows(labels, pos, xp.asarray(seeded[own], dtype=labels.dtype, device=dev))
    return labels, centroids, len(picked)


def kmeans_sharded(
    x: Array,
    k: int,
    *,
    offset: int,
    num_samples: int,
    shard: int,
    num_shards: int,
    psum: Psum,
    n_iter: int = 20,
    seed: int = 0,
    sample_per_centroid: int = 256,
) -> KMeansResult:
    """k-means of the N points whose rows ``[offset, offset + len(x))`` this shard holds.

    A collective: every shard calls it with the same ``k``, ``num_samples``, ``n_iter``,
    ``seed`` and ``sample_per_centroid``. See the module docstring for the algorithm.

    Parameters
    ----------
    x : (n, D) real floating, this shard's points (n >= 0 rows)
    k : number of clusters, 1 <= k <= N
    offset : global row of ``x[0]``
    num_samples : N, the rows of all shards together
    shard, num_shards : this shard's number in [0, num_shards) and the number of shards
    psum : element-wise sum over shards, returned on every shard
    n_iter : Lloyd rounds over all points after the sample's k-means (0: only assign)
    seed : seed of the sample and of the sample's k-means
    sample_per_centroid : sample size per cluster for the seeding (faiss' default: 256)

    Returns
    -------
    :class:`~clusterlearn.kmeans.KMeansResult` with this shard's ``labels`` (n,), the global
    ``centroids`` (k, D), the global ``inertia`` and its ``history``, ``n_iter`` the rounds
    run, ``n_empty_fixed`` the empty clusters seeded over all rounds.
    """
    check_features(x, "x", allow_empty=True)
    k = check_int(k, "k", minimum=1)
    num_samples = check_int(num_samples, "num_samples", minimum=k)
    offset = check_int(offset, "offset", minimum=0)
    num_shards = check_int(num_shards, "num_shards", minimum=1)
    shard = check_int(shard, "shard", minimum=0)
    if shard >= num_shards:
        raise ValueError(f"shard must be in [0, num_shards={num_shards}), got {shard}")
    n_iter = check_int(n_iter, "n_iter", minimum=0)
    sample_per_centroid = check_int(sample_per_centroid, "sample_per_centroid", minimum=1)
    if offset + x.shape[0] > num_samples:
        raise ValueError(f"rows [offset, offset + len(x)) = [{offset}, {offset + x.shape[0]}) exceed num_samples={num_samples}")
    xp = aac.array_namespace(x)
    dev = aac.device(x)
    acc = B.accumulator_dtype(xp, dev)
    m = min(num_samples, sample_per_centroid * k)
    rows = np.sort(B.rng(seed, 0x5A3D).choice(num_samples, size=m, replace=False))
    sample = gather_rows(x, rows, offset, psum)
    centroids = kmeans(sample, k, seed=seed, backend="array").centroids
    history: list[float] = []
    fixed = 0
    labels = None
    for done in range(n_iter + 1):
        labels, d2 = nearest_centroid(x, centroids, return_distances=True)
        labels = xp.astype(labels, B.index_dtype(xp, dev))
        sizes = psum(B.bincount(labels, k))
        labels, centroids, seeded = _fill_empty(x, labels, d2, centroids, sizes, (offset, shard, num_shards), psum)
        if seeded:
            fixed += seeded
            d2 = xp.sum((x - xp.take(centroids, labels, axis=0)) ** 2, axis=1)
            sizes = psum(B.bincount(labels, k))
        history.append(float(B.to_numpy(psum(xp.reshape(xp.sum(xp.astype(d2, acc)), (1,))))[0]))
        if done == n_iter:
            break
        sums = psum(B.scatter_add(xp.zeros((k, x.shape[1]), dtype=acc, device=dev), labels, x))
        safe = xp.astype(xp.maximum(sizes, xp.ones_like(sizes)), acc)
        centroids = xp.where((sizes > 0)[:, None], xp.astype(sums / safe[:, None], x.dtype), centroids)
    return KMeansResult(centroids, labels, history[-1], tuple(history), n_iter, fixed)
