"""k-means (Lloyd's algorithm) on any array-API backend, never returning an empty cluster.

Used to initialise the ODC memories and for the 2-means splits of small-cluster handling.
All random draws come from a host NumPy generator seeded by ``seed``, so the same input gives
the same clustering on every backend (up to floating-point ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat as aac

from . import _backend as B
from ._validation import check_features, check_int
from .assignment import nearest_centroid

Array = Any
Init = Literal["k-means++", "random"]

__all__ = ["KMeansResult", "kmeans", "cluster_means", "relocate_empty"]


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes
    ----------
    centroids : (k, D) array, dtype and namespace of the input
        Mean of each cluster's members.
    labels : (N,) integer array
        Cluster of every point; every cluster in [0, k) has at least one member.
    inertia : float
        Sum of squared distances of points to their cluster's centroid.
    inertia_history : tuple of float
        Inertia after each assignment step (non-increasing up to rounding).
    n_iter : int
        Lloyd iterations run (fewer than requested when assignments stopped changing).
    n_empty_fixed : int
        Empty clusters re-seeded over the whole run.
    """

    centroids: Array
    labels: Array
    inertia: float
    inertia_history: tuple[float, ...]
    n_iter: int
    n_empty_fixed: int


def cluster_means(x: Array, labels: Array, k: int, previous: Array | None = None) -> tuple[Array, Array]:
    """Per-cluster means and sizes.

    Parameters
    ----------
    x : (N, D) real floating array
    labels : (N,) integer array in [0, k)
    k : number of clusters
    previous : (k, D) array, optional
        Value kept for empty clusters (zeros when omitted).

    Returns
    -------
    means : (k, D) array, dtype of ``x`` (sums accumulate in float64 where available)
    sizes : (k,) integer array
    """
    xp = aac.array_namespace(x)
    dev = aac.device(x)
    acc = B.accumulator_dtype(xp, dev)
    sums = B.scatter_add(xp.zeros((k, x.shape[1]), dtype=acc, device=dev), labels, x)
    sizes = B.bincount(labels, k)
    safe = xp.astype(xp.maximum(sizes, xp.ones_like(sizes)), acc)
    means = xp.astype(sums / safe[:, None], x.dtype)
    fallback = xp.zeros_like(means) if previous is None else previous
    return xp.where((sizes > 0)[:, None], means, fallback), sizes


def relocate_empty(labels: Array, sq_dists: Array, sizes: Array) -> tuple[Array, Array]:
    """Give every empty cluster one point, taken where it costs least to take.

    The points farthest from their centroid are moved, each into one empty cluster, skipping
    a point whenever taking it would empty its own cluster (a cluster of size s gives at most
    s - 1). This is the relocation scikit-learn's k-means uses; it splits the clusters with
    the worst-fitting members. Possible whenever N >= k.

    Parameters
    ----------
    labels : (N,) integer array
    sq_dists : (N,) squared distance of each point to its assigned centroid
    sizes : (k,) integer array, bincount of ``labels``

    Returns
    -------
    labels : (N,) updated labels (no cluster empty)
    moved : (E,) indices of the moved points, in the order of the empty clusters they seed
    """
    xp = aac.array_namespace(labels)
    empty = xp.nonzero(sizes == 0)[0]
    e = int(empty.shape[0])
    order = xp.argsort(-sq_dists, stable=True)
    lab_sorted = xp.take(labels, order)
    # Rank of each candidate among the members of its own cluster, in distance order.
    by_cluster = xp.argsort(lab_sorted, stable=True)
    grouped = xp.take(lab_sorted, by_cluster)
    starts = xp.cumulative_sum(sizes, include_initial=True)[:-1]
    rank_grouped = xp.arange(labels.shape[0], dtype=labels.dtype, device=aac.device(labels)) - xp.take(
        starts, grouped
    )
    rank = B.set_rows(xp.empty_like(rank_grouped), by_cluster, rank_grouped)
    eligible = rank < xp.take(sizes, lab_sorted) - 1
    moved = xp.take(order, xp.nonzero(eligible)[0][:e])
    labels = B.set_rows(labels, moved, xp.astype(empty, labels.dtype))
    return labels, moved


