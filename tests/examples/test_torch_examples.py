"""The PyTorch training examples run end to end on a tiny subset of the demo data.

Single-process runs call the scripts' ``main(argv)`` in this process (no interpreter and torch
start-up per run); the 2-process run goes through ``torch.distributed.run`` with gloo, under a
timeout that kills the whole process group.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from example_runs import check_evaluation, final_line, records, run_main, script
from example_runs import torch_checkpoint as load

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TINY = ["--subset", "16", "--resolution", "16", "--width", "8", "--batch-size", "8", "--no-progress"]
ODC_TINY = [*TINY, "--clusters", "2", "--min-cluster-size", "4"]






@pytest.fixture(scope="module")
def odc_straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two ODC epochs in one go (the smoke run, and the reference for the resume test)."""
    out = tmp_path_factory.mktemp("odc_straight")
    return out, run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "2", "--out", str(out)])




def test_odc_smoke_writes_metrics_plot_and_checkpoint(odc_straight: tuple[Path, str]) -> None:
    out, text = odc_straight
    rows = records(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("loss", "change_ratio", "cluster_size_min", "cluster_size_max", "nmi", "acc", "images_per_s", "fingerprint"):
        assert key in rows[-1], key
    assert 0 <= rows[-1]["nmi"] <= 1 and rows[-1]["images_per_s"] > 0
    assert (out / "summary.png").stat().st_size > 0
    assert not list(out.glob("*.tmp"))  # atomic writes leave no temporary file behind
    line = final_line(text)
    assert line.startswith("final ODC") and "memory labels NMI" in line
    state = load(out / "checkpoint.pt")
    assert set(state) >= {"model", "optimizer", "scheduler", "odc", "epoch", "rng", "args"} and state["epoch"] == 2
    assert "feat_nmi" not in rows[0]  # the demo evaluates every 5 epochs and at the end only
    check_evaluation(out, text, state["odc"]["labels"].numpy(), 2)


def test_odc_label_warmup_keeps_the_initial_clustering(tmp_path: Path) -> None:
    """The first epoch (``--label-warmup 1``, the default) trains on the initial k-means labels
    without re-labelling, then recomputes every centroid as the mean of its members' updated
    memory features."""
    text = run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "2", "--stop-after", "1", "--out", str(tmp_path)])
    (initial,) = [line for line in text.splitlines() if line.startswith("initial k-means")]
    (first,) = records(tmp_path)
    assert first["change_ratio"] == 0.0
    assert initial.endswith(f"NMI {first['nmi']:.3f}  ACC {first['acc']:.3f}"), (initial, first)
    odc = load(tmp_path / "checkpoint.pt")["odc"]
    feats, labels = odc["features"].double(), odc["labels"]
    means = torch.stack([feats[labels == c].mean(0) for c in range(2)])
    # a mean of at most 16 float32 unit vectors: rounding well below 1e-5
    assert torch.allclose(odc["centroids"].double(), means, rtol=0, atol=1e-5)
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(feats), dtype=torch.float64), atol=1e-5)


def test_odc_eval_only_reproduces_the_final_evaluation(odc_straight: tuple[Path, str]) -> None:
    out, _ = odc_straight
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    text = run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "2", "--eval-only", str(out / "checkpoint.pt")])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # writes nothing
    (evaluated,) = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("evaluation {")]
    final = records(out)[-1]
    assert evaluated["epoch"] == 2
    for key in (*script("runs").EVAL_KEYS, "nmi", "acc"):
        assert evaluated[key] == final[key], key
    assert "baselines read from" in text and "random net: kNN@20" in final_line(text)


def test_odc_resume_is_bit_exact(odc_straight: tuple[Path, str], tmp_path: Path) -> None:
    straight, _ = odc_straight
    run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "2", "--stop-after", "1", "--out", str(tmp_path)])
    assert [r["epoch"] for r in records(tmp_path)] == [1]
    assert "feat_nmi" in records(tmp_path)[0]  # the last epoch of a run is evaluated
    # the baselines are computed once per run: a resume reads them (here a marked copy)
    baselines = json.loads((tmp_path / "baselines.json").read_text())
    baselines["random_net"]["knn_top1@20"] = 0.123
    (tmp_path / "baselines.json").write_text(json.dumps(baselines))
    text = run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "2", "--resume", str(tmp_path / "checkpoint.pt")])
    assert "random net: kNN@20 0.123" in final_line(text)
    assert json.loads((tmp_path / "baselines.json").read_text()) == baselines
    a, b = load(straight / "checkpoint.pt"), load(tmp_path / "checkpoint.pt")
    assert b["epoch"] == 2
    for part in ("model", "odc"):
        for key, value in a[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[part][key]), f"{part}.{key} differs after resuming"
            else:
                assert value == b[part][key], f"{part}.{key} differs after resuming"
    assert records(straight)[-1]["fingerprint"] == records(tmp_path)[-1]["fingerprint"]


