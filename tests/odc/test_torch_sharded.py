"""The torch adapter's sharded ODC memory in real gloo groups (ranks in tests/sharded_checks.py).

A 2-rank run steps through a churning stream (labels change, clusters fall below the
threshold and are split, one rank passes a NaN batch) comparing every rank with the
replicated reference after every step, and checkpoints half way with
torch.distributed.checkpoint; 1 and 3 ranks resume from that checkpoint and must continue
exactly as the reference does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

SCRIPT = Path(__file__).parents[1] / "sharded_checks.py"


def launch(world: int, mode: str, ckpt: Path, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    init = out / "init"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen([sys.executable, str(SCRIPT), str(r), str(world), str(init), str(out), mode, str(ckpt)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for r in range(world)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    seen = []
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} of {world} ({mode}) failed:\n{log[-4000:]}"
        seen.append(json.loads((out / f"rank{r}.json").read_text()))
    return seen


@pytest.mark.slow
def test_sharded_memory_equals_replicated_and_resumes_on_other_world_sizes(tmp_path):
    ckpt = tmp_path / "ckpt"
    ranks = launch(2, "run", ckpt, tmp_path / "run2")
    assert all(r.get("ok") for r in ranks)
    assert all(r["errors"] == ["ValueError"] for r in ranks)  # every rank raised for rank 1's NaN
    assert ranks[0]["changed"] > 0 and ranks[0]["splits"] > 0  # the stream moved labels and split clusters
    assert (ckpt / ".metadata").is_file()
    for world in (1, 3):
        copy = tmp_path / f"ckpt{world}"
        shutil.copytree(ckpt, copy)
        resumed = launch(world, "resume", copy, tmp_path / f"resume{world}")
        assert all(r.get("ok") for r in resumed), resumed
