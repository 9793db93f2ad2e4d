"""What sharding the ODC sample memory saves, measured on CPU processes, and a model beyond.

For world sizes 1, 2, 4 (gloo processes on this machine) and the two memories of the torch
adapter, :class:`~clusterlearn.adapters.torch.OnlineDeepClustering` (every rank holds all N
rows) and :class:`~clusterlearn.adapters.torch.ShardedOnlineDeepClustering` (each rank holds
ceil(N/S) rows), at ODC's ImageNet setting (N = 1,281,167, C = 10,000, D = 256), it prints per
rank:

- the bytes the memory holds (its tensors: features, labels, centroids, sizes, sums) and the
  process's peak resident set (which also counts the synthetic data set each rank makes);
- the bytes each rank hands to collectives per step (counted by wrapping ``all_reduce``,
  ``broadcast`` and the all-gathers), independent of N for the sharded memory;
- the time per step, and the sharded/replicated ratio at the same world size.

Labels are given (each feature's generating centre), so no k-means runs; features are unit
vectors scattered around C random centres, generated in fixed chunks of rows so that a rank
makes only the rows it holds. Each rank's batch is ``--batch`` rows (DDP: the global batch is
S times that). A world size whose ranks would not fit in the available memory (estimated
from the peak of one rank: S times for replicated ranks) is reported, not run: the peak
includes the synthetic data set and the initialisation's temporaries. With more ranks than cores the ranks share cores (each runs one thread), so the
step times at S > cores measure contention, not scaling.

A second table is a model, not a measurement: per-rank memory and bytes per step at N = 10^8
and 10^9, C = 10^5, from the sizes of the state arrays, plus the time of one Lloyd iteration
of k-means over the whole memory (2·N·C·D flops split over S ranks) at the float32 matmul rate
measured on this machine's core (``--flops`` to assume another rate, e.g. a GPU's).

Usage: ``python benchmarks/sharded_memory.py [--n N --c C --d D --batch B --iters K --worlds 1,2,4]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 65536  # rows generated per seeded chunk: any rank can make any rows alone


def centres(c: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).standard_normal((c, d), dtype=np.float32)


def all_labels(n: int, c: int, seed: int) -> np.ndarray:
    """(N,) int64: each sample's generating centre."""
    return np.concatenate([np.random.default_rng([seed, 1, k]).integers(c, size=min(CHUNK, n - k * CHUNK))
                           for k in range(-(-n // CHUNK))])


def rows(start: int, stop: int, labels: np.ndarray, cen: np.ndarray, seed: int) -> np.ndarray:
    """(stop - start, D) float32 unit features of samples ``start:stop`` (the same on every rank)."""
    out = np.empty((stop - start, cen.shape[1]), dtype=np.float32)
    for k in range(start // CHUNK, -(-stop // CHUNK)):
        lo, hi = k * CHUNK, min((k + 1) * CHUNK, labels.shape[0])
        noise = np.random.default_rng([seed, 2, k]).standard_normal((hi - lo, cen.shape[1]), dtype=np.float32)
        block = cen[labels[lo:hi]] + 0.5 * noise
        a, b = max(lo, start), min(hi, stop)
        block = block[a - lo : b - lo]
        out[a - start : b - start] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def count_collectives(dist) -> list[int]:
    """Wrap the collectives the adapters call; the returned cell counts the bytes handed to them."""
    sent = [0]

    def wrap(fn, position):
        def counted(*args, **kwargs):
            tensor = args[position] if len(args) > position else next(iter(kwargs.values()))
            sent[0] += tensor.numel() * tensor.element_size()
            return fn(*args, **kwargs)

        return counted

    for name, position in (("all_reduce", 0), ("broadcast", 0), ("all_gather_into_tensor", 1),
                           ("all_gather_single", 1), ("all_gather", 1)):
        if hasattr(dist, name):
            setattr(dist, name, wrap(getattr(dist, name), position))
    return sent


def worker(rank: int, world: int, mode: str, init_file: str, out: str, a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    sent = count_collectives(dist)  # before the adapter binds the functions
    from clusterlearn.adapters.torch import OnlineDeepClustering, ShardedOnlineDeepClustering

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    labels = all_labels(a.n, a.c, a.seed)
    cen = centres(a.c, a.d, a.seed)
    t0 = time.perf_counter()
    if mode == "sharded":
        odc = ShardedOnlineDeepClustering(a.n, a.c, a.d)
        mine = odc.shard_indices()
        odc.initialize(torch.from_numpy(rows(int(mine[0]), int(mine[-1]) + 1, labels, cen, a.seed)), torch.from_numpy(labels))
        held = odc.state
    else:
        odc = OnlineDeepClustering(a.n, a.c, a.d)
        feats = torch.from_numpy(rows(0, a.n, labels, cen, a.seed))
        odc.initialize(feats, torch.from_numpy(labels))
        del feats
        held = (odc.samples.features, odc.samples.labels, odc.centroid_memory.centroids, odc.centroid_memory.sizes, odc.centroid_memory.sums)
    init_s = time.perf_counter() - t0
    state_bytes = sum(x.numel() * x.element_size() for x in held)
    rng = np.random.default_rng([a.seed, 3, rank])

    def batch():
        idx = rng.choice(a.n, size=a.batch, replace=False)
        f = cen[labels[idx]] + 0.5 * rng.standard_normal((a.batch, a.d), dtype=np.float32)
        return torch.from_numpy(idx), torch.from_numpy(f / np.linalg.norm(f, axis=1, keepdims=True))

    batches = [batch() for _ in range(a.iters + 2)]
    for idx, f in batches[:2]:
        odc.step(idx, f)
    dist.barrier()
    sent[0] = 0
    t0 = time.perf_counter()
    for idx, f in batches[2:]:
        odc.step(idx, f)
    dist.barrier()
    step_s = (time.perf_counter() - t0) / a.iters
    result = {"rank": rank, "state_bytes": state_bytes, "bytes_per_step": sent[0] / a.iters, "step_s": step_s,
              "init_s": init_s, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def launch(world: int, mode: str, a: argparse.Namespace, tmp: Path) -> list[dict]:
    init = tmp / f"init-{mode}-{world}"
    outs = [tmp / f"{mode}-{world}-{r}.json" for r in range(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--n", str(a.n), "--c", str(a.c), "--d", str(a.d), "--batch", str(a.batch), "--iters", str(a.iters),
            "--seed", str(a.seed)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), mode, str(init), str(outs[r]), *args],
                              env=env) for r in range(world)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"a rank of the {mode} run at world size {world} failed")
    return [json.loads(o.read_text()) for o in outs]


def matmul_flops(d: int, c: int) -> float:
    """Float32 multiply-adds ×2 per second of one thread's (4096, D)·(D, C) matmul."""
    import torch

    torch.set_num_threads(1)
    x, y = torch.randn(4096, d), torch.randn(d, min(c, 4096))
    x @ y
    t0 = time.perf_counter()
    for _ in range(5):
        x @ y
    return 5 * 2 * 4096 * d * y.shape[1] / (time.perf_counter() - t0)


def model_rows(d: int, batch: int, flops: float) -> list[str]:
    """Per-rank memory, bytes per step and a k-means iteration's time from the state's sizes."""
    lines = ["| N | C | ranks S | replicated memory / rank | sharded memory / rank | sharded bytes / step / rank | k-means iteration (sharded) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in (10**8, 10**9):
        for c in (10**5,):
            fixed = n * 8 + c * d * (4 + 8) + c * 8  # int64 labels (replicated), centroids f32, sums f64, sizes
            for s in (8, 64, 512):
                step = s * batch * (4 * d + 8) + s * batch * 4 * d  # all-gathered batch + the psum of its rows
                lines.append(f"| {n:.0e} | {c:.0e} | {s} | {gib(n * d * 4 + fixed)} | {gib(-(-n // s) * d * 4 + fixed)} "
                             f"| {step / 2**20:.1f} MiB | {2 * n * c * d / s / flops:.0f} s |")
    return lines


def available_memory() -> float:
    """Bytes the kernel can still give processes (``MemAvailable``; infinite where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        return float(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return float("inf")


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_281_167)
    p.add_argument("--c", type=int, default=10_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--batch", type=int, default=256, help="rows per rank per step")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops", type=float, default=None, help="matmul rate (flop/s) assumed by the model")
    p.add_argument("--worker", nargs=5, metavar=("RANK", "WORLD", "MODE", "INIT", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        rank, world, mode, init, out = a.worker
        worker(int(rank), int(world), mode, init, out, a)
        return
    from machine import describe  # benchmarks/, the script's folder

    print(f"# {describe()}")
    print(f"# N={a.n} C={a.c} D={a.d}, {a.batch} rows per rank per step, {a.iters} timed steps, one thread per rank\n")
    print("| ranks S | memory | held / rank | peak RSS / rank | sent to collectives / step / rank | step | sharded / replicated |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    peak_at_one: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(w) for w in a.worlds.split(",")):
            seen: dict[str, list[dict] | None] = {}
            for mode in ("replicated", "sharded"):
                # a replicated rank needs what one process needed; a sharded one about 1/S of it
                need = peak_at_one.get(mode, 0.0) * (world if mode == "replicated" else 1.5)
                if need > available_memory():
                    seen[mode] = None
                    print(f"| {world} | {mode} | not run: {world} ranks need about {gib(need)}, "
                          f"{gib(available_memory())} available | | | | |", flush=True)
                    continue
                ranks = seen[mode] = launch(world, mode, a, Path(tmp))
                if world == 1:
                    peak_at_one[mode] = ranks[0]["peak_rss"]
                step = max(r["step_s"] for r in ranks)
                base = seen.get("replicated")
                ratio = f"{step / max(r['step_s'] for r in base):.2f}" if mode == "sharded" and base else ""
                print(f"| {world} | {mode} | {gib(max(r['state_bytes'] for r in ranks))} | {gib(max(r['peak_rss'] for r in ranks))} "
                      f"| {max(r['bytes_per_step'] for r in ranks) / 1024:.0f} KiB | {step * 1e3:.1f} ms | {ratio} |", flush=True)
    flops = a.flops or matmul_flops(a.d, a.c)
    print(f"\n# Model (not measured): D={a.d}, {a.batch} rows per rank per step, labels int64 replicated, "
          f"matmul at {flops / 1e9:.0f} GFLOP/s per rank")
    print("\n".join(model_rows(a.d, a.batch, flops)))


if __name__ == "__main__":
    main()
