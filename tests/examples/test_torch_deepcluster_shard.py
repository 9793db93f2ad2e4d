"""``--shard-memory`` of the PyTorch DeepCluster example: every process extracts, clusters and
keeps only its block of the samples; the labels are checkpointed with
``torch.distributed.checkpoint`` and a run resumes on another number of processes.

What is exact and what is not: a run resumed on the number of processes that wrote its
checkpoint repeats the uninterrupted run bit for bit (on the CPU). Across numbers of processes
the training differs (each rank draws from its own rows, DDP splits the batch, the random
streams are re-seeded), so there the test checks what carries over exactly: the labeller's
epoch count and its previous labels, re-cut for the new number of processes, against which
the next epoch's NMI is taken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from example_runs import check_evaluation, records, run_main, script
from example_runs import torch_checkpoint as load

from clusterlearn import metrics
from clusterlearn.deepcluster import DeepClusterLabeler
from clusterlearn.deepcluster_shard import ShardedDeepClusterLabeler

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
from clusterlearn.adapters import torch as clt  # noqa: E402  (after the skips)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
K = 4
TINY = ["--subset", "16", "--resolution", "16", "--width", "8", "--batch-size", "8", "--no-progress", "--clusters", str(K),
        "--shard-memory"]
#: Keys of a metrics record that measure time, not the run.
TIMES = {"cluster_seconds", "train_seconds", "eval_seconds", "seconds", "images_per_s"}


def saved_labels(directory: Path, n: int) -> np.ndarray:
    """The (N,) labels of a ``deepcluster-labels-<epoch>`` directory, read by one process."""
    import torch.distributed.checkpoint as dcp

    target = {"labels": torch.zeros(n, dtype=torch.int64)}
    dcp.load(target, checkpoint_id=str(directory), no_dist=True)
    return target["labels"].numpy()


def assignments(out: Path) -> np.ndarray:
    return np.loadtxt(out / "assignments.csv", delimiter=",", skiprows=1, usecols=2, dtype=np.int64)


def targets() -> np.ndarray:
    return script("runs").demo_digits(16).subset(16).targets


def test_contingency_scores_equal_the_scores_of_the_labels() -> None:
    """The scores of the sharded runs, from a summed contingency table, are those of the labels."""
    runs = script("runs")
    rng = np.random.default_rng(0)
    for classes, clusters, n in ((10, 4, 50), (3, 7, 200), (1, 3, 9), (4, 1, 9)):
        truth, labels = rng.integers(classes, size=n), rng.integers(clusters, size=n)
        table = np.zeros((classes, clusters), dtype=np.int64)
        np.add.at(table, (truth, labels), 1)
        got, want = runs.contingency_scores(table), runs.cluster_scores(truth, labels)
        assert got["acc"] == want["acc"]  # the same matching of the same integer counts
        # float64 sums of at most n terms of magnitude <= log(n), in another order
        for key in ("nmi", "ari"):
            assert abs(got[key] - want[key]) <= 64 * n * np.finfo(np.float64).eps, (key, got, want)


def test_assignment_parts_join_into_the_whole_file(tmp_path: Path) -> None:
    """Each rank writes its block's rows; rank 0's join is what one process holding every label writes."""
    runs = script("runs")
    data = runs.ImageData("files", ["a.png", "b,c.png", "d.png", "e.png", "f.png"], np.arange(5))
    labels = np.array([3, 1, 4, 1, 5])
    whole = runs.write_assignments(tmp_path, data, labels).read_bytes()
    parts = tmp_path / "parts"
    parts.mkdir()
    for part, start in enumerate((0, 2, 4)):
        runs.write_assignment_part(parts, data, labels[start : start + 2], start, part)
    assert runs.join_assignment_parts(parts, 3).read_bytes() == whole
    assert sorted(p.name for p in parts.iterdir()) == ["assignments.csv"]  # parts removed, no temporary file


def test_one_shard_labels_as_the_kmeans_plus_plus_labeler_once_converged() -> None:
    """What the docs promise for one process: the same PCA bit for bit and, on features whose
    k-means converges (planted clusters, N <= 256 k so the seeding sample is every row), the
    labels and the NMI of ``DeepClusterLabeler(init="k-means++", backend="array")``."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 24)) * 6
    x = torch.from_numpy((centres[rng.integers(5, size=300)] + rng.normal(size=(300, 24))).astype(np.float32))
    plain = DeepClusterLabeler(5, pca_dim=8, seed=3, init="k-means++", backend="array")
    shard = ShardedDeepClusterLabeler(5, offset=0, num_samples=300, shard=0, num_shards=1, psum=clt.psum(), pca_dim=8, seed=3)
    for epoch in range(2):
        feats = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(epoch))
        a, b = plain(feats), shard(feats)
        assert torch.equal(plain.pca_.projection_, shard.pca_.projection_)
        assert torch.equal(a.labels, b.labels) and a.nmi_previous == b.nmi_previous


