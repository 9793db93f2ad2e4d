"""``--shard-memory`` in the JAX ODC example (``examples/imagenet_odc_jax.py``) on a tiny subset of the digits.

The training runs go through two :func:`example_runs.start_jax_runs` subprocesses (compiled
with ``--xla_backend_optimization_level=0``; one interpreter per device count, so that compiled
steps are reused). On 2 forced CPU devices: the sharded memory stopped after epoch 1, resumed on
2 devices into another run directory (which holds the leftovers of a run that crashed while
writing epoch 2's memory), the sharded memory for 2 epochs straight, and the replicated memory
for 2 epochs. Then, on 1 device, the stopped run resumed in place (the adapter re-cuts the rows)
and its final checkpoint evaluated (``--eval-only``).

Exact: a run resumed on the device count that wrote its checkpoint equals the straight run (every
checkpoint array, epoch 2's record with the memory's fingerprint); the memory an orbax checkpoint
written by 2 devices gives on 1 device has the fingerprint the 2 devices recorded; the sharded
memory makes the replicated one's decisions (labels, sizes, hence the loss weights, the
training and every checkpoint array but the memory's), its floats are compared with a bound.
A run resumed on another number of devices is not compared with a straight one: the training
step's reductions (BatchNorm statistics, gradients) sum over the devices in another order.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from example_runs import finish, records, script, snapshot, start_jax_runs
from example_runs import npz_checkpoint as checkpoint

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("sklearn")
pytest.importorskip("orbax.checkpoint")

NAME = "imagenet_odc_jax"
TINY = ["--subset", "16", "--resolution", "16", "--width", "4", "--batch-size", "8", "--no-progress",
        "--clusters", "2", "--min-cluster-size", "4"]
SHARDED = [*TINY, "--epochs", "2", "--shard-memory"]
TIMING = {"images_per_s", "train_seconds", "seconds", "eval_seconds"}
#: What a run that crashed after orbax began writing epoch 2's memory leaves: a finished directory
#: that no checkpoint names yet, and orbax's temporary one.
LEFTOVERS = ("odc-memory-2", "odc-memory-2.orbax-checkpoint-tmp-1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """``{run: (run directory, its stdout)}`` (see the module docstring)."""
    base = tmp_path_factory.mktemp("jax_odc_shard")
    d = {name: base / name for name in ("stopped", "resumed", "straight", "replicated", "resharded")}
    for name in LEFTOVERS:
        (d["resumed"] / name).mkdir(parents=True)
        (d["resumed"] / name / "junk").write_bytes(b"a torn write")
    two = [[*SHARDED, "--stop-after", "1", "--out", str(d["stopped"])],
           [*SHARDED, "--resume", str(d["stopped"] / "checkpoint.npz"), "--out", str(d["resumed"])],
           [*SHARDED, "--out", str(d["straight"])],
           [*TINY, "--epochs", "2", "--out", str(d["replicated"])]]
    logs = [base / f"{i}.txt" for i in range(6)]
    finish(start_jax_runs([(NAME, a, log) for a, log in zip(two, logs)], 2), 300)
    shutil.copytree(d["stopped"], d["resharded"])  # the stopped run stays as it is, for the checks
    one = [[*SHARDED, "--resume", str(d["resharded"] / "checkpoint.npz")],
           [*SHARDED, "--eval-only", str(d["resharded"] / "checkpoint.npz")]]
    finish(start_jax_runs([(NAME, a, log) for a, log in zip(one, logs[4:])], 1), 300)
    text = [log.read_text() for log in logs]
    return {**{name: (d[name], text[i]) for i, name in enumerate(d)}, "eval_only": (d["resharded"], text[5])}


def memory(out: Path, name: str) -> tuple[object, object]:
    """The orbax memory ``out/name`` read onto this process's first device, and its config (the run's settings)."""
    import jax
    import clusterlearn as cl
    from clusterlearn.adapters import jax as clj

    odc = cl.OnlineDeepClustering(16, 2, 256, momentum=0.5, min_cluster_size=4, centroid_update_interval=10, seed=0)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    return clj.gather_memory(clj.load_memory(out / name, mesh, odc.config), odc.config), odc.config


def fingerprint_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if "ODC memory fingerprint" in line]
    return line


@pytest.mark.slow
def test_sharded_run_checkpoints_its_memory_with_orbax(runs: dict) -> None:
    """Each epoch's memory goes to odc-memory-<epoch>/, the checkpoint names it, older ones are removed."""
    out, text = runs["straight"]
    state = checkpoint(out)
    assert str(state["odc/memory_dir"]) == "odc-memory-2" and not any(k.startswith("odc/") and k != "odc/memory_dir"
                                                                       for k in state)
    assert sorted(p.name for p in out.glob("odc-memory-*")) == ["odc-memory-2"]
    assert "2 device(s)" in text and fingerprint_line(text).startswith("sharded over 2 device(s)")
    assert fingerprint_line(text).split()[-1] == records(out)[-1]["fingerprint"]
    host, config = memory(out, "odc-memory-2")
    np.testing.assert_array_equal(np.bincount(host.labels, minlength=2), host.sizes)
    assert host.sizes.min() >= 4 and int(host.iteration) == 16 // 8  # epoch 2's steps (epoch 1: the label warm-up)


