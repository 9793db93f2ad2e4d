"""k-means on any array-API backend, never returning an empty cluster.

Two implementations sit behind :func:`kmeans`:

``"array"``
    Lloyd's algorithm written against the array API (this module), with k-means++ or random
    initialisation. All random draws come from a host NumPy generator seeded by ``seed``, so
    the same input gives the same clustering on every backend (up to floating-point ties).
``"faiss"``
    ``faiss.Kmeans`` on a host float32 copy (:mod:`clusterlearn._faiss`), as DeepCluster's
    reference implementation does; a GPU index when the input lives on a CUDA device and
    faiss has GPU support. Results are converted back to the caller's namespace and device.

``backend="auto"`` (the default) picks faiss whenever it is importable and can serve the
call, see :func:`kmeans`. The library's own callers choose as follows: the 2-means splits of
small-cluster handling pass ``backend="array"`` (a few dozen points, where k-means++ matters
more than speed, and splits must not change with whether faiss is installed);
``OnlineDeepClustering.initialize`` asks for k-means++ by default, which only the array backend
has, and reaches faiss through ``"auto"`` with ``kmeans_init="random"``, the choice for
data-set-sized k-means on a CPU; `DeepClusterLabeler` uses ``"auto"`` like the reference.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat as aac
import numpy as np

from . import _backend as B
from ._faiss import faiss_available, faiss_gpu_available, faiss_kmeans
from ._validation import check_features, check_int
from .assignment import nearest_centroid

Array = Any
Init = Literal["k-means++", "random"]
Backend = Literal["auto", "faiss", "array"]

BACKENDS = ("auto", "faiss", "array")
_FAISS_MAX_SEED = 2**31 - 1  # faiss' seed is a C int
_FAISS_HINT = "pip install faiss-cpu (or faiss-gpu-cu12 for CUDA)"
_INERTIA_BLOCK_ROWS = 1 << 14  # rows per block of the host inertia sum

__all__ = ["KMeansResult", "kmeans", "cluster_means", "relocate_empty"]


@dataclass(frozen=True)
class KMeansResult:
    """Outcome of :func:`kmeans`.

    Attributes
    ----------
    centroids : (k, D) array, dtype and namespace of the input
        The centroids the final labels were assigned to; equal to the members' means once
        the run has converged (a re-seeded cluster's centroid is its seed point).
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
    labels = B.set_rows(xp.asarray(labels, copy=True), moved, xp.astype(empty, labels.dtype))
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
    x_sq = xp.sum(x * x, axis=1)

    def sq_dist(c: Array) -> Array:  # (N,) ||x - c||^2 by a matrix-vector product, no (N, D) temporary
        return xp.clip(x_sq - 2 * xp.matmul(x, c[0, ...]) + xp.sum(c * c), min=0.0)

    d2 = sq_dist(centres[0])
    for _ in range(1, k):
        cdf = xp.cumulative_sum(xp.astype(d2, acc))
        target = xp.asarray(gen.random(), dtype=acc, device=aac.device(x)) * cdf[-1]
        pick = xp.clip(xp.searchsorted(cdf, xp.reshape(target, (1,)), side="right"), max=n - 1)
        c = xp.take(x, xp.astype(pick, B.index_dtype(xp, aac.device(x))), axis=0)
        centres.append(c)
        d2 = xp.minimum(d2, sq_dist(c))
    return xp.concat(centres, axis=0)


def _lloyd(x: Array, k: int, n_iter: int, seed: int, init: Init) -> KMeansResult:
    """The array backend of :func:`kmeans` (arguments already validated).

    The data are centred first (k-means is translation invariant): with a large common offset,
    the float32 distances ``||x||^2 - 2 x.c + ||c||^2`` would otherwise cancel catastrophically.
    """
    xp = aac.array_namespace(x)
    offset = xp.mean(x, axis=0)
    x = x - offset
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
    return KMeansResult(centroids + offset, labels, history[-1], tuple(history), done, n_fixed)


def _on_cuda(x: Array) -> bool:
    """Whether ``x`` lives on a CUDA device (CuPy, or a torch/JAX array on a GPU)."""
    if aac.is_cupy_array(x):
        return True
    if aac.is_torch_array(x):
        return x.device.type == "cuda"
    if aac.is_jax_array(x):
        return aac.device(x).platform in ("gpu", "cuda")
    return False


def _host_inertia(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of the rows of ``x`` (N, D) to ``centroids[labels]``.

    Row sums in the data's precision, their total in float64, over row blocks so that no
    (N, D) temporary is made.
    """
    total = 0.0
    for start in range(0, x.shape[0], _INERTIA_BLOCK_ROWS):
        stop = start + _INERTIA_BLOCK_ROWS
        diff = x[start:stop] - centroids[labels[start:stop]]
        total += float(np.einsum("ij,ij->i", diff, diff).sum(dtype=np.float64))
    return total


def _faiss_backend(x: Array, k: int, n_iter: int, seed: int) -> KMeansResult:
    """The faiss backend of :func:`kmeans` (arguments already validated).

    faiss trains on a float32 host copy of ``x``, on a GPU index when ``x`` is on a CUDA device
    and faiss has GPU support; the result is converted back to ``x``'s namespace, device and
    dtype (labels in the namespace's default integer dtype).
    """
    xp = aac.array_namespace(x)
    dev = aac.device(x)
    host = np.ascontiguousarray(B.to_numpy(x), dtype=np.float32)
    gpu = _on_cuda(x) and faiss_gpu_available()
    centroids, labels, history, n_fixed = faiss_kmeans(host, k, n_iter=n_iter, seed=seed, gpu=gpu)
    inertia = _host_inertia(host, centroids, labels)
    return KMeansResult(
        centroids=xp.astype(B.convert(centroids, xp, dev), x.dtype),
        labels=xp.astype(B.convert(labels, xp, dev), B.index_dtype(xp, dev)),
        inertia=inertia,
        inertia_history=(*history, inertia),
        n_iter=len(history),
        n_empty_fixed=n_fixed,
    )


def _resolve_backend(backend: str, x: Array, n_iter: int, seed: int, init: Init | None) -> str:
    """``"faiss"`` or ``"array"``: the implementation that serves this call (see `kmeans`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    faiss_can = init != "k-means++" and n_iter >= 1 and seed <= _FAISS_MAX_SEED
    if backend == "auto":
        if not faiss_can or not faiss_available():
            return "array"
        if _on_cuda(x) and not faiss_gpu_available():
            return "array"  # Lloyd's on the GPU beats copying to a CPU faiss
        return "faiss"
    if backend == "faiss":
        if not faiss_available():
            raise ImportError(f"kmeans(backend='faiss') needs faiss: {_FAISS_HINT}; or use backend='array'")
        if init == "k-means++":
            raise ValueError("backend='faiss' initialises with random points only: use init=None or 'random'")
        if n_iter < 1:
            raise ValueError(f"backend='faiss' runs at least one iteration, got n_iter={n_iter}")
        if seed > _FAISS_MAX_SEED:
            raise ValueError(f"backend='faiss' needs seed <= {_FAISS_MAX_SEED}, got {seed}")
    return backend


def kmeans(
    x: Array,
    k: int,
    *,
    n_iter: int = 20,
    seed: int = 0,
    init: Init | None = None,
    backend: Backend = "auto",
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` non-empty clusters with Lloyd's algorithm.

    Parameters
    ----------
    x : (N, D) real floating array of any supported namespace, finite, N >= k. Any finite
        magnitude: the data are clustered scaled by a power of two (which commutes exactly
        with every step of k-means), so float32 data near 1e38 or 1e-38 cluster as at 1.
        ``inertia`` is a Python float and becomes ``inf`` only beyond float64's range.
    k : number of clusters, >= 1
    n_iter : maximum number of Lloyd iterations (the array backend stops early once
        assignments are stable, faiss once its objective stops changing)
    seed : non-negative seed of the initialisation; the same seed gives the same result for
        the same input and backend choice
    init : {None, "k-means++", "random"}
        Initial centroids. ``None`` (default) lets the backend choose: k-means++ for
        ``"array"``, faiss' own (k distinct training points drawn with ``seed``) for
        ``"faiss"``. ``"random"`` draws k distinct points (with faiss' generator on the faiss
        backend, so the two backends start from different points). ``"k-means++"`` exists
        only in the array backend; it costs k passes over the data (O(k N D)), so for very
        large k on a CPU ``"random"`` is much cheaper.
    backend : {"auto", "faiss", "array"}
        ``"array"``: Lloyd's algorithm in ``x``'s own namespace and on its device.
        ``"faiss"``: ``faiss.Kmeans`` on a float32 host copy of ``x`` (a GPU index when ``x``
        lives on a CUDA device and faiss has GPU support, faiss-cpu otherwise); needs
        ``n_iter >= 1``, ``seed <= 2**31 - 1`` and ``init`` other than ``"k-means++"``.
        ``"auto"`` (default): faiss when it is importable and can serve the call (the
        conditions just listed), except for CUDA input without GPU-enabled faiss, which stays
        on its device with the array backend; the array backend otherwise.

    Returns
    -------
    KMeansResult
        Arrays in the namespace and on the device of ``x``: centroids in ``x``'s dtype, labels
        in the namespace's default integer dtype. ``inertia_history`` holds the objective at
        every assignment step, its last entry (equal to ``inertia``) that of the returned
        labels and centroids; ``n_iter`` counts centroid updates.

        Array backend: each iteration assigns points to the nearest centroid, re-seeds empty
        clusters with :func:`relocate_empty`, then moves centroids to their members' means;
        the returned labels come from a final assignment to the returned centroids (with the
        same repair), so no cluster is ever empty and the objective never increases.

        faiss backend: faiss splits a large cluster whenever one empties during training
        (the objective can then rise by a little), and empty clusters left by the final
        assignment are re-seeded (see :mod:`clusterlearn._faiss`); both count in
        ``n_empty_fixed``. Labels are nearest centroids in float32.

    Raises
    ------
    TypeError
        ``x`` is not a real floating array, or ``k``, ``n_iter``, ``seed`` are not integers.
    ValueError
        ``x`` is not 2-D, empty, or not finite; ``k > N``; an argument is out of range; or
        ``backend="faiss"`` with a call faiss cannot serve.
    ImportError
        ``backend="faiss"`` without faiss installed.

    Notes
    -----
    ``"auto"`` makes results depend on whether faiss is installed (and, on GPUs, on whether it
    has GPU support); pass ``backend="array"`` where reproducibility across installations
    matters more than speed. On the CPU backends (NumPy, PyTorch, JAX, array-api-strict) the
    faiss path sees identical host data, so it gives identical results on all of them.
    """
    B.eager_namespace(x=x)
    check_features(x, "x")
    k = check_int(k, "k", minimum=1)
    n_iter = check_int(n_iter, "n_iter", minimum=0)
    seed = check_int(seed, "seed", minimum=0)
    if init not in (None, "k-means++", "random"):
        raise ValueError(f"init must be None, 'k-means++' or 'random', got {init!r}")
    if k > x.shape[0]:
        raise ValueError(f"k must be <= the number of points ({x.shape[0]}), got {k}")
    use_faiss = _resolve_backend(backend, x, n_iter, seed, init) == "faiss"
    # k-means commutes with scaling: cluster x / 2**e, with max|x / 2**e| in [0.5, 1), and scale
    # the centroids and inertia back. Powers of two scale every rounding exactly, so this only
    # keeps squared distances (|x|**2, up to 4 D max|x|**2) clear of overflow and underflow;
    # data of moderate magnitude (e = 0) are used as they are.
    e = B.power_of_two_exponent(x)
    x = B.times_power_of_two(x, -e)
    if use_faiss:
        result = _faiss_backend(x, k, n_iter, seed)
    else:
        result = _lloyd(x, k, n_iter, seed, init or "k-means++")
    return dataclasses.replace(
        result,
        centroids=B.times_power_of_two(result.centroids, e),
        inertia=_ldexp(result.inertia, 2 * e),
        inertia_history=tuple(_ldexp(v, 2 * e) for v in result.inertia_history),
    )


def _ldexp(value: float, e: int) -> float:
    """``value * 2**e`` as a Python float, ``inf`` beyond float64's range (inertia of |x| ~ 1e300)."""
    try:
        return math.ldexp(value, e)
    except OverflowError:
        return math.inf
