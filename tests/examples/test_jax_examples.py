"""The JAX training examples run end to end on a tiny subset of the demo data.

JAX compile time dominates these tests, so the training runs go through two subprocesses
started together: one on 1 CPU device (ODC for 2 epochs straight, the same run stopped after
epoch 1 and resumed, and Self-Classifier for 1 epoch, all in one interpreter so that compiled
steps are reused) and one on 2 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``,
ODC and Self-Classifier for a few iterations). Both compile with
``--xla_backend_optimization_level=0`` (the same programs, compiled several times faster).
Bad command lines are checked in this process: they stop before anything is compiled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from example_runs import npz_checkpoint as checkpoint
from example_runs import assert_resumed_exactly, final_line, finish, records, script, snapshot, start_jax_runs

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TINY = ["--subset", "16", "--resolution", "16", "--width", "4", "--batch-size", "8", "--no-progress"]
ODC_TINY = [*TINY, "--clusters", "2", "--min-cluster-size", "4"]
SC_TINY = [*TINY, "--batch-size", "16", "--classes", "4,8", "--hidden-dim", "32", "--local-crops", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """Every training run of this file, the 1- and 2-device subprocesses side by side.

    Returns ``{run: (run directory, its stdout)}``.
    """
    base = tmp_path_factory.mktemp("jax_examples")
    d = {name: base / name for name in ("odc", "odc_resumed", "sc", "odc_2dev", "sc_2dev", "odc_warm_2dev")}
    one = [
        ("imagenet_odc_jax", [*ODC_TINY, "--epochs", "2", "--out", str(d["odc"])]),
        ("imagenet_odc_jax", [*ODC_TINY, "--epochs", "2", "--stop-after", "1", "--out", str(d["odc_resumed"])]),
        ("imagenet_odc_jax", [*ODC_TINY, "--epochs", "2", "--resume", str(d["odc_resumed"] / "checkpoint.npz")]),
        ("imagenet_selfclassifier_jax", [*SC_TINY, "--epochs", "1", "--out", str(d["sc"])]),
        ("imagenet_odc_jax", [*ODC_TINY, "--epochs", "2", "--eval-only", str(d["odc"] / "checkpoint.npz")]),
    ]
    two = [
        ("imagenet_odc_jax", [*ODC_TINY, "--epochs", "1", "--label-warmup", "0", "--out", str(d["odc_2dev"])]),
        ("imagenet_selfclassifier_jax", [*SC_TINY, "--epochs", "1", "--out", str(d["sc_2dev"])]),
        ("imagenet_odc_jax", [*ODC_TINY, "--epochs", "1", "--out", str(d["odc_warm_2dev"])]),
    ]
    logs = [base / f"{i}.txt" for i in range(len(one) + len(two))]
    procs = [start_jax_runs([(n, a, log) for (n, a), log in zip(one, logs)], 1),
             start_jax_runs([(n, a, log) for (n, a), log in zip(two, logs[len(one):])], 2)]
    for proc in procs:
        finish(proc, 300)
    text = [log.read_text() for log in logs]
    return {"odc": (d["odc"], text[0]), "odc_stopped": (d["odc_resumed"], text[1]),
            "odc_resumed": (d["odc_resumed"], text[2]), "sc": (d["sc"], text[3]),
            "odc_eval_only": (d["odc"], text[4]), "odc_2dev": (d["odc_2dev"], text[5]), "sc_2dev": (d["sc_2dev"], text[6]),
            "odc_warm_2dev": (d["odc_warm_2dev"], text[7])}


def check_evaluation(out: Path, text: str, labels: np.ndarray, num_clusters: int) -> None:
    """Scores in range in the final record, the baselines in the final line, one assignment per image."""
    runs = script("runs")
    final = records(out)[-1]
    for key in runs.EVAL_KEYS:
        assert final[key] is not None and (-1 if key == "feat_ari" else 0) <= final[key] <= 1, key
    assert (out / "split.npz").exists()
    baselines = json.loads((out / "baselines.json").read_text())
    line = final_line(text)
    for name, shown in (("random_net", "random net"), ("pixels", "pixels")):
        b = baselines[name]
        assert f"{shown}: kNN@20 {b['knn_top1@20']:.3f}  probe {b['linear_top1']:.3f}  NMI {b['feat_nmi']:.3f}" in line, line
    rows = (out / "assignments.csv").read_text().splitlines()
    assert rows[0] == "index,path_or_id,cluster" and len(rows) == 17
    clusters = np.array([int(row.split(",")[2]) for row in rows[1:]])
    assert np.array_equal(clusters, labels) and 0 <= labels.min() and labels.max() < num_clusters


# ---------------------------------------------------------------------------- model
@pytest.mark.parametrize(("arch", "want"), [("resnet50", 25_557_032), ("resnet18", 11_689_512)])
def test_resnet_has_torchvision_parameter_count(arch: str, want: int) -> None:
    from flax import nnx

    fr = script("flax_resnet")
    model = nnx.eval_shape(lambda: getattr(fr, arch)(rngs=nnx.Rngs(0), num_classes=1000))  # shapes only
    assert fr.count_params(model) == want


def uniform_variance_error(w: np.ndarray, bound: float) -> float:
    """How many standard errors the mean square of ``w`` is from that of U(-bound, bound), bound²/3
    (the mean of n squares has relative standard deviation √(4/5)/√n: Var w² = 4·bound⁴/45)."""
    return abs(np.mean(np.square(w, dtype=np.float64)) / (bound**2 / 3) - 1) / (np.sqrt(0.8) / np.sqrt(w.size))


def test_linear_layers_start_as_torch_nn_linear() -> None:
    from flax import nnx

    fr = script("flax_resnet")
    layer = fr.linear(512, 256, rngs=nnx.Rngs(0))
    kernel, bias = np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])
    bound = 1 / np.sqrt(512)  # torch: kaiming-uniform(a=√5) kernel and bias, both U(±1/√fan_in)
    assert kernel.shape == (512, 256) and np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    # 6 standard errors: flax's lecun-normal kernel (3× the mean square) and zero bias are hundreds away
    assert uniform_variance_error(kernel, bound) < 6 and uniform_variance_error(bias, bound) < 6
    assert fr.linear(512, 3, use_bias=False, rngs=nnx.Rngs(0)).bias is None


def test_odc_and_selfclassifier_necks_and_heads_use_torch_init() -> None:
    import jax

    jc = script("jax_common")
    odc = jc.init_model(script("imagenet_odc_jax").ODCNet, ("resnet18", 4, 16, 500), jax.random.key(0))[2]
    sc_net = script("imagenet_selfclassifier_jax").SelfClassifierNet
    sc = jc.init_model(sc_net, ("resnet18", 4, 16, (500,), 64, 128, 1), jax.random.key(0))[2]
    for kernel in (odc["head"]["kernel"], odc["neck"]["layers"][3]["kernel"], sc["heads"][0]["kernel"],
                   sc["projection"]["layers"][3]["kernel"]):
        bound = 1 / np.sqrt(kernel.shape[0])
        assert np.abs(kernel).max() <= bound and uniform_variance_error(np.asarray(kernel), bound) < 6


# ---------------------------------------------------------------------------- training runs
@pytest.mark.slow
def test_odc_smoke_writes_metrics_plot_and_checkpoint(trained: dict) -> None:
    out, text = trained["odc"]
    rows = records(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("loss", "change_ratio", "cluster_size_min", "cluster_size_max", "nmi", "acc", "images_per_s", "fingerprint"):
        assert key in rows[-1], key
    assert np.isfinite(rows[-1]["loss"]) and 0 <= rows[-1]["nmi"] <= 1 and rows[-1]["images_per_s"] > 0
    assert rows[-1]["cluster_size_min"] >= 4  # small-cluster handling keeps every cluster at the minimum
    assert (out / "summary.png").stat().st_size > 0
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # atomic writes leave nothing behind
    line = final_line(text)
    assert line.startswith("final ODC") and "memory labels NMI" in line
    assert "feat_nmi" not in rows[0]  # the demo evaluates every 5 epochs and at the end only
    state = checkpoint(out)
    check_evaluation(out, text, state["odc/labels"], 2)
    assert int(state["epoch"]) == 2 and json.loads(str(state["args"]))["clusters"] == 2
    for prefix in ("params/", "stats/", "opt/", "odc/", "rng/"):
        assert any(k.startswith(prefix) for k in state), prefix
    sizes, labels = state["odc/sizes"], state["odc/labels"]
    np.testing.assert_array_equal(np.bincount(labels, minlength=2), sizes)
    assert int(state["odc/iteration"]) == 1 * (16 // 8)  # the step counter restarts after the label warm-up


def test_odc_label_warmup_keeps_the_initial_clustering(trained: dict) -> None:
    """The first epoch (``--label-warmup 1``, the default) trains on the initial k-means labels
    without re-labelling, then recomputes every centroid as the mean of its members' updated
    memory features (here on two devices, the batch sharded)."""
    out, text = trained["odc_warm_2dev"]
    (initial,) = [line for line in text.splitlines() if line.startswith("initial k-means")]
    (first,) = records(out)
    assert first["change_ratio"] == 0.0
    assert initial.endswith(f"NMI {first['nmi']:.3f}  ACC {first['acc']:.3f}"), (initial, first)
    state = checkpoint(out)
    feats, labels = state["odc/features"].astype(np.float64), state["odc/labels"]
    means = np.stack([feats[labels == c].mean(0) for c in range(2)])
    # a mean of at most 16 float32 unit vectors: rounding well below 1e-5
    np.testing.assert_allclose(state["odc/centroids"], means, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_odc_resume_is_exact(trained: dict) -> None:
    straight, _ = trained["odc"]
    resumed, _ = trained["odc_resumed"]
    assert_resumed_exactly(straight, resumed, trained["odc_stopped"][1], trained["odc_resumed"][1])
    timing = {"images_per_s", "train_seconds", "seconds", "eval_seconds"}
    for x, y in zip(records(straight), records(resumed)):  # the stopped run also evaluated its last epoch, 1
        assert {k: v for k, v in x.items() if k not in timing} == {k: v for k, v in y.items() if k in x and k not in timing}
    assert "feat_nmi" in records(resumed)[0] and "feat_nmi" in records(resumed)[1]
    # the baselines are computed once per run, at its start: the resumed run reads them
    assert "baselines read from" in trained["odc_resumed"][1] and "baselines read from" not in trained["odc_stopped"][1]


@pytest.mark.slow
def test_odc_eval_only_reproduces_the_final_evaluation(trained: dict) -> None:
    out, text = trained["odc_eval_only"]
    (evaluated,) = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("evaluation {")]
    final = records(out)[-1]
    assert evaluated["epoch"] == 2 and len(records(out)) == 2  # nothing appended to metrics.jsonl
    for key in (*script("runs").EVAL_KEYS, "nmi", "acc"):
        assert evaluated[key] == final[key], key
    assert "baselines read from" in text and final_line(text).startswith("final ODC")


@pytest.mark.slow
def test_selfclassifier_smoke(trained: dict) -> None:
    out, text = trained["sc"]
    (row,) = records(out)
    assert {"loss", "nmi", "acc", "cluster_size_min", "cluster_size_max", "images_per_s", "lr"} <= set(row)
    assert np.isfinite(row["loss"]) and 0 < row["loss"] < -np.log(1e-12)
    assert final_line(text).startswith("final Self-Classifier") and (out / "summary.png").exists()
    state = checkpoint(out)
    assert int(state["epoch"]) == 1 and any(k.startswith("opt/") for k in state)
    rows = (out / "assignments.csv").read_text().splitlines()[1:]
    labels = np.array([int(r.split(",")[2]) for r in rows])
    sizes = np.bincount(labels, minlength=4)  # the first head's argmax, which the record's sizes count
    assert (sizes.min(), sizes.max()) == (row["cluster_size_min"], row["cluster_size_max"])
    check_evaluation(out, text, labels, 4)


@pytest.mark.slow
def test_two_devices_keep_identical_memories(trained: dict) -> None:
    out, text = trained["odc_2dev"]
    assert "2 device(s)" in text
    prints = {line.split()[1].rstrip(":"): line.split()[-1] for line in text.splitlines() if "ODC memory fingerprint" in line}
    assert set(prints) == {"cpu:0", "cpu:1"}, text
    assert prints["cpu:0"] == prints["cpu:1"] == records(out)[-1]["fingerprint"]
    # the memory saw the global batch of 8 (4 per device) in each of the 2 iterations
    assert int(checkpoint(out)["odc/iteration"]) == 2
    sc_out, sc_text = trained["sc_2dev"]
    assert "2 device(s)" in sc_text and np.isfinite(records(sc_out)[-1]["loss"])
    # the same data and seeds on one device: the first iteration's loss sees the same global batch
    one = records(trained["sc"][0])[-1]["loss"]
    assert records(sc_out)[-1]["loss"] == pytest.approx(one, rel=1e-3)


# ---------------------------------------------------------------------------- bad input
BAD_INPUT = [
    ("imagenet_odc_jax", ["--data", "/nonexistent/imagenet"], "is not a directory"),
    ("imagenet_odc_jax", ["--data", "{empty}"], "holds no images"),
    ("imagenet_odc_jax", ["--data", "{no_images}"], "holds no images"),
    ("imagenet_odc_jax", ["--clusters", "1000"], "fewer than"),
    ("imagenet_odc_jax", ["--epochs", "0"], "must be a positive integer"),
    ("imagenet_odc_jax", ["--batch-size", "-4"], "must be a positive integer"),
    ("imagenet_odc_jax", ["--width", "0"], "must be a positive integer"),
    ("imagenet_odc_jax", ["--subset", "5000"], "exceeds the 1797 images"),
    ("imagenet_odc_jax", ["--subset", "32", "--clusters", "2", "--min-cluster-size", "4", "--batch-size", "64"], "exceeds the 32 images"),
    ("imagenet_odc_jax", ["--arch", "resnet152"], "invalid choice"),
    ("imagenet_odc_jax", ["--resume", "{garbage}"], "cannot load"),
    ("imagenet_selfclassifier_jax", ["--classes", "1,4"], "at least 2 classes"),
    ("imagenet_selfclassifier_jax", ["--classes", "10,x"], "comma-separated positive integers"),
    ("imagenet_selfclassifier_jax", ["--resolution", "0"], "must be a positive integer"),
    ("imagenet_selfclassifier_jax", ["--resume", "/nonexistent/checkpoint.npz"], "no checkpoint file"),
    ("imagenet_selfclassifier_jax", ["--eval-only", "/nonexistent/checkpoint.npz"], "--eval-only: no checkpoint file"),
    ("imagenet_odc_jax", ["--eval-only", "{garbage}", "--resume", "{garbage}"], "do not pass --resume"),
]


@pytest.mark.parametrize(("name", "argv", "message"), BAD_INPUT, ids=[" ".join(c[1]) for c in BAD_INPUT])
def test_bad_input_is_a_one_line_error(name: str, argv: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "garbage").write_bytes(b"not a zip file")
    argv = [a.format(empty=tmp_path / "empty", no_images=tmp_path / "no_images", garbage=tmp_path / "garbage") for a in argv]
    with pytest.raises(SystemExit) as exc:
        script(name).main([*argv, "--no-progress", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = trained["odc"]
    argv = [*ODC_TINY, "--clusters", "3", "--epochs", "3", "--resume", str(out / "checkpoint.npz"), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        script("imagenet_odc_jax").main(argv)
    assert exc.value.code == 2
    assert "--clusters 2" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def _without(key: str):
    return lambda a: {k: v for k, v in a.items() if k != key}


def _with(key: str, value: object):
    return lambda a: {**a, key: np.asarray(value)}


def _label_out_of_range(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    labels = a["odc/labels"].copy()
    labels[0] = 7  # the run has 2 clusters
    return {**a, "odc/labels": labels}


BAD_CHECKPOINTS = [
    ("empty file", None, [], "cannot load"),
    ("no args", _without("args"), [], "no args entry"),
    ("args not a dict", _with("args", "[1, 2]"), [], "args entry is a list"),
    ("no epoch", _without("epoch"), [], "no epoch entry"),
    ("epoch not an int", _with("epoch", 1.5), [], "epoch entry is a ndarray"),
    ("negative epoch", _with("epoch", -5), [], "epoch entry is -5"),
    ("no rng key", _without("rng/key"), [], "no rng/key entry"),
    ("no odc labels", _without("odc/labels"), [], "no odc/labels entry"),
    ("finished run", lambda a: a, ["--epochs", "2"], "nothing to train"),
    ("params do not fit", lambda a: {**a, "params/head/kernel": np.zeros(3, np.float32)}, [], "params/head/kernel is float32[3]"),
    ("odc labels out of range", _label_out_of_range, [], "its odc state does not fit this run: ValueError: state['labels']"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("change", "argv", "message"), [c[1:] for c in BAD_CHECKPOINTS], ids=[c[0] for c in BAD_CHECKPOINTS])
def test_a_bad_checkpoint_is_a_one_line_error(trained: dict, change, argv: list[str], message: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """Resumed in place (no ``--out``) next to a torn metrics line: the refusal touches no file of the run."""
    out, _ = trained["odc"]
    run = tmp_path / "run"
    shutil.copytree(out, run)
    path = run / "checkpoint.npz"
    if change is None:
        path.write_bytes(b"")
    else:
        with path.open("wb") as f:
            np.savez(f, **change(checkpoint(out)))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "lo')  # what a run killed mid-write leaves, which a resume would repair
    before = snapshot(run)
    with pytest.raises(SystemExit) as exc:
        script("imagenet_odc_jax").main([*ODC_TINY, "--epochs", "3", *argv, "--resume", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err  # one line: no usage, no warning
    assert snapshot(run) == before


# ---------------------------------------------------------------------------- framework-free helpers
def test_runs_reads_an_image_folder_without_a_framework(tmp_path: Path) -> None:
    from PIL import Image

    runs = script("runs")
    for cls, n in (("b_dog", 2), ("a_cat", 3)):
        (tmp_path / cls / "sub").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20 + i, 12), (i * 40, 0, 0)).save(tmp_path / cls / ("sub" if i else "") / f"{i}.PNG")
    (tmp_path / "a_cat" / "readme.txt").write_text("skipped")
    data = runs.image_folder(tmp_path)
    assert len(data) == 5 and data.targets.tolist() == [0, 0, 0, 1, 1]
    assert all(Path(p).suffix == ".PNG" for p in data.images)
    square = runs.square_image(data.image(4), 10)
    assert square.shape == (10, 10, 3) and square.dtype == np.uint8
    assert data.subset(2).targets.tolist() == [0, 1]
    jc = script("jax_common")
    images = jc.Images(data, 8, workers=2)
    batches = list(images.batches(np.asarray([[4, 0], [1, 2]])))
    images.close()
    assert [b[0].tolist() for b in batches] == [[4, 0], [1, 2]] and batches[0][1].shape == (2, 8, 8, 3)
    source = (EXAMPLES / "runs.py").read_text()  # shared with the torch examples: no framework imports
    assert not any(f"import {m}" in source or f"from {m}" in source for m in ("torch", "jax", "flax", "optax"))


def test_atomic_write_syncs_the_file_then_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rename is durable only once the directory is synced: after the file, its directory."""
    import stat

    runs = script("runs")
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(runs.os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or fsync(fd))
    runs.atomic_write(tmp_path / "f.bin", lambda f: f.write(b"new"))
    assert synced == [False, True] and (tmp_path / "f.bin").read_bytes() == b"new"


def test_atomic_write_gives_the_umask_mode(tmp_path: Path) -> None:
    """A rewritten file (checkpoint, metrics) gets the mode of any new file, not mkstemp's 0o600."""
    runs = script("runs")
    old = os.umask(0o022)
    try:
        runs.atomic_write(tmp_path / "f.bin", lambda f: f.write(b"new"))
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    runs = script("runs")
    path = tmp_path / "f.bin"
    runs.atomic_write(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        runs.atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    a, b = runs.epoch_order(50, 8, 0, 3), runs.epoch_order(50, 8, 0, 3)
    assert a.shape == (6, 8) and np.array_equal(a, b) and len(set(a.ravel())) == 48
    assert not np.array_equal(a, runs.epoch_order(50, 8, 0, 4))