@pytest.mark.slow
def test_sharded_resume_is_exact(runs: dict) -> None:
    """Resumed on 2 devices into a directory where a crashed attempt left epoch 2's memory
    unnamed: the straight run's epoch 2, exactly; the memory read from the checkpoint's directory."""
    (straight, _), (stopped, stopped_text), (resumed, text) = runs["straight"], runs["stopped"], runs["resumed"]
    assert "epoch 1 " in stopped_text and "epoch 2 " not in stopped_text and "epoch 1 " not in text
    a, b = checkpoint(straight), checkpoint(resumed)
    assert set(a) == set(b)
    for key in set(a) - {"args"}:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{key} differs after resuming")
    # with the fingerprint: the memory, byte for byte
    ((epoch, x),) = [(r["epoch"], {k: v for k, v in r.items() if k not in TIMING}) for r in records(resumed)]
    assert epoch == 2 and x == {k: v for k, v in records(straight)[1].items() if k not in TIMING}
    assert sorted(p.name for p in resumed.glob("odc-memory-*")) == ["odc-memory-2"]  # the leftovers replaced
    assert not (resumed / "odc-memory-2" / "junk").exists()
    assert sorted(p.name for p in stopped.glob("odc-memory-*")) == ["odc-memory-1"]  # the checkpoint's, left alone


@pytest.mark.slow
def test_sharded_run_resumes_on_another_number_of_devices(runs: dict) -> None:
    """The memory written by 2 devices reads onto 1 with the fingerprint the 2 devices recorded;
    the run resumed on 1 device from it finishes epoch 2 with a consistent memory."""
    stopped, _ = runs["stopped"]
    host, config = memory(stopped, "odc-memory-1")
    from clusterlearn.adapters import jax as clj

    assert clj.fingerprint(host, config) == records(stopped)[-1]["fingerprint"]
    out, text = runs["resharded"]
    assert "1 device(s)" in text and fingerprint_line(text).startswith("sharded over 1 device(s)")
    assert [r["epoch"] for r in records(out)] == [1, 2] and "epoch 1 " not in text
    assert str(checkpoint(out)["odc/memory_dir"]) == "odc-memory-2"
    assert sorted(p.name for p in out.glob("odc-memory-*")) == ["odc-memory-2"]
    host, config = memory(out, "odc-memory-2")
    assert clj.fingerprint(host, config) == records(out)[-1]["fingerprint"] == fingerprint_line(text).split()[-1]
    np.testing.assert_array_equal(np.bincount(host.labels, minlength=2), host.sizes)
    assert host.sizes.min() >= 4


