"""The demo and the benchmarks run end to end at tiny sizes (so they cannot rot)."""

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
    text = run("benchmarks/kmeans.py", "--n", "2000", "--d", "16", "--k", "20", "--iters", "3")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 5, text  # header + faiss direct, faiss path, numpy array, torch array
