"""The JAX DeepCluster example (``examples/imagenet_deepcluster_jax.py``) on a tiny subset of the digits.

As ``test_jax_examples.py``: the training runs go through two subprocesses started together
(compiled with ``--xla_backend_optimization_level=0``), one on 1 CPU device (2 epochs
straight, the same run stopped after epoch 1 and resumed, in one interpreter so that the
compiled steps are reused) and one on 2 CPU devices (1 epoch). The pieces of an epoch (top
layer reset, cluster-uniform order, crops without flips) and bad command lines are checked in
this process.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import example_runs
import numpy as np
import pytest
from example_runs import npz_checkpoint as checkpoint
from example_runs import records

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NAME = "imagenet_deepcluster_jax"
TINY = ["--subset", "16", "--resolution", "16", "--width", "4", "--batch-size", "8", "--clusters", "2",
        "--pca-dim", "4", "--kmeans-backend", "array", "--no-progress"]
TIMING = {"images_per_s", "train_seconds", "cluster_seconds", "eval_seconds", "seconds"}

def script() -> ModuleType:
    """The example imported as a module (``examples/`` on ``sys.path``, as when run)."""
    return example_runs.script(NAME)






@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """``{run: (run directory, its stdout)}`` for the runs of this file (see the module docstring)."""
    base = tmp_path_factory.mktemp("jax_deepcluster")
    d = {name: base / name for name in ("straight", "resumed", "two")}
    one = [[*TINY, "--epochs", "2", "--out", str(d["straight"])],
           [*TINY, "--epochs", "2", "--stop-after", "1", "--out", str(d["resumed"])],
           [*TINY, "--epochs", "2", "--resume", str(d["resumed"] / "checkpoint.npz")]]
    two = [[*TINY, "--epochs", "1", "--out", str(d["two"])]]
    logs = [base / f"{i}.txt" for i in range(len(one) + len(two))]
    procs = [example_runs.start_jax_runs([(NAME, a, log) for a, log in zip(one, logs)], 1),
             example_runs.start_jax_runs([(NAME, a, log) for a, log in zip(two, logs[len(one):])], 2)]
    for proc in procs:
        example_runs.finish(proc, 300)
    text = [log.read_text() for log in logs]
    return {"straight": (d["straight"], text[0]), "stopped": (d["resumed"], text[1]),
            "resumed": (d["resumed"], text[2]), "two": (d["two"], text[3])}


# ---------------------------------------------------------------------------- training runs
@pytest.mark.slow
def test_smoke_writes_metrics_plot_and_checkpoint(trained: dict) -> None:
    out, text = trained["straight"]
    rows = records(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("loss", "nmi", "acc", "cluster_size_min", "cluster_size_max", "empty_clusters_fixed", "kmeans_inertia",
                "images_per_s", "lr"):
        assert key in rows[-1], key
    assert rows[0]["nmi_previous"] is None and 0 <= rows[1]["nmi_previous"] <= 1
    assert np.isfinite(rows[-1]["loss"]) and 0 <= rows[-1]["nmi"] <= 1 and rows[-1]["lr"] == 0.05
    assert rows[-1]["cluster_size_min"] >= 1  # k-means leaves no cluster empty
    assert (out / "summary.png").stat().st_size > 0
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # atomic writes leave nothing behind
    line = text.strip().splitlines()[-1]
    assert line.startswith("final DeepCluster: kNN@20") and "k-means labels NMI" in line
    baselines = json.loads((out / "baselines.json").read_text())
    for name, shown in (("random_net", "random net"), ("pixels", "pixels")):
        assert f"{shown}: kNN@20 {baselines[name]['knn_top1@20']:.3f}" in line, line
    for key in ("knn_top1@20", "linear_top1", "feat_nmi", "feat_acc"):
        assert rows[-1][key] is not None and 0 <= rows[-1][key] <= 1, key  # the last epoch is evaluated
    state = checkpoint(out)
    assert int(state["epoch"]) == 2 and json.loads(str(state["args"]))["clusters"] == 2
    for prefix in ("params/", "stats/", "opt/", "rng/"):
        assert any(k.startswith(prefix) for k in state), prefix
    assert int(state["labeler/epoch"]) == 2
    labels = state["labeler/previous_labels"]
    assert labels.shape == (16,) and np.bincount(labels, minlength=2).min() >= 1
    assigned = (out / "assignments.csv").read_text().splitlines()
    assert assigned[0] == "index,path_or_id,cluster" and len(assigned) == 17
    assert [int(row.split(",")[2]) for row in assigned[1:]] == labels.tolist()
    assert state["params/top/kernel"].shape[-1] == 2


@pytest.mark.slow
def test_resume_is_exact(trained: dict) -> None:
    straight, _ = trained["straight"]
    resumed, _ = trained["resumed"]
    example_runs.assert_resumed_exactly(straight, resumed, trained["stopped"][1], trained["resumed"][1])
    for x, y in zip(records(straight), records(resumed)):
        # the stopped run evaluates its last epoch (1), the straight one only its end: compare what both measured
        shared = (set(x) & set(y)) - TIMING
        assert {k: x[k] for k in shared} == {k: y[k] for k in shared}
        assert {"loss", "nmi", "kmeans_inertia"} <= shared


@pytest.mark.slow
def test_two_devices_train_on_the_global_batch(trained: dict) -> None:
    out, text = trained["two"]
    assert "2 device(s)" in text
    (row,) = records(out)
    one = records(trained["straight"][0])[0]
    # same data and seeds: the same first clustering, and the loss of the same global batches
    assert row["nmi"] == one["nmi"] and row["acc"] == one["acc"]
    assert row["loss"] == pytest.approx(one["loss"], rel=1e-3)


# ---------------------------------------------------------------------------- pieces of an epoch
def test_reset_top_renews_the_top_layer_and_its_momentum_only() -> None:
    import jax
    import jax.numpy as jnp

    dc = script()
    params = {"backbone": {"w": jnp.ones((3, 3))}, "top": {"kernel": jnp.ones((64, 50)), "bias": jnp.ones(50)}}
    opt = dc.Optimizer(0.05, 1e-5).build()
    state = opt.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    _, state = opt.update(grads, state, params)  # momentum everywhere
    new_params, new_state = dc.reset_top(params, state, jax.random.key(0))
    kernel = np.asarray(new_params["top"]["kernel"])
    assert kernel.shape == (64, 50) and abs(kernel.std() - 0.01) < 0.002 and abs(kernel.mean()) < 0.001
    assert not np.asarray(new_params["top"]["bias"]).any()
    np.testing.assert_array_equal(new_params["backbone"]["w"], params["backbone"]["w"])
    moments = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(new_state)[0]}
    assert len(moments) == 3
    for name, value in moments.items():
        assert value.any() != ("'top'" in name), name  # zero exactly for the top layer


def test_training_order_is_uniform_over_clusters() -> None:
    dc = script()
    labels = np.repeat(np.arange(4), [100, 10, 5, 5]).astype(np.int32)  # one giant cluster
    order = dc.training_order(labels, 8, seed=0, epoch=3)
    assert order.shape == (15, 8) and order.min() >= 0 and order.max() < 120
    counts = np.bincount(labels[order.ravel()], minlength=4)
    assert counts.max() - counts.min() <= 8  # 30 draws each, less the dropped last batch
    np.testing.assert_array_equal(order, dc.training_order(labels, 8, seed=0, epoch=3))
    assert not np.array_equal(order, dc.training_order(labels, 8, seed=0, epoch=4))


@pytest.mark.parametrize("flip", [False, True])
def test_crops_flip_only_when_asked(flip: bool) -> None:
    import jax
    import jax.numpy as jnp

    dc = script()
    image = np.zeros((18, 18, 3), np.uint8)
    image[:, 9:] = 255  # dark left half, bright right half
    views = np.asarray(dc.augment(jax.random.key(1), jnp.asarray(np.repeat(image[None], 64, axis=0)),
                                  dc.Crop(16, (0.5, 1.0), flip)))
    assert views.shape == (64, 16, 16, 3)
    mirrored = views[:, :, :8].mean(axis=(1, 2, 3)) > views[:, :, 8:].mean(axis=(1, 2, 3))
    assert mirrored.any() == flip and not mirrored.all()


# ---------------------------------------------------------------------------- bad input
BAD_INPUT = [
    (["--clusters", "2000"], "fewer than the 2000"),
    (["--pca-dim", "0"], "must be a positive integer"),
    (["--lr", "-1"], "must be a positive number"),
    (["--min-scale", "0"], "must be in (0, 1]"),
    (["--kmeans-backend", "sklearn"], "invalid choice"),
    (["--kmeans-iters", "x"], "invalid positive_int value"),
    (["--subset", "16", "--clusters", "2", "--batch-size", "32"], "exceeds the 16 images"),
    (["--resume", "{garbage}"], "cannot load"),
    (["--resume", "/nonexistent/checkpoint.npz"], "no checkpoint file"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(c[0]) for c in BAD_INPUT])
def test_bad_input_is_a_one_line_error(argv: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "garbage").write_bytes(b"not a zip file")
    argv = [a.format(garbage=tmp_path / "garbage") for a in argv]
    with pytest.raises(SystemExit) as exc:
        script().main([*argv, "--no-progress", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = trained["straight"]
    argv = [*TINY, "--pca-dim", "3", "--epochs", "3", "--resume", str(out / "checkpoint.npz"), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        script().main(argv)
    assert exc.value.code == 2
    assert "--pca-dim 4" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("drop", "message"), [("labeler/previous_labels", "no labeler/previous_labels"),
                                               ("opt/1/0/trace/top/bias", "no opt/1/0/trace/top/bias")])
def test_resume_from_an_incomplete_checkpoint_is_a_one_line_error(trained: dict, drop: str, message: str, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    state = checkpoint(trained["straight"][0])
    assert drop in state
    with open(tmp_path / "checkpoint.npz", "wb") as f:
        np.savez(f, **{k: v for k, v in state.items() if k != drop})
    argv = [*TINY, "--epochs", "3", "--resume", str(tmp_path / "checkpoint.npz"), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exc:
        script().main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "run").exists()