def test_one_process_resumes_bit_exactly(tmp_path: Path) -> None:
    """One process, --shard-memory: 2 epochs in one go equal epoch 1, then a resume to epoch 2."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_main("imagenet_deepcluster_torch", [*TINY, "--epochs", "2", "--out", str(straight)])
    run_main("imagenet_deepcluster_torch", [*TINY, "--epochs", "2", "--stop-after", "1", "--out", str(stopped)])
    assert (stopped / "deepcluster-labels-1" / ".metadata").is_file()
    run_main("imagenet_deepcluster_torch", [*TINY, "--epochs", "2", "--resume", str(stopped / "checkpoint.pt")])
    assert not (stopped / "deepcluster-labels-1").exists()  # the checkpoint names epoch 2's labels only
    a, b = load(straight / "checkpoint.pt"), load(stopped / "checkpoint.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"model.{key} differs after resuming"
    assert a["labeler"]["epoch"] == b["labeler"]["epoch"] == 2
    np.testing.assert_array_equal(saved_labels(Path(a["labeler"]["directory"]), 16),
                                  saved_labels(Path(b["labeler"]["directory"]), 16))
    np.testing.assert_array_equal(assignments(straight), assignments(stopped))
    # the stopped run also evaluated its last epoch, 1 (under preserved random streams)
    for a_record, b_record in zip(records(straight), records(stopped), strict=True):
        assert {k: v for k, v in a_record.items() if k not in TIMES} == {k: b_record[k] for k in a_record if k not in TIMES}
    # --eval-only reads the sharded labels back and scores them as the run's last record did
    text = run_main("imagenet_deepcluster_torch", [*TINY, "--epochs", "2", "--eval-only", str(straight / "checkpoint.pt")])
    (evaluated,) = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("evaluation {")]
    final = records(straight)[-1]
    for key in (*script("runs").EVAL_KEYS, "nmi", "ari", "acc", "cluster_size_min", "cluster_size_max"):
        assert evaluated[key] == final[key], key


def test_faiss_is_refused_with_sharded_labels(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        script("imagenet_deepcluster_torch").main([*TINY, "--kmeans-backend", "faiss"])
    assert exc.value.code == 2 and "--shard-memory runs the array k-means" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_shard_the_labels_and_resume_on_one(tmp_path: Path) -> None:
    """Two gloo processes, stopped after epoch 1: the replicated state (PCA, centroids) is the
    same on both ranks, their labels together cover the N samples, the sizes sum to N and the
    scores are those of the labels; one process resumes the run to its end."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(EXAMPLES / "imagenet_deepcluster_torch.py"), *TINY, "--epochs", "2", "--stop-after", "1",
           "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "2 process(es)" in done.stdout and "labels sharded" in done.stdout
    prints = {line.split()[1].rstrip(":"): line.split()[-1] for line in done.stdout.splitlines()
              if "replicated state fingerprint" in line}
    (first,) = records(tmp_path)
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"] == first["fingerprint"], done.stdout[-4000:]
    entry = load(tmp_path / "checkpoint.pt")["labeler"]
    assert entry["epoch"] == 1 and Path(entry["directory"]) == (tmp_path / "deepcluster-labels-1").resolve()
    epoch1 = saved_labels(tmp_path / "deepcluster-labels-1", 16)
    np.testing.assert_array_equal(epoch1, assignments(tmp_path))  # the two ranks' parts, in order
    sizes = np.bincount(epoch1, minlength=K)
    assert sizes.sum() == 16 and sizes.min() >= 1 and len(sizes) == K  # k-means over shards: no empty cluster
    assert (first["cluster_size_min"], first["cluster_size_max"]) == (sizes.min(), sizes.max())
    want = script("runs").cluster_scores(targets(), epoch1)
    for key in ("nmi", "ari", "acc"):
        assert abs(first[key] - want[key]) <= 1e-12, key
    assert first["nmi_previous"] is None

    text = run_main("imagenet_deepcluster_torch", [*TINY, "--epochs", "2", "--resume", str(tmp_path / "checkpoint.pt")])
    assert "written by 2 process(es), this run has 1" in text
    assert [r["epoch"] for r in records(tmp_path)] == [1, 2]
    entry = load(tmp_path / "checkpoint.pt")["labeler"]
    assert entry["epoch"] == 2 and not (tmp_path / "deepcluster-labels-1").exists()
    epoch2 = saved_labels(tmp_path / "deepcluster-labels-2", 16)
    # the NMI against the previous epoch: the 2 ranks' labels, re-cut for one process, exactly
    table = np.bincount(epoch1 * K + epoch2, minlength=K * K).reshape(K, K)
    assert records(tmp_path)[-1]["nmi_previous"] == metrics.nmi_from_contingency(table)
    check_evaluation(tmp_path, text, epoch2, K)
