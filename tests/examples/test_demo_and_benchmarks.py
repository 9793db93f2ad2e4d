"""The demo and the benchmarks run end to end at tiny sizes (so they cannot rot)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test runs a script in a subprocess

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_odc_demo_prints_nmi_per_epoch_and_baseline():
    text = run("examples/digits_odc_demo.py", "--epochs", "2")
    assert "k-means on raw pixels" in text
    assert text.count("NMI") >= 4
    assert "epoch 2:" in text


def test_odc_step_benchmark_prints_measured_table():
    text = run("benchmarks/odc_step.py", "--n", "4000", "--c", "40", "--d", "16", "--b", "64", "--iters", "3", "--small", "5", "--backends", "numpy,torch")
    rows = [line for line in text.splitlines() if line.startswith("| numpy") or line.startswith("| torch")]
    assert len(rows) == 4, text  # step table and small-cluster handling table, two backends each
    cells = rows[0].split("|")
    assert float(cells[2]) > 0 and float(cells[3]) > 0  # measured milliseconds
    assert float(rows[2].split("|")[2]) > 0  # measured handling seconds


def test_deepcluster_demo_prints_scores_next_to_kmeans():
    text = run("examples/digits_deepcluster_demo.py", "--epochs", "2")
    assert "plain k-means on raw pixels" in text
    assert "epoch 1:" in text and "NMI vs previous epoch" in text


def test_kmeans_benchmark_prints_measured_table():
    text = run("benchmarks/kmeans.py", "--n", "2000", "--d", "16", "--k", "20", "--iters", "3", "--nmi-seeds", "2")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 5, text  # header + faiss direct, faiss path, numpy array, torch array


@pytest.mark.slow
def test_quality_table_reports_mean_and_std_over_seeds_with_both_baselines(tmp_path):
    """The README's quality table end to end on a tiny configuration: two seeds of the ODC torch
    example, their final records averaged, both baselines as rows; ``--reuse`` reads the finished
    runs instead of training again."""
    tiny = ["--", "--epochs", "1", "--subset", "16", "--resolution", "16", "--width", "8", "--batch-size", "8",
            "--clusters", "2", "--min-cluster-size", "4"]
    argv = ["benchmarks/quality_digits.py", "--methods", "odc", "--backends", "torch", "--seeds", "0,1",
            "--jobs", "2", "--out", str(tmp_path)]
    text = run(*argv, *tiny)
    finals = []
    for seed in (0, 1):
        lines = (tmp_path / f"odc-torch-seed{seed}" / "metrics.jsonl").read_text().splitlines()
        finals.append(json.loads(lines[-1]))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"features", "ODC (memory labels)", "random network", "raw pixels"}, text
    cells = [c.strip() for c in rows["ODC (memory labels)"].split("|")[2:-1]]
    assert cells[:2] == ["torch", "2"]
    for cell, key in zip(cells[2:], ("knn_top1@20", "knn_top1@200", "linear_top1", "feat_nmi", "feat_acc", "nmi", "acc")):
        values = [f[key] for f in finals]
        want = f"{statistics.fmean(values):.3f}" + ("" if values[0] == values[1] else f" ± {statistics.stdev(values):.3f}")
        assert cell == want or (values[0] == values[1] and cell == f"{values[0]:.3f} ± 0.000"), (key, cell, values)
    assert (tmp_path / "table.md").read_text().strip().endswith(text.strip().splitlines()[-1])
    markers = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/benchmark-run.json")}
    assert len(markers) == 2
    assert run(*argv, "--reuse", *tiny).splitlines()[-4:] == text.splitlines()[-4:]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/benchmark-run.json")} == markers  # nothing re-ran
