"""The PyTorch examples under faults: a rank that dies or hangs, a resume under another world
size, bad checkpoints, a torn ``metrics.jsonl`` and bad files in ``--data``.

The two-process runs start each rank as its own process (``env://`` rendezvous, gloo, one
OpenMP thread) rather than through torchrun, whose agent would stop the survivor itself: here
the survivor must notice on its own, through ``--dist-timeout``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ODC_TINY = ["--subset", "16", "--resolution", "16", "--batch-size", "8", "--no-progress", "--clusters", "2",
            "--min-cluster-size", "4"]

#: 8 steps per epoch on each of 2 ranks: a kill right after a checkpoint lands mid-epoch.
ODC_TWO = ["--subset", "64", "--resolution", "16", "--batch-size", "8", "--no-progress",
           "--clusters", "2", "--min-cluster-size", "4"]
TIMEOUT = 10  # --dist-timeout of the fault tests, seconds
GUARD = 240  # a hang guard only: well above start-up + TIMEOUT on a busy 2-core machine


def script(name: str):
    """An example script imported as a module (``examples/`` on ``sys.path``, as when run)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def run_main(name: str, argv: list[str]) -> str:
    """Run a script's ``main`` in this process and return what it printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        script(name).main(argv)
    return buf.getvalue()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argv: list[str], world: int = 2) -> list[subprocess.Popen]:
    """``world`` processes of the ODC example joined through env:// (what torchrun sets up)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, str(EXAMPLES / "imagenet_odc_torch.py"), *argv], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(return code, stdout, stderr) of each process; kills them all if one outlives the guard."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=GUARD)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def run_ranks(argv: list[str]) -> list[tuple[int, str, str]]:
    results = finish(start_ranks(argv))
    for rc, out, err in results:
        assert rc == 0, err[-4000:]
    return results


def wait_for(path: Path, procs: list[subprocess.Popen]) -> None:
    """Until ``path`` exists; fails if a process exits first."""
    deadline = time.monotonic() + GUARD
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            results = finish(procs)
            pytest.fail(f"no {path.name} before a process ended: {[(rc, err[-2000:]) for rc, _, err in results]}")
        time.sleep(0.02)


def assert_same_state(a: dict, b: dict) -> None:
    for part in ("model", "odc"):
        for key, value in a[part].items():
            same = torch.equal(value, b[part][key]) if isinstance(value, torch.Tensor) else value == b[part][key]
            assert same, f"{part}.{key} differs"


def interrupt(fault: str, out: Path) -> dict:
    """Start a 2-rank run of 3 epochs, send ``fault`` to rank 1 once the first checkpoint is
    written, check that rank 0 stops on its own with one line, and return the checkpoint."""
    procs = start_ranks([*ODC_TWO, "--epochs", "3", "--dist-timeout", str(TIMEOUT), "--out", str(out)])
    wait_for(out / "checkpoint.pt", procs)
    procs[1].send_signal(getattr(signal, fault))
    try:
        _, err = procs[0].communicate(timeout=GUARD)  # without --dist-timeout a hung rank held it 30 min
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 1, err[-4000:]
    assert "Traceback" not in err and "rank 0 of 2 lost the other processes" in err.strip().splitlines()[-1], err[-4000:]
    state = load(out / "checkpoint.pt")  # intact: written atomically by rank 0
    assert 1 <= state["epoch"] < 3 and len(state["rng"]) == 2
    assert records(out)[-1]["epoch"] == state["epoch"]  # the last complete epoch
    return state


@pytest.mark.slow
def test_a_killed_rank_stops_the_survivor_and_the_run_resumes_bit_exactly(tmp_path: Path) -> None:
    interrupt("SIGKILL", tmp_path / "run")
    run_ranks([*ODC_TWO, "--epochs", "3", "--resume", str(tmp_path / "run" / "checkpoint.pt")])
    run_ranks([*ODC_TWO, "--epochs", "3", "--out", str(tmp_path / "straight")])
    assert_same_state(load(tmp_path / "straight" / "checkpoint.pt"), load(tmp_path / "run" / "checkpoint.pt"))
    assert records(tmp_path / "straight")[-1]["fingerprint"] == records(tmp_path / "run")[-1]["fingerprint"]
    assert [r["epoch"] for r in records(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.slow
def test_a_hung_rank_stops_the_survivor_after_the_dist_timeout(tmp_path: Path) -> None:
    interrupt("SIGSTOP", tmp_path)


@pytest.mark.slow
def test_resume_under_another_world_size_continues(tmp_path: Path) -> None:
    run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "3", "--stop-after", "1", "--out", str(tmp_path)])
    ckpt = str(tmp_path / "checkpoint.pt")
    results = run_ranks([*ODC_TINY, "--epochs", "3", "--stop-after", "2", "--resume", ckpt])
    assert "written by 1 process(es), this run has 2" in results[0][1]
    prints = [line.split()[-1] for _, out, _ in results for line in out.splitlines() if "memory fingerprint" in line]
    assert len(prints) == 2 and set(prints) == {records(tmp_path)[-1]["fingerprint"]}  # both ranks' memories agree
    state = load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 2 and len(state["rng"]) == 2
    text = run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "3", "--resume", ckpt])  # and back to one
    assert "written by 2 process(es), this run has 1" in text
    assert [r["epoch"] for r in records(tmp_path)] == [1, 2, 3]