def _init_centroids(x: Array, k: int, init: str, gen: Any) -> Array:
    xp = aac.array_namespace(x)
    n = x.shape[0]
    if init == "random":
        idx = xp.asarray(gen.choice(n, size=k, replace=False), device=aac.device(x))
        return xp.take(x, idx, axis=0)
    # k-means++: each new centre drawn with probability proportional to D(x)^2.
    acc = B.accumulator_dtype(xp, aac.device(x))
    first = int(gen.integers(n))
    centres = [x[first : first + 1, ...]]
    d2 = xp.sum((x - centres[0]) ** 2, axis=1)
    for _ in range(1, k):
        cdf = xp.cumulative_sum(xp.astype(d2, acc))
        target = xp.asarray(gen.random(), dtype=acc, device=aac.device(x)) * cdf[-1]
        pick = xp.clip(xp.searchsorted(cdf, xp.reshape(target, (1,)), side="right"), max=n - 1)
        c = xp.take(x, xp.astype(pick, B.index_dtype(xp, aac.device(x))), axis=0)
        centres.append(c)
        d2 = xp.minimum(d2, xp.sum((x - c) ** 2, axis=1))
    return xp.concat(centres, axis=0)


def kmeans(
    x: Array,
    k: int,
    *,
    n_iter: int = 20,
    seed: int = 0,
    init: Init = "k-means++",
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` non-empty clusters with Lloyd's algorithm.

    Parameters
    ----------
    x : (N, D) real floating array of any supported namespace, finite, N >= k
    k : number of clusters, >= 1
    n_iter : maximum number of Lloyd iterations (stops early once assignments are stable)
    seed : seed of the host generator used for initialisation
    init : {"k-means++", "random"}
        ``"k-means++"`` costs k passes over the data (O(k N D)); for very large k on a CPU,
        ``"random"`` (k distinct points) is much cheaper.

    Returns
    -------
    KMeansResult
        Arrays in the namespace and on the device of ``x``. Each iteration assigns points to
        the nearest centroid, re-seeds empty clusters with :func:`relocate_empty`, then moves
        centroids to their members' means; the returned labels come from a final assignment
        to the returned centroids (with the same repair), so no cluster is ever empty.
    """
    xp = B.namespace(x=x)
    check_features(x, "x")
    k = check_int(k, "k", minimum=1)
    n_iter = check_int(n_iter, "n_iter", minimum=0)
    seed = check_int(seed, "seed")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    if k > x.shape[0]:
        raise ValueError(f"k must be <= the number of points ({x.shape[0]}), got {k}")

    centroids = _init_centroids(x, k, init, B.rng(seed))
    history: list[float] = []
    n_fixed = 0
    labels = None
    done = 0
    while True:
        new_labels, d2 = nearest_centroid(x, centroids, return_distances=True)
        sizes = B.bincount(new_labels, k)
        if bool(xp.any(sizes == 0)):
            new_labels, moved = relocate_empty(new_labels, d2, sizes)
            d2 = B.set_rows(d2, moved, xp.zeros(moved.shape, dtype=d2.dtype, device=aac.device(d2)))
            centroids = B.set_rows(centroids, new_labels[moved], xp.take(x, moved, axis=0))
            n_fixed += int(moved.shape[0])
        history.append(float(xp.sum(xp.astype(d2, B.accumulator_dtype(xp, aac.device(x))))))
        stable = labels is not None and bool(xp.all(new_labels == labels))
        labels = new_labels
        if stable or done == n_iter:
            break
        centroids, _ = cluster_means(x, labels, k, previous=centroids)
        done += 1
    return KMeansResult(centroids, labels, history[-1], tuple(history), done, n_fixed)
