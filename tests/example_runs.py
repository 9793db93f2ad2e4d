"""Helpers shared by the tests that run the example scripts (``examples/``)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

import clusterlearn as cl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def script(name: str) -> ModuleType:
    """An example script imported as a module (``examples/`` on ``sys.path``, as when run)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def records(out: Path) -> list[dict]:
    """The records of ``<out>/metrics.jsonl``, in order."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def final_line(text: str) -> str:
    """The last line a script printed (its summary)."""
    return text.strip().splitlines()[-1]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name: bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def torch_checkpoint(path: Path) -> dict:
    """A PyTorch example's checkpoint file, loaded as the scripts load it (``weights_only``)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def npz_checkpoint(out: Path) -> dict[str, np.ndarray]:
    """The arrays of a JAX example's ``<out>/checkpoint.npz`` (no pickles)."""
    with np.load(Path(out) / "checkpoint.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def run_main(name: str, argv: list[str]) -> str:
    """Run an example script's ``main(argv)`` in this process and return what it printed."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        script(name).main(argv)
    return buf.getvalue()


def check_evaluation(out: Path, text: str, labels: np.ndarray, num_clusters: int) -> None:
    """What every run's evaluation leaves: scores in range in the final record, the fixed split,
    the baselines in the file and the final line, and one assignment per training image."""
    runs = script("runs")
    data = runs.demo_digits(16).subset(16)
    final = records(out)[-1]
    for key in runs.EVAL_KEYS:
        assert final[key] is not None and (-1 if key == "feat_ari" else 0) <= final[key] <= 1, key
    train, test = np.load(out / "split.npz").values()
    want = cl.stratified_split(data.targets, 0.2, seed=0)
    assert np.array_equal(train, want[0]) and np.array_equal(test, want[1])
    baselines = json.loads((out / "baselines.json").read_text())
    line = [line for line in text.splitlines() if line.startswith("final ")][-1]
    for name, shown in (("random_net", "random net"), ("pixels", "pixels")):
        assert set(runs.EVAL_KEYS) <= set(baselines[name]), name
        b = baselines[name]
        assert f"{shown}: kNN@20 {b['knn_top1@20']:.3f}  probe {b['linear_top1']:.3f}  NMI {b['feat_nmi']:.3f}" in line, line
    assert f"kNN@20 {final['knn_top1@20']:.3f}  probe {final['linear_top1']:.3f}  feat NMI {final['feat_nmi']:.3f}" in line
    rows = (out / "assignments.csv").read_text().splitlines()
    assert rows[0] == "index,path_or_id,cluster" and len(rows) == 1 + len(data)
    table = np.array([[int(v) for v in row.split(",")] for row in rows[1:]])
    assert table[:, 0].tolist() == list(range(len(data))) and np.array_equal(table[:, 1], data.ids)
    assert np.array_equal(table[:, 2], labels) and 0 <= labels.min() and labels.max() < num_clusters


#: Runs ``[(module, argv, stdout file), ...]`` (JSON in argv[1]) in one interpreter.
_DRIVER = """
import contextlib, importlib, json, sys
sys.path.insert(0, sys.argv[2])
for name, argv, log in json.loads(sys.argv[1]):
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        importlib.import_module(name).main(argv)
"""


def start_jax_runs(runs: list[tuple[str, list[str], Path]], devices: int):
    """One subprocess running the JAX example runs ``(module, argv, stdout file)`` in order, on
    ``devices`` forced CPU devices, compiled fast (JAX compile time dominates tiny runs)."""
    import os
    import subprocess

    flags = ["--xla_backend_optimization_level=0"]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags)}
    spec = json.dumps([(name, argv, str(log)) for name, argv, log in runs])
    return subprocess.Popen([sys.executable, "-c", _DRIVER, spec, str(EXAMPLES)], cwd=EXAMPLES.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout: float) -> str:
    """Wait for a :func:`start_jax_runs` process (killed and failed after ``timeout`` s); its output."""
    import os
    import signal
    import subprocess

    import pytest

    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the example runs did not finish in {timeout} s")
    assert proc.returncode == 0, log[-4000:]
    return log


def assert_resumed_exactly(straight: Path, resumed: Path, stopped_text: str, resumed_text: str) -> None:
    """A JAX run stopped after epoch 1 and resumed equals the straight 2-epoch run: the
    stopped run printed epoch 1 only, the resumed one continued with epoch 2, every checkpoint
    array but ``args`` is equal, and both runs recorded epochs 1 and 2."""
    assert "epoch 1 " in stopped_text and "epoch 2 " not in stopped_text
    assert "epoch 1 " not in resumed_text  # it continued with epoch 2
    a, b = npz_checkpoint(straight), npz_checkpoint(resumed)
    assert set(a) == set(b)
    for key in a:
        if key != "args":
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} differs after resuming")
    assert [r["epoch"] for r in records(resumed)] == [1, 2]