@pytest.mark.slow
def test_eval_only_reads_the_sharded_memory(runs: dict) -> None:
    """--eval-only of a sharded checkpoint: the final record's evaluation and memory-label scores, nothing written."""
    import json

    out, text = runs["eval_only"]
    (evaluated,) = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("evaluation {")]
    final = records(out)[-1]
    assert evaluated["epoch"] == 2 and len(records(out)) == 2
    for key in (*script("runs").EVAL_KEYS, "nmi", "acc"):
        assert evaluated[key] == final[key], key


@pytest.mark.slow
def test_sharded_memory_makes_the_replicated_decisions(runs: dict) -> None:
    """On the same 2 devices, the sharded memory's labels and sizes are the replicated one's
    (so are the loss weights, the training and every other checkpoint array); its floats agree
    within the rounding of differently compiled programs."""
    sharded, replicated = runs["straight"][0], runs["replicated"][0]
    a, b = checkpoint(sharded), checkpoint(replicated)
    for key in b:
        if key not in {"args"} and not key.startswith("odc/"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    host, _ = memory(sharded, "odc-memory-2")
    for name in ("labels", "sizes", "iteration"):
        np.testing.assert_array_equal(getattr(host, name), b[f"odc/{name}"], err_msg=name)
    # Unit rows of D = 256: a norm's sum of D squares, summed in another order, differs by at most
    # (D - 1) eps relatively; a row passes 3 normalisations (warm-up: f, the mix; epoch 2's step),
    # a centroid one more; the sums add at most N = 16 rows (and round N times more)
    eps, d, n = np.finfo(np.float32).eps, 256, 16
    row = 3 * (d - 1) * eps
    for name, bound in (("features", row), ("centroids", row + (d - 1) * eps), ("sums", n * row + n * n * eps)):
        np.testing.assert_allclose(getattr(host, name), b[f"odc/{name}"], rtol=0, atol=bound, err_msg=name)
    for x, y in zip(records(sharded), records(replicated)):
        keys = set(x) - TIMING - {"fingerprint"}
        assert {k: x[k] for k in keys} == {k: y[k] for k in keys}


BAD_MEMORY = [
    ("names a path", lambda out: np.asarray("../elsewhere/odc-memory-1"), "is not the name of a memory directory"),
    ("directory missing", lambda out: shutil.rmtree(out / "odc-memory-1") or np.asarray("odc-memory-1"),
     "its odc state does not fit this run"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("change", "message"), [c[1:] for c in BAD_MEMORY], ids=[c[0] for c in BAD_MEMORY])
def test_a_bad_memory_entry_is_a_one_line_error(runs: dict, change, message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """Resumed in place: the refusal touches no file of the run."""
    run = tmp_path / "run"
    shutil.copytree(runs["stopped"][0], run)
    path = run / "checkpoint.npz"
    arrays = checkpoint(run)
    arrays["odc/memory_dir"] = change(run)
    with path.open("wb") as f:
        np.savez(f, **arrays)
    before = snapshot(run)
    with pytest.raises(SystemExit) as exc:
        script(NAME).main([*SHARDED, "--resume", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_replicated_checkpoint_is_refused_with_the_flag_named(runs: dict, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    out, _ = runs["replicated"]
    with pytest.raises(SystemExit) as exc:
        script(NAME).main([*SHARDED, "--epochs", "3", "--resume", str(out / "checkpoint.npz"), "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert "--shard-memory False" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_before_the_flag_resumes_without_it() -> None:
    """A checkpoint whose settings predate --shard-memory was trained with a replicated memory."""
    import argparse

    runs = script("runs")
    assert runs.resume_mismatch({"lr": 0.05}, argparse.Namespace(lr=0.05, shard_memory=False)) is None
    assert "--shard-memory False" in runs.resume_mismatch({"lr": 0.05}, argparse.Namespace(lr=0.05, shard_memory=True))
    assert runs.resume_mismatch({"lr": 0.05}, argparse.Namespace(lr=0.05)) is None  # a script without the option
