"""Time one ODC memory step at ImageNet scale against its floor and against the reference way.

Defaults: N = 1,281,167 samples, C = 10,000 clusters, D = 256, B = 512 (ODC on ImageNet).
Features are random unit vectors around C random centres and labels their centre ("k-means
like"). Every timing is amortised over ``--iters`` steps (default 30), so centroid refreshes
(every 10th step) and the per-step small-cluster checks are included.

Each backend runs in its own child process (so that NumPy's, PyTorch's and XLA's thread pools
do not compete), and within it every number is measured in the same process. Printed, per
backend (numpy, torch CPU, jax):
- the bare B x D . D x C matmul, the floor of an ODC step, timed right before every step
  (for jax: ``jnp`` ``f @ cen.T`` under ``jax.jit``);
- ``OnlineDeepClustering.step`` and its ratio to that matmul (target <= 1.3); for jax the
  adapter's jitted ``clusterlearn.adapters.jax.step`` plus ``loss_weights`` and the host-side
  ``small_cluster_step`` (small-cluster handling on the core's schedule) that a loop runs
  every step (compiled once before timing);
- for numpy, a straightforward re-statement of the reference implementation: all centroids
  recomputed every 10 steps by sorting the N labels and gathering each cluster's members, an
  O(N) bincount per step for the small-cluster check and another for the loss weights, and a
  scan of all N labels per small cluster; and our speed-up over it;
- one small-cluster handling call with ``--small`` planted small clusters (for jax, the
  adapter's ``handle_small_clusters`` and, on its own row, ``OnlineDeepClustering`` holding
  JAX arrays, whose handler computes on NumPy copies).

Usage: ``python benchmarks/odc_step.py [--n N --c C --d D --b B --iters K --backends numpy,torch,jax]``
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

import clusterlearn as cl
from clusterlearn import odc_state
from clusterlearn.small_clusters import handle_small_clusters


def synthetic(n: int, c: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit features scattered around c random centres, and each feature's centre id."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((c, d), dtype=np.float32)
    labels = rng.integers(c, size=n)
    feats = centres[labels]
    feats += 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats, labels


def timed(fn: Callable[[], Any], iters: int, sync: Callable[[], None] = lambda: None) -> float:
    """Mean seconds per call of ``fn`` over ``iters`` calls (after one warm-up call)."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


class ReferenceODC:
    """The reference implementation's memory costs, restated plainly in NumPy."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray, c: int, min_size: int = 20, momentum: float = 0.5):
        self.f, self.y, self.c = feats.copy(), labels.copy(), c
        self.min_size, self.m, self.it = min_size, momentum, 0
        self.cen = self._recompute()

    def _recompute(self) -> np.ndarray:
        order = np.argsort(self.y, kind="stable")
        bounds = np.searchsorted(self.y[order], np.arange(self.c + 1))
        cen = np.zeros((self.c, self.f.shape[1]), dtype=np.float32)
        for k in range(self.c):  # gather each cluster's members
            members = order[bounds[k] : bounds[k + 1]]
            if len(members):
                cen[k] = self.f[members].mean(axis=0)
        return cen

    def step(self, idx: np.ndarray, feats: np.ndarray) -> None:
        new = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        mix = self.m * new + (1 - self.m) * self.f[idx]
        self.f[idx] = mix / np.linalg.norm(mix, axis=1, keepdims=True)
        self.y[idx] = np.argmax(self.f[idx] @ self.cen.T, axis=1)
        self.it += 1
        if self.it % 10 == 0:
            self.cen = self._recompute()
        self.handle_small()
        weights = (np.bincount(self.y, minlength=self.c) + 1e-10) ** -0.5  # loss weights, O(N)
        self.weights = weights / weights.sum()

    def handle_small(self) -> int:
        """The reference's small-cluster handling: scans of all N labels per small cluster."""
        hist = np.bincount(self.y, minlength=self.c)  # small-cluster check, O(N)
        small = np.flatnonzero(hist < self.min_size)
        normal = np.setdiff1d(np.arange(self.c), small)
        for k in small:  # a scan of all labels per small cluster, then re-assignment
            members = np.flatnonzero(self.y == k)
            self.y[members] = normal[np.argmax(self.f[members] @ self.cen[normal].T, axis=1)]
        for k in small:  # each now-empty cluster: find the largest (O(N)), gather it (O(N)), split
            largest = int(np.argmax(np.bincount(self.y, minlength=self.c)))
            members = np.flatnonzero(self.y == largest)
            halves = cl.kmeans(self.f[members], 2, n_iter=10, seed=int(k), backend="array").labels
            self.y[members[halves == 1]] = k
            self.cen[[largest, k]] = [self.f[members[halves == h]].mean(axis=0) for h in (0, 1)]
        return len(small)


