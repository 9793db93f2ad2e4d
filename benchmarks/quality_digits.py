"""The README's quality table: every method × backend × seed of the digits demo, mean ± std.

Each run is ``examples/imagenet_<method>_<backend>.py`` at its demo preset (16×16 digits,
half-width ResNet-18 with the small-image stem; ``--seed`` k), as its own process with one
thread. When it has finished, its evaluation records are read from the run directory: the
last record of ``metrics.jsonl`` (the final evaluation of the frozen backbone on the fixed
held-out split, and the method's own training labels) and ``baselines.json`` (the randomly
initialised network of that seed, and the raw pixels). Prints a Markdown table of mean ± std
over the seeds:

* kNN@20, kNN@200 (weighted k-NN, T = 0.07), linear probe: top-1 on the held-out split;
* NMI, ACC: k-means of the frozen features with k = 10, against the labels;
* labels NMI, ACC: the method's training labels (ODC's memory labels, DeepCluster's k-means
  labels, Self-Classifier's first head);

with rows for the two baselines of every report, the random network and the raw pixels (per
backend, over the seeds: the k-means of the evaluation is seeded with the run's seed, so even
the pixels' NMI/ACC vary by seed; their k-NN and probe do not). The table also goes to ``<out>/table.md``, every run's numbers to
``<out>/results.json``.

Run (18 runs of a few minutes each; ``--jobs`` of them at a time)::

    python benchmarks/quality_digits.py --jobs 2 --out runs/quality

Arguments after ``--`` go to every example, e.g. a quick check of the harness::

    python benchmarks/quality_digits.py --methods odc --backends torch --seeds 0,1 -- --epochs 1 --subset 300

With ``--reuse``, a run directory that already holds a finished run of the same command line
(``benchmark-run.json``, written when a run exits cleanly) is read instead of run again, so an
interrupted table continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"odc": "ODC", "deepcluster": "DeepCluster", "selfclassifier": "Self-Classifier"}
LABELS = {"odc": "memory labels", "deepcluster": "k-means labels", "selfclassifier": "first head"}
BACKENDS = ("torch", "jax")
#: (record key, column title) of the table, in order; ``nmi``/``acc`` are the training labels'.
COLUMNS = (("knn_top1@20", "kNN@20"), ("knn_top1@200", "kNN@200"), ("linear_top1", "probe"),
           ("feat_nmi", "NMI"), ("feat_acc", "ACC"), ("nmi", "labels NMI"), ("acc", "labels ACC"))
MARKER = "benchmark-run.json"


def comma_list(choices: tuple[str, ...] | None = None, kind: type = str) -> Any:
    """argparse type: a non-empty comma-separated list (of ``choices``, or of ``kind``)."""

    def parse(text: str) -> list[Any]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        try:
            values = [kind(item) for item in items]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from err
        if not values or (choices is not None and set(values) - set(choices)):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices or ())}, got {text!r}")
        if kind is int and min(values) < 0:
            raise argparse.ArgumentTypeError(f"seeds must be non-negative, got {text!r}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", type=comma_list(tuple(METHODS)), default=list(METHODS),
                   help="comma-separated subset of odc,deepcluster,selfclassifier (default: all)")
    p.add_argument("--backends", type=comma_list(BACKENDS), default=list(BACKENDS),
                   help="comma-separated subset of torch,jax (default: both)")
    p.add_argument("--seeds", type=comma_list(kind=int), default=[0, 1, 2], help="(default: 0,1,2)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one thread each (default: 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory of the runs, the table and results.json (default: runs/quality-<time>)")
    p.add_argument("--reuse", action="store_true", help="read finished runs of the same command instead of re-running")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be a positive integer, got {args.jobs}")
    args.extra = extra
    if args.out is None:
        args.out = ROOT / "runs" / time.strftime("quality-%Y%m%d-%H%M%S")
    return args


def command(method: str, backend: str, seed: int, extra: list[str], out: Path) -> list[str]:
    """The example's command line for one run (its output directory ``out``)."""
    script = ROOT / "examples" / f"imagenet_{method}_{backend}.py"
    return [sys.executable, str(script), "--seed", str(seed), "--no-progress", *extra, "--out", str(out)]


