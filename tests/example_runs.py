"""Helpers shared by the tests that run the example scripts (``examples/``)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

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
