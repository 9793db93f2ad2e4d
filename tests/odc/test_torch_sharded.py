"""The torch adapter's sharded ODC memory in real gloo groups (ranks in tests/sharded_checks.py).

A 2-rank run steps through a churning stream (one rank passes a NaN batch) comparing every
rank with the replicated reference after every step, checkpoints half way with
torch.distributed.checkpoint, and loses a rank two steps later; 1 and 3 ranks resume from
that checkpoint (labels change, clusters fall below the threshold and are split) and must
continue exactly as the reference does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

SCRIPT = Path(__file__).parents[1] / "sharded_checks.py"


def launch(world: int, mode: str, ckpt: Path, out: Path, *, check: bool = True) -> list[dict]:
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
        if check:
            assert p.returncode == 0, f"rank {r} of {world} ({mode}) failed:\n{log[-4000:]}"
        elif p.returncode == 0:
            raise AssertionError(f"rank {r} of {world} ({mode}) finished although a rank died")
        if not (out / f"rank{r}.json").exists():
            continue
        seen.append(json.loads((out / f"rank{r}.json").read_text()))
    return seen


@pytest.mark.slow
def test_a_rank_killed_mid_run_leaves_a_checkpoint_that_one_and_three_ranks_resume_exactly(tmp_path):
    ckpt = tmp_path / "ckpt"
    crashed = launch(2, "crash", ckpt, tmp_path / "crash", check=False)
    assert len(crashed) == 1 and not crashed[0].get("ok")  # the killed rank wrote nothing, the survivor failed
    assert crashed[0]["errors"] == ["ValueError"]  # rank 0 raised for rank 1's NaN batch, as rank 1 did
    assert (ckpt / ".metadata").is_file()
    for world in (1, 3):
        copy = tmp_path / f"ckpt{world}"
        shutil.copytree(ckpt, copy)
        resumed = launch(world, "resume", copy, tmp_path / f"resume{world}")
        assert len(resumed) == world and all(r.get("ok") for r in resumed), resumed
        assert resumed[0]["changed"] > 0 and resumed[0]["splits"] > 0  # labels moved and clusters split


@pytest.mark.slow
def test_deepcluster_over_two_ranks_finds_planted_clusters_with_labels_left_on_the_ranks(tmp_path):
    from clusterlearn import metrics

    ranks = launch(2, "deepcluster", tmp_path / "unused", tmp_path / "dc")
    assert all(r.get("ok") for r in ranks), ranks
    truth = np.concatenate([r["truth"] for r in ranks])
    first = np.concatenate([r["first"] for r in ranks])
    second = np.concatenate([r["second"] for r in ranks])
    assert [len(r["first"]) for r in ranks] == [r["rows"][1] - r["rows"][0] for r in ranks]  # labels stay sharded
    assert metrics.nmi(truth, first) > 0.99
    for r in ranks:
        assert r["nmi"] == pytest.approx(metrics.nmi(first, second), abs=1e-12)
        assert all(r["rows"][0] <= i < r["rows"][1] for i in r["draws"]) and len(r["draws"]) == 60
