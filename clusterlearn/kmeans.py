"""k-means on any array-API backend, never returning an empty cluster.

Two implementations sit behind :func:`kmeans`:

``"array"``
    Lloyd's algorithm written against the array API (this module). All random draws come from
    a host NumPy generator seeded by ``seed``, so the same input gives the same clustering on
    every backend (up to floating-point ties).
``"faiss"``
    ``faiss.Kmeans`` on a host float32 copy (:mod:`clusterlearn._faiss`), as DeepCluster's
    reference implementation does; a GPU index when the input lives on a CUDA device and
    faiss has GPU support. Results are converted back to the caller's namespace and device.

Both start from greedy k-means++ seeds by default, chosen here in the caller's namespace (faiss
takes them as its initial centroids), so on the same data the two backends start from the same
rows; ``init="random"`` keeps faiss' own random start, the DeepCluster reference's behaviour.
``n_init`` restarts keep the run of lowest inertia.

``backend="auto"`` (the default) picks faiss whenever it is importable and can serve the
call, see :func:`kmeans`. The library's own callers choose as follows: the 2-means splits of
small-cluster handling pass ``backend="array"`` (a few dozen points, and splits must not change
with whether faiss is installed); ``OnlineDeepClustering.initialize`` and `DeepClusterLabeler`
use ``"auto"`` with k-means++ by default (``"random"`` on request).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import array_api_compat as aac
import numpy as np

from . import backend as B
from ._faiss import faiss_available, faiss_gpu_available, faiss_kmeans
from .validation import check_features, check_int
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


def _seed_indices(x: Array, k: int, init: Init, gen: Any) -> Array:
    """(k,) indices of the rows of ``x`` (N, D) that start Lloyd's algorithm.

    ``"random"``: k distinct rows, uniformly. ``"k-means++"``: greedy k-means++ (Arthur and
    Vassilvitskii's D^2 sampling, with the greedy refinement scikit-learn also uses): the first
    row uniformly, then at each step ``2 + floor(ln k)`` candidates drawn with probability
    proportional to their squared distance to the nearest row chosen so far, keeping the
    candidate that lowers the total of those squared distances most. One pass over ``x`` per
    chosen centre, all candidates of a step in one (N, D) x (D, L) product; no host round trip.
    Every draw comes from the host generator ``gen``, so every backend makes the same draws.
    ``x`` should be centred (the expansion ``|x|^2 - 2 x.c + |c|^2`` cancels with a large offset).
    """
    xp = aac.array_namespace(x)
    dev = aac.device(x)
    n = x.shape[0]
    idx_dtype = B.index_dtype(xp, dev)
    if init == "random":
        return xp.asarray(gen.choice(n, size=k, replace=False), dtype=idx_dtype, device=dev)
    acc = B.accumulator_dtype(xp, dev)
    trials = 2 + int(math.log(k))
    x_sq = xp.sum(x * x, axis=1)

    def sq_dists(idx: Array) -> Array:  # (N, m) squared distances to the rows x[idx], idx (m,)
        c = xp.take(x, idx, axis=0)
        cross = xp.matmul(x, xp.matrix_transpose(c))
        return xp.clip(x_sq[:, None] - 2 * cross + xp.sum(c * c, axis=1)[None, :], min=0.0)

    first = xp.asarray([int(gen.integers(n))], dtype=idx_dtype, device=dev)
    chosen = [first]
    d2 = sq_dists(first)[:, 0]
    for _ in range(1, k):  # inherent to k-means++: each draw depends on the previous centres
        cdf = xp.cumulative_sum(xp.astype(d2, acc))
        targets = xp.asarray(gen.random(trials), dtype=acc, device=dev) * cdf[-1]
        candidates = xp.astype(xp.clip(xp.searchsorted(cdf, targets, side="right"), max=n - 1), idx_dtype)
        merged = xp.minimum(d2[:, None], sq_dists(candidates))  # (N, L) distances if each were added
        best = xp.argmin(xp.sum(xp.astype(merged, acc), axis=0), keepdims=True)  # first on ties
        chosen.append(xp.take(candidates, best))
        d2 = xp.take(merged, best, axis=1)[:, 0]
    return xp.concat(chosen)


def _lloyd(x: Array, centroids: Array, n_iter: int) -> KMeansResult:
    """The array backend of :func:`kmeans`: Lloyd's algorithm from ``centroids`` (k, D).

    ``x`` (N, D) is centred by the caller (see :func:`_seed_indices`); so are the centroids
    returned.
    """
    xp = aac.array_namespace(x)
    k = centroids.shape[0]
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


def _faiss_run(host: np.ndarray, k: int, n_iter: int, seed: int, starts: np.ndarray | None, gpu: bool) -> KMeansResult:
    """One faiss k-means of the float32 host array ``host`` (N, D); NumPy arrays in the result.

    ``starts`` (k,) indexes the rows that start training (faiss draws k random rows with
    ``seed`` when it is ``None``).
    """
    init_centroids = None if starts is None else host[starts]
    centroids, labels, history, n_fixed = faiss_kmeans(
        host, k, n_iter=n_iter, seed=seed, gpu=gpu, init_centroids=init_centroids
    )
    inertia = _host_inertia(host, centroids, labels)
    return KMeansResult(centroids, labels, inertia, (*history, inertia), len(history), n_fixed)


def _run_seed(seed: int, run: int) -> int:
    """Seed of restart ``run`` >= 1 (the first run uses ``seed`` itself), in faiss' range."""
    return int(B.rng(seed, run).integers(_FAISS_MAX_SEED + 1))


def _restarts(x: Array, k: int, n_iter: int, seed: int, init: Init, n_init: int, use_faiss: bool) -> KMeansResult:
    """The lowest-inertia of ``n_init`` runs of one backend (arguments already validated).

    Array backend: Lloyd's algorithm in ``x``'s namespace on the centred data (k-means is
    translation invariant; with a large common offset the float32 distances
    ``|x|^2 - 2 x.c + |c|^2`` would otherwise cancel catastrophically).
    faiss backend: ``faiss.Kmeans`` on a float32 host copy of ``x`` (a GPU index when ``x`` is on
    a CUDA device and faiss has GPU support), started from the same rows the array backend
    would start from (k-means++ seeds chosen in ``x``'s namespace, on its device), or from
    faiss' own random draw for ``init="random"``. Results are converted back to ``x``'s
    namespace, device and dtype (labels in the namespace's default integer dtype).
    """
    xp = aac.array_namespace(x)
    offset = xp.mean(x, axis=0)
    # The array backend's data, and where k-means++ seeds are chosen; faiss' own random draw
    # needs no centred copy.
    centred = x if use_faiss and init == "random" else x - offset
    host = np.ascontiguousarray(B.to_numpy(x), dtype=np.float32) if use_faiss else None
    gpu = use_faiss and _on_cuda(x) and faiss_gpu_available()

    def run(seed: int) -> KMeansResult:
        if not use_faiss:
            return _lloyd(centred, xp.take(centred, _seed_indices(centred, k, init, B.rng(seed)), axis=0), n_iter)
        if init == "random":  # faiss' own draw: the DeepCluster reference's start
            return _faiss_run(host, k, n_iter, seed, None, gpu)
        starts = np.asarray(B.to_numpy(_seed_indices(centred, k, init, B.rng(seed))), dtype=np.int64)
        return _faiss_run(host, k, n_iter, seed, starts, gpu)

    best = run(seed)
    for r in range(1, n_init):
        result = run(_run_seed(seed, r))
        if result.inertia < best.inertia:  # the earlier run is kept on ties
            best = result
    if not use_faiss:
        return dataclasses.replace(best, centroids=best.centroids + offset)
    return _in_namespace_of(x, best)


def _resolve_backend(backend: str, x: Array, n_iter: int, seed: int) -> str:
    """``"faiss"`` or ``"array"``: the implementation that serves this call (see `kmeans`)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    faiss_can = n_iter >= 1 and seed <= _FAISS_MAX_SEED
    if backend == "auto":
        if not faiss_can or not faiss_available():
            return "array"
        if _on_cuda(x) and not faiss_gpu_available():
            return "array"  # Lloyd's on the GPU beats copying to a CPU faiss
        return "faiss"
    if backend == "faiss":
        if not faiss_available():
            raise ImportError(f"kmeans(backend='faiss') needs faiss: {_FAISS_HINT}; or use backend='array'")
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
    n_init: int = 1,
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
        Initial centroids, the same rows on both backends for ``"k-means++"``. ``None``
        (default) means ``"k-means++"``: greedy k-means++ (each new centre the best, by the
        resulting sum of squared distances, of ``2 + floor(ln k)`` candidates drawn by D^2
        sampling), chosen in ``x``'s namespace and on its device and handed to faiss on the
        faiss backend. It makes k sequential passes over the data (about ``2 + ln k`` Lloyd
        iterations' worth of arithmetic). ``"random"``: k distinct points; on the faiss backend
        faiss' own draw with ``seed``, i.e. exactly what ``faiss.Kmeans(..., seed=seed)`` and
        the DeepCluster reference do (random starts can put two centres in one well-separated
        cluster and leave another without one, which Lloyd's algorithm cannot undo).
    backend : {"auto", "faiss", "array"}
        ``"array"``: Lloyd's algorithm in ``x``'s own namespace and on its device; JAX
        arrays on the CPU are clustered on NumPy views of the same memory (eager JAX
        compiles every operation anew for each input shape), with NumPy's result.
        ``"faiss"``: ``faiss.Kmeans`` on a float32 host copy of ``x`` (a GPU index when ``x``
        lives on a CUDA device and faiss has GPU support, faiss-cpu otherwise); needs
        ``n_iter >= 1`` and ``seed <= 2**31 - 1``.
        ``"auto"`` (default): faiss when it is importable and can serve the call (the
        conditions just listed), except for CUDA input without GPU-enabled faiss, which stays
        on its device with the array backend; the array backend otherwise.
    n_init : int, default 1
        Runs (initialisation then Lloyd's algorithm), the first with ``seed`` and the others
        with seeds derived from it; the run of lowest inertia is returned (the earliest on
        ties), so more runs never give a higher inertia than ``n_init=1``. Each run costs as
        much as one call.

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
        ``x`` is not a real floating array, or ``k``, ``n_iter``, ``seed``, ``n_init`` are not
        integers.
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
    faiss path trains on identical host data; its k-means++ seeds are chosen in ``x``'s
    namespace, so they agree across namespaces up to floating-point ties between candidates
    (with ``init="random"`` faiss' draw is identical everywhere).
    """
    B.eager_namespace(x=x)
    check_features(x, "x")
    k = check_int(k, "k", minimum=1)
    n_iter = check_int(n_iter, "n_iter", minimum=0)
    seed = check_int(seed, "seed", minimum=0)
    n_init = check_int(n_init, "n_init", minimum=1)
    if init not in (None, "k-means++", "random"):
        raise ValueError(f"init must be None, 'k-means++' or 'random', got {init!r}")
    if k > x.shape[0]:
        raise ValueError(f"k must be <= the number of points ({x.shape[0]}), got {k}")
    use_faiss = _resolve_backend(backend, x, n_iter, seed) == "faiss"
    # A JAX array on the CPU is clustered on a NumPy view of its memory (bfloat16 widened to
    # float32): eager JAX would compile every operation anew for each input shape.
    on_host = not use_faiss and _jax_on_cpu(x)
    data = B.to_numpy(x) if on_host else x
    # k-means commutes with scaling: cluster x / 2**e, with max|x / 2**e| in [0.5, 1), and scale
    # the centroids and inertia back. Powers of two scale every rounding exactly, so this only
    # keeps squared distances (|x|**2, up to 4 D max|x|**2) clear of overflow and underflow;
    # data of moderate magnitude (e = 0) are used as they are.
    e = B.power_of_two_exponent(data)
    result = _restarts(B.times_power_of_two(data, -e), k, n_iter, seed, init or "k-means++", n_init, use_faiss)
    result = dataclasses.replace(
        result,
        centroids=B.times_power_of_two(result.centroids, e),
        inertia=_ldexp(result.inertia, 2 * e),
        inertia_history=tuple(_ldexp(v, 2 * e) for v in result.inertia_history),
    )
    return _in_namespace_of(x, result) if on_host else result


def _jax_on_cpu(x: Array) -> bool:
    """Whether ``x`` is a JAX array on the CPU (its eager operations compile once per shape)."""
    return B.compiles_per_shape(aac.array_namespace(x)) and aac.device(x).platform == "cpu"


def _in_namespace_of(x: Array, result: KMeansResult) -> KMeansResult:
    """``result`` (host arrays) in the namespace and on the device of ``x``: centroids in its
    dtype, labels in the namespace's default integer dtype."""
    xp, dev = aac.array_namespace(x), aac.device(x)
    return dataclasses.replace(
        result,
        centroids=xp.astype(B.convert(result.centroids, xp, dev), x.dtype),
        labels=xp.astype(B.convert(result.labels, xp, dev), B.index_dtype(xp, dev)),
    )


def _ldexp(value: float, e: int) -> float:
    """``value * 2**e`` as a Python float, ``inf`` beyond float64's range (inertia of |x| ~ 1e300)."""
    try:
        return math.ldexp(value, e)
    except OverflowError:
        return math.inf