def plant_small_clusters(labels: np.ndarray, c: int, count: int, keep: int, seed: int = 2) -> np.ndarray:
    """Labels where ``count`` clusters keep only ``keep`` members (the rest moved elsewhere)."""
    rng = np.random.default_rng(seed)
    victims = rng.choice(c, size=count, replace=False)
    hit = np.flatnonzero(np.isin(labels, victims))
    order = hit[np.argsort(labels[hit], kind="stable")]
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels)  # start of each run
    moved = order[np.arange(len(order)) - first >= keep]
    others = np.setdiff1d(np.arange(c), victims)
    out = labels.copy()
    out[moved] = rng.choice(others, size=len(moved))
    return out


def bench_small_clusters(conv: Callable[[np.ndarray], Any], feats: np.ndarray, labels: np.ndarray, args: argparse.Namespace) -> float:
    """Seconds for one small-cluster handling call with ``--small`` planted small clusters."""
    planted = plant_small_clusters(labels, args.c, args.small, keep=5)
    # initialised without handling (min_cluster_size=0), so the planted clusters stay
    odc = cl.OnlineDeepClustering(args.n, args.c, args.d, like=conv(np.zeros(1, dtype=np.float32)), seed=0, min_cluster_size=0)
    odc.initialize(conv(feats), conv(planted))
    config = dataclasses.replace(odc.config, min_cluster_size=20)
    state = odc.state
    start = time.perf_counter()
    _, stats = handle_small_clusters(state, config, key=1)
    seconds = time.perf_counter() - start
    assert stats.num_small_clusters == args.small, stats
    return seconds


def bench_backend(name: str, feats: np.ndarray, labels: np.ndarray, args: argparse.Namespace, batches: list) -> dict:
    if name == "torch":
        import torch

        conv: Callable[[np.ndarray], Any] = torch.from_numpy
    else:
        conv = np.asarray
    like = conv(np.zeros(1, dtype=np.float32))
    odc = cl.OnlineDeepClustering(args.n, args.c, args.d, like=like, seed=0)
    odc.initialize(conv(feats), conv(labels))
    batches = [(conv(i), conv(f)) for i, f in batches]
    odc.step(*batches[0])  # warm-up
    matmul = step = 0.0
    small = 0
    for idx, f in batches[1 : args.iters + 1]:
        # The floor, timed right before each step on the same batch and centroids, so both
        # see the same machine state; the step includes loss_weights() as a loop calls it.
        cen = odc.state.centroids
        t0 = time.perf_counter()
        f @ cen.T
        t1 = time.perf_counter()
        small += odc.step(idx, f)["num_small_clusters"]
        odc.loss_weights()
        t2 = time.perf_counter()
        matmul, step = matmul + t1 - t0, step + t2 - t1
    start = time.perf_counter()
    odc_state.resync(odc.state)
    resync = time.perf_counter() - start
    n = args.iters
    handling = bench_small_clusters(conv, feats, labels, args)
    return {"backend": name, "matmul": matmul / n, "step": step / n, "resync": resync, "small": small, "handling": handling}


