"""The PyTorch examples under faults: a rank that dies or hangs, a resume under another world
size, bad checkpoints, a torn ``metrics.jsonl`` and bad files in ``--data``.

The two-process runs start each rank as its own process (``env://`` rendezvous, gloo, one
OpenMP thread) rather than through torchrun, whose agent would stop the survivor itself: here
the survivor must notice on its own, through ``--dist-timeout``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from example_runs import records, run_main, script, snapshot
from example_runs import torch_checkpoint as load

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
ODC_TINY = ["--subset", "16", "--resolution", "16", "--width", "8", "--batch-size", "8", "--no-progress",
            "--clusters", "2", "--min-cluster-size", "4"]

#: 8 steps per epoch on each of 2 ranks: a kill right after a checkpoint lands mid-epoch.
ODC_TWO = ["--subset", "64", "--resolution", "16", "--width", "8", "--batch-size", "8", "--no-progress",
           "--clusters", "2", "--min-cluster-size", "4"]
TIMEOUT = 10  # --dist-timeout of the fault tests, seconds
GUARD = 240  # a hang guard only: well above start-up + TIMEOUT on a busy 2-core machine


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


# ---------------------------------------------------------------------------- bad checkpoints
@pytest.fixture(scope="module")
def odc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished ODC epoch of a 2-epoch run: a valid checkpoint to break."""
    out = tmp_path_factory.mktemp("odc_run")
    run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "2", "--stop-after", "1", "--out", str(out)])
    return out


def _set(key: str, value: object):
    return lambda s: {**s, key: value}


def _drop(key: str):
    return lambda s: {k: v for k, v in s.items() if k != key}


BAD_CHECKPOINTS = [
    ("empty file", None, [], "cannot load"),
    ("bare tensor", lambda s: torch.zeros(3), [], "holds a Tensor, not a dictionary"),
    ("no args", _drop("args"), [], "no args entry"),
    ("args not a dict", _set("args", [1, 2]), [], "args entry is a list"),
    ("no rng", _drop("rng"), [], "no rng entry"),
    ("no odc", _drop("odc"), [], "no odc entry"),
    ("odc not a dict", _set("odc", torch.zeros(2)), [], "odc entry is a Tensor"),
    ("rng entry broken", _set("rng", [{"python": torch.zeros(3)}]), [], "rng entry has no valid"),
    ("epoch not an int", _set("epoch", 1.5), [], "epoch entry is a float"),
    ("negative epoch", _set("epoch", -5), [], "epoch entry is -5"),
    ("finished run", None, ["--epochs", "1"], "nothing to train"),
    ("stop-after not after it", None, ["--stop-after", "1"], "--stop-after 1 is not after"),
    ("model does not fit", _set("model", {"x": torch.zeros(1)}), [], "model state does not fit"),
    ("odc does not fit", lambda s: {**s, "odc": {**s["odc"], "labels": s["odc"]["labels"][:3]}}, [], "odc state does not fit"),
]


