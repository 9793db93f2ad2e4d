"""Time ``clusterlearn.kmeans`` on each backend and start against faiss called directly.

Defaults: N = 100,000 points, D = 256, k = 1,000 clusters, 20 iterations (``--quick``:
N = 20,000, D = 64, k = 100). The points are a Gaussian mixture around 2k random centres,
float32. Timed in one run, each once (best of 3 interleaved rounds with ``--quick``; ``--repeat``
to choose):

- ``faiss direct``: ``faiss.Kmeans(...).train(x)`` then ``index.search(x, 1)`` for the labels,
  as DeepCluster's reference implementation does; the yardstick (ratio 1.00);
- ``kmeans(backend="faiss", init="random")``: the same start as faiss direct (target: <= 1.1 x);
- ``kmeans(backend="faiss")``: greedy k-means++ seeds (chosen with NumPy, k sequential passes
  over the data) handed to faiss, the default;
- ``kmeans(backend="array")`` on NumPy and on PyTorch CPU tensors, k-means++ (the default) and
  random starts (target for the random start: <= 3 x faiss).

The table also gives the iterations run and the final k-means objective, so that the rows can be
seen to solve the same problem equally well. Both stop before ``--iters`` once converged: the
array backend when no label changes, faiss when its objective stops changing.

A second table scores each start on a planted mixture (20 unit-variance Gaussians in D = 64,
centres drawn with standard deviation 6 per coordinate, 6,000 points): the NMI against the
planted labels over ``--nmi-seeds`` seeds (mean and minimum), with one run and with three.

Usage: ``python benchmarks/kmeans.py [--quick] [--n N --d D --k K --iters I --repeat R --nmi-seeds S]``
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import numpy as np

import clusterlearn as cl


def mixture(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32 points: unit-variance noise around 2k centres of standard deviation 2."""
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((2 * k, d), dtype=np.float32)
    x = centres[rng.integers(2 * k, size=n)]
    x += rng.standard_normal((n, d), dtype=np.float32)
    return x


def interleaved_best(runs: list[tuple[str, Callable[[], Any]]], repeat: int) -> list[tuple[float, Any]]:
    """Smallest wall time of each run over ``repeat`` rounds, and its last result.

    Each round times every run once, in turn, so that all of them sample the same machine
    load (the benchmark machine may be shared).
    """
    best: list[float] = [float("inf")] * len(runs)
    results: list[Any] = [None] * len(runs)
    for _ in range(repeat):
        for i, (_, fn) in enumerate(runs):
            start = time.perf_counter()
            results[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, results))


def faiss_direct(x: np.ndarray, k: int, iters: int, seed: int) -> tuple[int, float]:
    """faiss' own k-means and final assignment; returns (iterations, objective of the labels)."""
    import faiss

    n, d = x.shape
    km = faiss.Kmeans(
        d, k, niter=iters, seed=seed, verbose=False, min_points_per_centroid=1, max_points_per_centroid=-(-n // k)
    )
    km.train(x)
    dist, _ = km.index.search(x, 1)
    return len(km.obj), float(dist.sum(dtype=np.float64))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N=20,000, D=64, k=100 (seconds, not minutes)")
    p.add_argument("--n", type=int)
    p.add_argument("--d", type=int)
    p.add_argument("--k", type=int)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeat", type=int, help="best of R interleaved rounds (default 3 with --quick, else 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nmi-seeds", type=int, default=10, help="seeds of the planted-mixture NMI table")
    args = p.parse_args()
    n, d, k = (20_000, 64, 100) if args.quick else (100_000, 256, 1_000)
    n, d, k = args.n or n, args.d or d, args.k or k
    repeat = args.repeat or (3 if args.quick else 1)

    import faiss
    import torch

    x = mixture(n, d, k, args.seed)
    xt = torch.from_numpy(x)
    print(
        f"k-means: N={n:,} D={d} k={k:,}, {args.iters} iterations, float32; faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} threads), torch {torch.__version__} ({torch.get_num_threads()} threads)\n"
    )

    def ours(data: Any, backend: str, init: str | None) -> tuple[int, float]:
        res = cl.kmeans(data, k, n_iter=args.iters, seed=args.seed, init=init, backend=backend)
        return res.n_iter, res.inertia

    runs = [
        ("faiss direct (`faiss.Kmeans` + search)", lambda: faiss_direct(x, k, args.iters, args.seed)),
        ('`kmeans(backend="faiss", init="random")`, numpy', lambda: ours(x, "faiss", "random")),
        ('`kmeans(backend="faiss")` (k-means++), numpy', lambda: ours(x, "faiss", None)),
        ('`kmeans(backend="array")` (k-means++), numpy', lambda: ours(x, "array", None)),
        ('`kmeans(backend="array", init="random")`, numpy', lambda: ours(x, "array", "random")),
        ('`kmeans(backend="array", init="random")`, torch CPU', lambda: ours(xt, "array", "random")),
    ]
    rows = [(name, seconds, *out) for (name, _), (seconds, out) in zip(runs, interleaved_best(runs, repeat))]
    base = rows[0][1]
    print("| method | seconds | × faiss direct | iterations | objective |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, iters, inertia in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / base:.2f} | {iters} | {inertia:.4g} |")
    print("\ntargets: faiss path (random start) <= 1.1 x faiss direct; array path (random start) <= 3 x faiss direct")
    planted_table(args.nmi_seeds, args.iters)


def planted_table(seeds: int, iters: int) -> None:
    """NMI against the truth on the planted 20-Gaussian mixture, per backend, start and n_init."""
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    centres = 6.0 * rng.standard_normal((20, 64))
    truth = rng.integers(20, size=6_000)
    x = (centres[truth] + rng.standard_normal((6_000, 64))).astype(np.float32)
    print(f"\nplanted mixture: 20 Gaussians, N=6,000, D=64, seeds 0..{seeds - 1}")
    print("| call | n_init | mean NMI | min NMI |")
    print("|---|---:|---:|---:|")
    for backend, init in (("faiss", "random"), ("faiss", None), ("array", None)):
        for n_init in (1, 3):
            scores = [
                normalized_mutual_info_score(
                    truth, cl.kmeans(x, 20, n_iter=iters, seed=s, init=init, backend=backend, n_init=n_init).labels
                )
                for s in range(seeds)
            ]
            call = f'`kmeans(backend="{backend}"' + (f', init="{init}"' if init else "") + ")`"
            print(f"| {call} | {n_init} | {np.mean(scores):.4f} | {min(scores):.4f} |")

if __name__ == "__main__":
    main()