def bench_jax(feats: np.ndarray, labels: np.ndarray, args: argparse.Namespace, batches: list) -> dict:
    """The JAX adapter's jitted step against a jitted ``jnp`` matmul, both timed in this process."""
    import jax
    import jax.numpy as jnp

    from clusterlearn.adapters import jax as clj

    def start(labels: np.ndarray, min_cluster_size: int) -> tuple[Any, Any]:
        """Config and state from a core initialised on NumPy (no handling: planted clusters stay)."""
        odc = cl.OnlineDeepClustering(args.n, args.c, args.d, seed=0, min_cluster_size=0)
        odc.initialize(feats, labels)
        config = dataclasses.replace(clj.config_from_core(odc), min_cluster_size=min_cluster_size)
        return config, clj.state_from_core(odc)

    config, state = start(labels, 20)
    batches = [(jnp.asarray(i), jnp.asarray(f)) for i, f in batches]
    floor = jax.jit(lambda f, cen: f @ cen.T)
    small = 0

    def iteration(state: Any, idx: Any, f: Any) -> tuple[Any, int]:
        state, _ = clj.step(state, idx, f, config)
        clj.loss_weights(state, config).block_until_ready()
        state, handled = clj.small_cluster_step(state, config)  # reads the iteration and sizes: synchronises
        return state, handled.num_small_clusters

    state, _ = iteration(state, *batches[0])  # compiles
    floor(batches[0][1], state.centroids).block_until_ready()
    matmul = step = 0.0
    for idx, f in batches[1 : args.iters + 1]:
        t0 = time.perf_counter()
        floor(f, state.centroids).block_until_ready()
        t1 = time.perf_counter()
        state, handled = iteration(state, idx, f)
        t2 = time.perf_counter()
        matmul, step, small = matmul + t1 - t0, step + t2 - t1, small + handled
    clj.resync(state).sums.block_until_ready()  # compiles
    start_time = time.perf_counter()
    clj.resync(state).sums.block_until_ready()
    resync = time.perf_counter() - start_time
    config, planted = start(plant_small_clusters(labels, args.c, args.small, keep=5), 20)
    jax.block_until_ready(planted)  # the host-to-device copy is not part of the handling
    start_time = time.perf_counter()
    _, stats = clj.handle_small_clusters(planted, config, key=1)
    handling = time.perf_counter() - start_time
    assert stats.num_small_clusters == args.small, stats
    core_handling = bench_small_clusters(jnp.asarray, feats, labels, args)  # the core shell on JAX arrays
    n = args.iters
    return {"backend": "jax", "matmul": matmul / n, "step": step / n, "resync": resync, "small": small, "handling": handling,
            "core_handling": core_handling}


def worker(args: argparse.Namespace) -> dict:
    """Measure one backend (and, for numpy, the reference) in this process."""
    feats, labels = synthetic(args.n, args.c, args.d)
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(args.iters + 1):
        idx = rng.choice(args.n, size=args.b, replace=False)
        f = feats[idx] + 0.3 * rng.standard_normal((args.b, args.d), dtype=np.float32)
        batches.append((idx, f))
    bench = bench_jax if args.worker == "jax" else functools.partial(bench_backend, args.worker)
    row = bench(feats, labels, args, batches)
    if args.worker == "numpy":
        ref = ReferenceODC(feats, labels, args.c)
        it = iter(batches * 2)
        row["reference"] = timed(lambda: ref.step(*next(it)), args.iters)
        ref_small = ReferenceODC(feats, plant_small_clusters(labels, args.c, args.small, keep=5), args.c)
        start = time.perf_counter()
        assert ref_small.handle_small() == args.small
        row["reference_handling"] = time.perf_counter() - start
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--c", type=int, default=10_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--b", type=int, default=512)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--small", type=int, default=100, help="planted small clusters for the handling timing")
    p.add_argument("--backends", default="numpy,torch,jax")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    print(f"N={args.n:,} C={args.c:,} D={args.d} B={args.b}, {args.iters} steps per backend")
    rows = []
    for name in args.backends.split(","):
        sizes = ["--n", str(args.n), "--c", str(args.c), "--d", str(args.d), "--b", str(args.b), "--iters", str(args.iters), "--small", str(args.small)]
        out = subprocess.run([sys.executable, __file__, *sizes, "--worker", name], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"skipping {name}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    print()
    print("| backend | B×D·D×C matmul (ms) | ODC step (ms) | step / matmul | reference step (ms) | speed-up | small clusters handled | one exact resync of the sums (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref_cells = f"{r['reference'] * 1e3:.3g} | {r['reference'] / r['step']:.1f}×" if "reference" in r else "– | –"
        print(
            f"| {r['backend']} | {r['matmul'] * 1e3:.3g} | {r['step'] * 1e3:.3g} | {r['step'] / r['matmul']:.2f} | "
            f"{ref_cells} | {r['small']} | {r['resync']:.2f} |"
        )
    print()
    print(f"Small-cluster handling, one call with {args.small} planted small clusters (5 members each):")
    print()
    print("| backend | ours (s) | reference (s) | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        ref_cells = f"{r['reference_handling']:.2f} | {r['reference_handling'] / r['handling']:.1f}×" if "reference_handling" in r else "– | –"
        print(f"| {r['backend']} | {r['handling']:.3f} | {ref_cells} |")
        if "core_handling" in r:  # OnlineDeepClustering on JAX arrays (eager): the handler on NumPy copies
            print(f"| {r['backend']} (core on JAX arrays) | {r['core_handling']:.3f} | – | – |")
    print("\nreference = the reference implementation's memory work restated in NumPy (see module docstring)")


if __name__ == "__main__":
    main()