@pytest.mark.parametrize(("change", "argv", "message"), [c[1:] for c in BAD_CHECKPOINTS], ids=[c[0] for c in BAD_CHECKPOINTS])
def test_a_bad_checkpoint_is_a_one_line_error(odc_run: Path, change, argv: list[str], message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """Resumed in place (no ``--out``) next to a torn metrics line: the refusal touches no file of the run."""
    run = tmp_path / "run"
    shutil.copytree(odc_run, run)
    path = run / "checkpoint.pt"
    if change is None and not argv:
        path.write_bytes(b"")
    else:
        state = load(odc_run / "checkpoint.pt")
        torch.save(state if change is None else change(state), path)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "lo')  # what a run killed mid-write leaves, which a resume would repair
    before = snapshot(run)
    with pytest.raises(SystemExit) as exc:
        script("imagenet_odc_torch").main([*ODC_TINY, "--epochs", "2", *argv, "--resume", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err  # one line: no usage, no warning
    assert snapshot(run) == before


def test_a_torn_metrics_line_is_dropped_on_resume(odc_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (tmp_path / name).write_bytes((odc_run / name).read_bytes())
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 2, "loss": 0.6')  # a run killed while writing epoch 2's record
    run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "2", "--resume", str(tmp_path / "checkpoint.pt")])
    assert "dropped 1 incomplete" in capsys.readouterr().err
    assert [r["epoch"] for r in records(tmp_path)] == [1, 2]


def test_metrics_log_keeps_complete_records_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = script("runs")
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n[1]\n{"epoch": 2}\n{"epoch": 3, "lo')
    log = runs.MetricsLog(tmp_path, True, resumed=True)
    assert "dropped 2" in capsys.readouterr().err
    log.write({"epoch": 3})
    assert log.read() == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    runs.MetricsLog(tmp_path, True, resumed=True)
    assert capsys.readouterr().err == ""  # nothing more to drop


# ---------------------------------------------------------------------------- --data
def _image_folder(root: Path, per_class: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


DATA_ARGS = ["--resolution", "16", "--batch-size", "8", "--arch", "resnet18", "--width", "8", "--clusters", "2",
             "--min-cluster-size", "4", "--epochs", "1", "--no-progress"]


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # 1: a DataLoader process
@pytest.mark.parametrize("bad", ["not an image", "truncated"])
def test_an_unreadable_image_is_named_in_one_line(bad: str, workers: int, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    data = _image_folder(tmp_path / "data")
    path = data / "b" / "bad.png"
    good = (data / "b" / "0.png").read_bytes()
    path.write_bytes(b"no image here" if bad == "not an image" else good[: len(good) // 2])
    with pytest.raises(SystemExit) as exc:
        script("imagenet_odc_torch").main([*DATA_ARGS, "--data", str(data), "--workers", str(workers),
                                           "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"--data: cannot read image {path}: " in err, err


def _peer_error(monkeypatch: pytest.MonkeyPatch, errors: list[BaseException | None]) -> BaseException:
    """What rank 0 of ``len(errors)`` raises from ``agree`` when rank ``r``'s local phase raised
    ``errors[r]`` (the header exchange simulated: each rank's payload as ``agree`` encodes it)."""
    from clusterlearn.adapters import _torch_distributed as td

    payloads: list[bytes] = []
    monkeypatch.setattr(td, "_active", lambda group=None: True)
    monkeypatch.setattr(td, "_exchange_bytes", lambda payload, group: payloads.append(payload) or [payload])
    for error in errors[1:]:  # record the peers' payloads
        with contextlib.suppress(Exception):
            td.agree([1], error, what="extract_features", names=["n"])
    monkeypatch.setattr(td, "_exchange_bytes", lambda payload, group: [payload, *payloads])
    with pytest.raises(Exception) as caught:
        td.agree([1], errors[0], what="extract_features", names=["n"])
    return caught.value


@pytest.mark.parametrize("peers", [["image"], ["image", "image"], ["os"]], ids=["one", "two", "other-error"])
def test_a_peers_unreadable_image_is_the_same_one_line_error(peers: list[str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Under DDP the healthy ranks learn of a peer's unreadable image from a collective's header
    exchange; they stop with the same ``--data`` line as the rank that read it (with a
    non-image error of a peer, its error is raised as it is)."""
    runs, common = script("runs"), script("common")
    path = tmp_path / "b" / "bad (1).png"
    own = runs.ImageError(f"{runs.IMAGE_ERROR}{path}: UnidentifiedImageError: cannot identify image file (x)")
    errors = [None] + [own if p == "image" else OSError("disk (y) gone; rank 3: z") for p in peers]
    peer = _peer_error(monkeypatch, errors)
    parser, args = script("imagenet_odc_torch").parse_args([*ODC_TINY])

    def run(*_):
        raise peer

    if peers == ["os"]:
        with pytest.raises(type(peer)):
            common.launch(parser, args, 1, run)
        return
    with pytest.raises(SystemExit) as exc:
        common.launch(parser, args, 1, run)
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"{parser.prog}: error: --data: {own}"]


def test_a_symlink_loop_in_the_data_lists_each_image_once(tmp_path: Path) -> None:
    runs = script("runs")
    data = _image_folder(tmp_path / "data")
    (data / "a" / "loop").symlink_to(data / "a", target_is_directory=True)
    (data / "b" / "deeper").mkdir()
    (data / "b" / "deeper" / "up").symlink_to(data / "b", target_is_directory=True)
    (data / "b" / "linked.png").symlink_to(data / "a" / "0.png")  # a file link is followed
    paths, targets, classes = runs.list_image_folder(data)
    assert classes == ["a", "b"] and len(paths) == 17 and np.bincount(targets).tolist() == [8, 9]
    assert len({os.path.realpath(p) for p in paths}) == 16
