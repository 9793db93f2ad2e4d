"""Clustering quality of the three PyTorch examples on the digits demo data, at an equal CPU budget.

Each example (ODC, DeepCluster, Self-Classifier; demo defaults: 16×16 digits, half-width
ResNet-18 with the small-image stem, 10 clusters, or heads of 10/20/40/80 classes scored on
the first) runs as its own process with the same
number of torch threads and is stopped when its wall-clock budget is spent; the scores are
those of its last finished epoch, read from its ``metrics.jsonl``. The schedules are planned
for ``--epochs`` (more than fit in the budget), so the learning rate never decays. The
baseline is k-means on the L2-normalised raw pixels (the 64 grey levels of each digit) with
10 clusters. Prints a Markdown table of NMI / ARI / ACC against the true labels.

Run: ``python benchmarks/quality_digits.py [--budget 300 --threads 2 --methods odc,deepcluster,selfclassifier]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import clusterlearn as cl
from clusterlearn import metrics

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "ODC (memory labels)": "imagenet_odc_torch.py",
    "DeepCluster (k-means labels)": "imagenet_deepcluster_torch.py",
    "Self-Classifier (first head)": "imagenet_selfclassifier_torch.py",
}


def run_for(script: str, budget: float, threads: int, epochs: int, out: Path) -> tuple[dict | None, float]:
    """Run ``examples/<script>`` on the demo data for ``budget`` seconds; its last epoch's record."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(ROOT / "examples" / script), "--epochs", str(epochs), "--no-progress", "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=budget)
        if proc.returncode != 0:
            raise RuntimeError(f"{script} failed:\n{err[-2000:]}")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate()
    elapsed = time.perf_counter() - start
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return (json.loads(lines[-1]) if lines else None), elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=300.0, help="wall-clock seconds per method (default: 300)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (default: 2)")
    p.add_argument("--epochs", type=int, default=200, help="planned epochs (schedules), more than the budget allows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="odc,deepcluster,selfclassifier",
                   help="comma-separated subset of odc,deepcluster,selfclassifier (default: all)")
    args = p.parse_args()
    chosen = {m.strip() for m in args.methods.split(",") if m.strip()}
    known = {script.split("_")[1]: name for name, script in METHODS.items()}
    if not chosen or chosen - known.keys():
        p.error(f"--methods: expected a subset of {','.join(known)}, got {args.methods!r}")

    from sklearn.datasets import load_digits

    digits = load_digits()
    truth = digits.target
    base = np.asarray(cl.kmeans(cl.l2_normalize(digits.data.astype(np.float32)), 10, seed=args.seed, backend="array").labels)
    rows = [("k-means on raw pixels", "-", "-", metrics.nmi(truth, base), metrics.ari(truth, base), metrics.accuracy(truth, base))]
    with tempfile.TemporaryDirectory() as tmp:
        for name, script in METHODS.items():
            if script.split("_")[1] not in chosen:
                continue
            record, elapsed = run_for(script, args.budget, args.threads, args.epochs, Path(tmp) / script)
            if record is None:
                rows.append((name, "0", f"{elapsed:.0f}", float("nan"), float("nan"), float("nan")))
            else:
                rows.append((name, str(record["epoch"]), f"{elapsed:.0f}", record["nmi"], record["ari"], record["acc"]))
    print(f"digits (1797 images, 10 classes), {args.budget:.0f} s per method, {args.threads} torch threads\n")
    print("| method | epochs done | seconds | NMI | ARI | ACC |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, epochs, seconds, nmi, ari, acc in rows:
        print(f"| {name} | {epochs} | {seconds} | {nmi:.3f} | {ari:.3f} | {acc:.3f} |")


if __name__ == "__main__":
    main()
