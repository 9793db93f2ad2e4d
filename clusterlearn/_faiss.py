"""Host-side k-means through faiss (optional dependency, imported on first use).

This is the faiss half of ``clusterlearn.kmeans``: NumPy in, NumPy out. Converting from and to
the caller's namespace happens in the caller.

Empty clusters
--------------
faiss repairs empty clusters itself during training: after each iteration's centroid update,
every empty centroid is replaced by a copy of a centroid drawn with probability proportional to
its cluster's size (minus one), the two copies being pushed apart by a relative 1/1024 and the
cluster's size split between them. It counts these splits in ``Clustering.iteration_stats[i]
.nsplit`` (``Kmeans.iteration_stats[i]["nsplit"]`` in Python), which `faiss_kmeans` sums.
Because the last split happens after the last assignment, the final assignment to the
returned centroids can still leave a cluster empty (for instance when duplicate points sit
exactly between two split copies). `faiss_kmeans` then re-seeds each such cluster on the point
farthest from its centroid among clusters of two or more points and re-assigns all points,
a few rounds at most, and counts those repairs too.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from .validation import check_int

__all__ = ["faiss_available", "faiss_gpu_available", "faiss_kmeans"]

_INSTALL_HINT = "pip install faiss-cpu (or faiss-gpu-cu12)"
_INT_MAX = 2**31 - 1  # faiss' ClusteringParameters fields are C ints
# Re-seed / re-assign rounds after training before settling for forced labels.
_REPAIR_ROUNDS = 5


def _import_faiss() -> ModuleType:
    try:
        import faiss
    except ImportError as err:
        raise ImportError(f"faiss is not installed: {_INSTALL_HINT}") from err
    return faiss


def faiss_available() -> bool:
    """Whether faiss can be imported."""
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def faiss_gpu_available() -> bool:
    """Whether faiss has GPU support and sees at least one GPU."""
    try:
        faiss = _import_faiss()
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _check_bounded_int(value: object, name: str, low: int, high: int) -> int:
    value = check_int(value, name, minimum=low)
    if value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def _reseed_empty(
    x: np.ndarray, labels: np.ndarray, dist: np.ndarray, centroids: np.ndarray
) -> int:
    """Give every empty cluster the farthest point of a cluster with >= 2 points; in place.

    ``labels`` (N,) and ``dist`` (N,) (squared distance to the assigned centroid) and
    ``centroids`` (k, D) are updated. Returns the number of clusters re-seeded.
    """
    k = centroids.shape[0]
    counts = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    for j in empty:  # a handful at most; each step is one O(N) pass
        p = int(np.argmax(np.where(counts[labels] > 1, dist, -np.inf)))
        counts[labels[p]] -= 1
        counts[j] = 1
        labels[p] = j
        dist[p] = 0.0
        centroids[j] = x[p]
    return int(empty.size)


def faiss_kmeans(
    x: np.ndarray,
    k: int,
    *,
    n_iter: int = 20,
    seed: int = 0,
    gpu: bool = False,
    max_points_per_centroid: int | None = None,
    init_centroids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[float], int]:
    """Lloyd's k-means with ``faiss.Kmeans``, from given or random initial centroids.

    Parameters
    ----------
    x : (N, D) NumPy array, real floating dtype (float32 is used; others are converted)
        Finite, with N >= k.
    k : int
        Number of clusters, 1 <= k <= N.
    n_iter : int, default 20
        Maximum iterations; faiss stops early when the objective stops changing.
    seed : int, default 0
        Seed of faiss' initialisation (k distinct training points, when ``init_centroids`` is
        not given) and subsampling, in [0, 2**31 - 1]; the same seed gives the same result on
        the same data and device.
    gpu : bool, default False
        Use every visible GPU (needs faiss with GPU support, see `faiss_gpu_available`).
    max_points_per_centroid : int, optional
        faiss subsamples the training set to ``k * max_points_per_centroid`` points when it is
        larger; ``None`` trains on all points. The final labels always cover all N points.
    init_centroids : (k, D) NumPy array, optional
        Finite starting centroids (k-means++ seeds, say), converted to float32; ``None`` lets
        faiss draw k distinct training points with ``seed``.

    Returns
    -------
    centroids : (k, D) float32 array
    labels : (N,) int64 array
        Index of the nearest centroid of each point (up to ties); every cluster is non-empty.
    inertia_history : list of float
        faiss' objective (sum of squared distances of the points to their centroid) at each
        iteration, measured at the assignment step, i.e. for the centroids of the previous
        iteration (the first entry is the initial centroids').
    n_empty_fixed : int
        Empty clusters repaired: faiss' splits during training plus final re-seeds (see the
        module docstring).

    Raises
    ------
    ImportError
        faiss is not installed.
    TypeError
        ``x`` is not a floating NumPy array, or an integer argument is not an int.
    ValueError
        Bad shape, non-finite values, or ``k``, ``n_iter``, ``seed`` out of range; or
        ``init_centroids`` not finite or not of shape (k, D).
    RuntimeError
        ``gpu=True`` without a GPU-enabled faiss and a GPU.
    """
    faiss = _import_faiss()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"x must have a real floating dtype, got {x.dtype}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must be a non-empty 2-D (N, D) array, got shape {x.shape}")
    n, d = x.shape
    k = check_int(k, "k", minimum=1)
    if k > n:
        raise ValueError(f"k={k} exceeds the number of points N={n} in x")
    n_iter = _check_bounded_int(n_iter, "n_iter", 1, _INT_MAX)
    seed = _check_bounded_int(seed, "seed", 0, _INT_MAX)
    if max_points_per_centroid is None:
        max_points_per_centroid = min(-(-n // k), _INT_MAX)
    max_points_per_centroid = _check_bounded_int(
        max_points_per_centroid, "max_points_per_centroid", 1, _INT_MAX
    )
    if gpu and not faiss_gpu_available():
        raise RuntimeError("gpu=True needs faiss with GPU support (faiss-gpu) and a visible GPU")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or Inf")
    if init_centroids is not None:
        if not isinstance(init_centroids, np.ndarray) or init_centroids.dtype.kind != "f":
            got = init_centroids.dtype if isinstance(init_centroids, np.ndarray) else type(init_centroids).__name__
            raise TypeError(f"init_centroids must be a real floating NumPy array, got {got}")
        if init_centroids.shape != (k, d):
            raise ValueError(f"init_centroids must have shape (k, D) = {(k, d)}, got {init_centroids.shape}")
        with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
            init_centroids = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if not np.isfinite(init_centroids).all():
            raise ValueError("init_centroids contains NaN or Inf (in float32)")

    km = faiss.Kmeans(
        d,
        k,
        niter=n_iter,
        seed=seed,
        gpu=bool(gpu),
        verbose=False,
        min_points_per_centroid=1,  # N >= k is checked above; silences faiss' size warning
        max_points_per_centroid=max_points_per_centroid,
    )
    km.train(x, init_centroids=init_centroids)
    history = [float(v) for v in km.obj]
    n_fixed = sum(int(stats["nsplit"]) for stats in km.iteration_stats)
    centroids = np.array(km.centroids, dtype=np.float32)
    km.centroids = centroids  # assign() searches km.centroids: share the repaired array
    dist, labels = km.assign(x)
    for _ in range(_REPAIR_ROUNDS):
        if np.bincount(labels, minlength=k).min() > 0:
            break
        forced = labels.astype(np.int64, copy=True)
        n_fixed += _reseed_empty(x, forced, dist.astype(np.float64), centroids)
        dist, labels = km.assign(x)
    else:
        # Re-assignment kept emptying a cluster: only possible with ties (duplicate points).
        # Keep the last forced labels, each re-seeded cluster holding the point it sits on.
        if np.bincount(labels, minlength=k).min() == 0:
            labels = forced
    return centroids, labels.astype(np.int64, copy=False), history, n_fixed