def single_thread_env() -> dict[str, str]:
    """The environment of a run: one OpenMP / XLA CPU thread (many runs share the cores)."""
    xla = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in xla:
        xla = f"{xla} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".strip()
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "XLA_FLAGS": xla}


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, fsync, rename): an interrupted
    benchmark leaves either the old file or the new one, never a torn marker or table."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def final_records(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last epoch's metrics record and the baselines of a finished run directory."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_epoch[record["epoch"]] = record  # a resumed epoch replaces its first attempt
    final = by_epoch[max(by_epoch)]
    if "feat_nmi" not in final:
        raise RuntimeError(f"{out}: the last epoch was not evaluated")
    return final, json.loads((out / "baselines.json").read_text())


def run_one(method: str, backend: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run (or, with ``--reuse``, read) one example; its final record, baselines and seconds."""
    out = args.out / f"{method}-{backend}-seed{seed}"
    cmd = command(method, backend, seed, args.extra, out)
    marker = out / MARKER
    done = json.loads(marker.read_text()) if args.reuse and marker.exists() else None
    if done is None or done.get("command") != cmd[1:]:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", MARKER):  # a fresh run must not read an older one's records
            (out / name).unlink(missing_ok=True)
        start = time.perf_counter()
        with open(out / "stdout.log", "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=single_thread_env(), stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = (out / "stdout.log").read_text()[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
        done = {"command": cmd[1:], "seconds": time.perf_counter() - start}
        write_text(marker, json.dumps(done))
    final, baselines = final_records(out)
    print(f"{method} {backend} seed {seed}: {summary(final)} ({done['seconds']:.0f} s)", flush=True)
    return {"method": method, "backend": backend, "seed": seed, "seconds": done["seconds"], "final": final,
            "random_net": baselines["random_net"], "pixels": baselines["pixels"], "split": baselines.get("split")}


def summary(record: dict[str, Any]) -> str:
    return "  ".join(f"{title} {fmt(record.get(key))}" for key, title in COLUMNS if record.get(key) is not None)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def mean_std(values: list[float | None]) -> str:
    """``0.912 ± 0.004`` (sample std over the values), ``0.912`` for one value, ``–`` for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1 or len(set(values)) == 1:
        return f"{values[0]:.3f}" + ("" if len(values) == 1 else " ± 0.000")
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: list[dict[str, Any]]) -> str:
    """The Markdown table: one row per method and backend, then the baselines (which have no
    training labels: ``–`` there)."""
    head = "| features | backend | runs | " + " | ".join(title for _, title in COLUMNS) + " |"
    rows = [head, "|---|---|---:|" + "---:|" * len(COLUMNS)]

    def row(name: str, backend: str, records: list[dict[str, Any]]) -> None:
        cells = [mean_std([r.get(key) for r in records]) for key, _ in COLUMNS]
        rows.append(f"| {name} | {backend} | {len(records)} | " + " | ".join(cells) + " |")

    for method in METHODS:
        for backend in BACKENDS:
            runs = [r["final"] for r in results if r["method"] == method and r["backend"] == backend]
            if runs:
                row(f"{METHODS[method]} ({LABELS[method]})", backend, runs)
    for key, name in (("random_net", "random network"), ("pixels", "raw pixels")):
        # one evaluation per distinct record: methods that build the same backbone from the same
        # seed give identical random networks, and the pixels differ between seeds only in the
        # seeded k-means; backends whose records agree share a row
        by_backend = {b: sorted({json.dumps(r[key], sort_keys=True) for r in results
                                 if r["backend"] == b and r[key] is not None}) for b in BACKENDS}
        groups: dict[tuple[str, ...], list[str]] = {}
        for backend, distinct in by_backend.items():
            if distinct:
                groups.setdefault(tuple(distinct), []).append(backend)
        for distinct, backends in groups.items():
            row(name, ",".join(backends), [json.loads(d) for d in distinct])
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [(m, b, s) for m in args.methods for b in args.backends for s in args.seeds]
    print(f"{len(plan)} runs, {args.jobs} at a time, in {args.out}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(*job, args), plan))
    text = table(results)
    split = results[0]["split"] or {}
    note = (f"digits demo, split {split.get('train', '?')} train / {split.get('test', '?')} held-out images; seeds "
            f"{','.join(map(str, args.seeds))}; mean ± sample std over the runs; example arguments: "
            f"{' '.join(args.extra) or '(demo preset)'}")
    write_text(args.out / "table.md", note + "\n\n" + text + "\n")
    write_text(args.out / "results.json", json.dumps(results, indent=1))
    print(f"\n{note}\n\n{text}")


if __name__ == "__main__":
    main()