def test_a_resume_without_baselines_recomputes_them_from_the_random_init(tmp_path: Path) -> None:
    """The checkpoint is restored before the baselines are computed: they must still come from
    the random initialisation, not from the trained weights just loaded."""
    run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "2", "--stop-after", "1", "--out", str(tmp_path)])
    first = json.loads((tmp_path / "baselines.json").read_text())
    (tmp_path / "baselines.json").unlink()
    run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "2", "--resume", str(tmp_path / "checkpoint.pt")])
    assert json.loads((tmp_path / "baselines.json").read_text()) == first


def test_resume_with_other_settings_is_refused(odc_straight: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    out, _ = odc_straight
    argv = [*ODC_TINY, "--clusters", "3", "--epochs", "3", "--resume", str(out / "checkpoint.pt")]
    with pytest.raises(SystemExit) as exc:
        script("imagenet_odc_torch").main(argv)
    assert exc.value.code == 2
    assert "--clusters 2" in capsys.readouterr().err


def test_deepcluster_smoke(tmp_path: Path) -> None:
    text = run_main("imagenet_deepcluster_torch", [*TINY, "--clusters", "4", "--epochs", "1", "--out", str(tmp_path)])
    (row,) = records(tmp_path)
    assert {"loss", "nmi", "acc", "cluster_size_min", "cluster_size_max", "images_per_s"} <= set(row)
    assert row["cluster_size_min"] >= 1  # k-means never returns an empty cluster
    assert final_line(text).startswith("final DeepCluster") and (tmp_path / "summary.png").exists()
    state = load(tmp_path / "checkpoint.pt")
    assert state["labeler"]["epoch"] == 1
    check_evaluation(tmp_path, text, state["labeler"]["previous_labels"].numpy(), 4)


def test_selfclassifier_smoke(tmp_path: Path) -> None:
    argv = [*TINY, "--batch-size", "16", "--classes", "4,8", "--hidden-dim", "32", "--local-crops", "1",
            "--epochs", "1", "--out", str(tmp_path)]
    text = run_main("imagenet_selfclassifier_torch", argv)
    (row,) = records(tmp_path)
    assert {"loss", "nmi", "acc", "cluster_size_min", "cluster_size_max", "images_per_s"} <= set(row)
    assert np.isfinite(row["loss"])
    assert final_line(text).startswith("final Self-Classifier") and (tmp_path / "summary.png").exists()
    assert load(tmp_path / "checkpoint.pt")["epoch"] == 1
    rows = (tmp_path / "assignments.csv").read_text().splitlines()[1:]
    labels = np.array([int(r.split(",")[2]) for r in rows])
    sizes = np.bincount(labels, minlength=4)  # the first head's argmax, which the record's sizes count
    assert (sizes.min(), sizes.max()) == (row["cluster_size_min"], row["cluster_size_max"])
    check_evaluation(tmp_path, text, labels, 4)


@pytest.mark.slow
def test_odc_two_gloo_processes_keep_identical_memories(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(EXAMPLES / "imagenet_odc_torch.py"), *ODC_TINY, "--epochs", "2", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the 2-process run did not finish in 240 s")
    assert proc.returncode == 0, log[-4000:]
    prints = {line.split()[1].rstrip(":"): line.split()[-1] for line in log.splitlines() if "ODC memory fingerprint" in line}
    assert set(prints) == {"0", "1"}, log[-4000:]
    assert prints["0"] == prints["1"] == records(tmp_path)[-1]["fingerprint"]
    assert "1 process(es)" not in log and "2 process(es)" in log
    # rank 0 evaluated the gathered features (every image once) while rank 1 went on, without a hang
    state = load(tmp_path / "checkpoint.pt")["odc"]
    # epoch 1 was the label warm-up (features of the gathered batch), epoch 2 ODC's steps on the
    # global batch of 8 (4 per rank): 2 of them, the counter restarted by the warm-up's re-fill
    assert int(state["iteration"]) == 2
    check_evaluation(tmp_path, log, state["labels"].numpy(), 2)


@pytest.mark.slow
def test_odc_sharded_memory_on_two_processes_resumes_on_one(tmp_path: Path) -> None:
    """--shard-memory under torchrun: the replicated parts agree on both ranks, the memory is
    checkpointed by torch.distributed.checkpoint (only the latest epoch's directory is kept),
    and one process resumes the two processes' run (the rows re-cut for one rank)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(EXAMPLES / "imagenet_odc_torch.py"), *ODC_TINY, "--epochs", "3", "--stop-after", "2", "--shard-memory",
           "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    prints = {line.split()[1].rstrip(":"): line.split()[-1] for line in done.stdout.splitlines() if "ODC memory fingerprint" in line}
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"] == records(tmp_path)[-1]["fingerprint"]
    entry = load(tmp_path / "checkpoint.pt")["odc"]
    assert Path(entry["directory"]) == (tmp_path / "odc-memory-2").resolve()
    assert (tmp_path / "odc-memory-2" / ".metadata").is_file() and not (tmp_path / "odc-memory-1").exists()
    text = run_main("imagenet_odc_torch", [*ODC_TINY, "--epochs", "3", "--shard-memory",
                                           "--resume", str(tmp_path / "checkpoint.pt")])
    assert [r["epoch"] for r in records(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "odc-memory-3" / ".metadata").is_file() and not (tmp_path / "odc-memory-2").exists()
    check_evaluation(tmp_path, text, np.loadtxt(tmp_path / "assignments.csv", delimiter=",", skiprows=1,
                                                usecols=2, dtype=np.int64), 2)


BAD_INPUT = [
    ("imagenet_odc_torch", ["--data", "/nonexistent/imagenet"], "is not a directory"),
    ("imagenet_odc_torch", ["--data", "{empty}"], "holds no images"),
    ("imagenet_odc_torch", ["--clusters", "1000"], "fewer than"),
    ("imagenet_odc_torch", ["--epochs", "0"], "must be a positive integer"),
    ("imagenet_odc_torch", ["--batch-size", "-4"], "must be a positive integer"),
    ("imagenet_odc_torch", ["--dist-timeout", "0"], "must be a positive number"),
    ("imagenet_odc_torch", ["--subset", "5000"], "exceeds the 1797 images"),
    ("imagenet_odc_torch", ["--subset", "32", "--clusters", "2", "--min-cluster-size", "4", "--batch-size", "64"], "exceeds the 32 images"),
    ("imagenet_deepcluster_torch", ["--clusters", "2000"], "fewer than the 2000"),
    ("imagenet_deepcluster_torch", ["--resolution", "0"], "must be a positive integer"),
    ("imagenet_selfclassifier_torch", ["--classes", "1,4"], "at least 2 classes"),
    ("imagenet_selfclassifier_torch", ["--classes", "10,x"], "comma-separated positive integers"),
    ("imagenet_selfclassifier_torch", ["--resume", "/nonexistent/checkpoint.pt"], "no checkpoint file"),
    ("imagenet_deepcluster_torch", ["--eval-only", "/nonexistent/checkpoint.pt"], "--eval-only: no checkpoint file"),
    ("imagenet_odc_torch", ["--eval-only", "a.pt", "--resume", "b.pt"], "do not pass --resume"),
    ("imagenet_odc_torch", ["--eval-every", "-1"], "must be a non-negative integer"),
]


@pytest.mark.parametrize(("name", "argv", "message"), BAD_INPUT, ids=[" ".join(c[1]) for c in BAD_INPUT])
def test_bad_input_is_a_one_line_error(name: str, argv: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    with pytest.raises(SystemExit) as exc:
        script(name).main([*argv, "--no-progress", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "run").exists()


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    common = script("common")
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.normal()  # leave cached Gaussians in both
    path = tmp_path / "rng.pt"
    common.save_checkpoint(path, {"rng": common.rng_state()})
    want = (random.random(), random.gauss(0, 1), np.random.normal(), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    common.set_rng_state(load(path)["rng"])
    assert (random.random(), random.gauss(0, 1), np.random.normal(), float(torch.rand(()))) == want
    assert [p.name for p in tmp_path.iterdir()] == ["rng.pt"]


@pytest.mark.parametrize("width", [64, 16])
def test_small_input_stem_keeps_the_resolution(width: int) -> None:
    common = script("common")
    assert common.small_input(32) and not common.small_input(64) and not common.small_input(224)
    x = torch.randn(2, 3, 16, 16)
    for small, stem_out in ((True, 16), (False, 4)):  # ImageNet stem: 7×7/2 conv and 3×3/2 max-pool
        net, features = common.backbone("resnet18", small_input=small, width=width)
        stem = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        assert stem.shape == (2, width, stem_out, stem_out)
        assert net.layer1(stem).shape[-1] == stem_out  # the first block sees the full 16×16 with the small stem
        assert net(x).shape == (2, features) and features == 8 * width
    big, features = common.backbone("resnet50", width=width)
    assert features == 32 * width and big(torch.randn(1, 3, 64, 64)).shape == (1, features)


def test_evaluation_leaves_the_training_random_streams_alone(tmp_path: Path) -> None:
    """Evaluating between epochs must not shift what the training draws next (a ``DataLoader``
    takes a seed from torch's stream each time it is iterated)."""
    import argparse

    common = script("common")
    data = script("runs").demo_digits(16).subset(16)
    loader = torch.utils.data.DataLoader(common.IndexedImages(data, common.eval_transform(16)), 8)
    ctx = common.DistContext(0, 1, torch.device("cpu"))
    args = argparse.Namespace(seed=0, progress=False, resolution=16)
    evaluation = common.Evaluation(tmp_path, data, args, ctx, loader, write=False)
    backbone, _ = common.backbone("resnet18", small_input=True, width=4)

    def draws() -> tuple:
        return float(torch.rand(())), float(np.random.rand()), random.random()

    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    want = draws()
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    scores = evaluation(backbone)
    assert draws() == want
    assert set(scores) == set(script("runs").EVAL_KEYS)
    assert not list(tmp_path.iterdir())  # write=False: no split or baselines file
