"""The framework-free evaluation helpers of the examples (``examples/runs.py``): the epochs
evaluated, the scores of frozen features on the fixed split, the baselines file and the
training set's cluster assignments. The training scripts' use of them is tested in
``test_torch_examples.py`` and ``test_jax_examples.py``."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from example_runs import script

import clusterlearn as cl

pytest.importorskip("sklearn")


def runs() -> ModuleType:
    """``examples/runs.py``, imported as the scripts import it."""
    return script("runs")


def test_the_end_of_a_run_and_every_nth_epoch_are_evaluated() -> None:
    due = runs().eval_due
    assert [e for e in range(1, 13) if due(e, 12, 5)] == [5, 10, 12]
    assert [e for e in range(1, 8) if due(e, 7, 0)] == [7]  # 0: only at the end
    assert [e for e in range(1, 4) if due(e, 3, 5)] == [3]  # a --stop-after run ends at its stop


def test_separable_features_score_perfectly_and_the_split_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(3), 30)
    features = np.eye(8, dtype=np.float32)[targets] + 0.01 * rng.standard_normal((90, 8)).astype(np.float32)
    evaluator = runs().Evaluator(tmp_path, targets, seed=0, write=True)
    scores = evaluator.evaluate(features)
    assert list(scores) == list(runs().EVAL_KEYS)
    assert scores["knn_top1@20"] == scores["knn_top1@200"] == scores["linear_top1"] == 1.0  # 200 capped at 72
    assert scores["feat_nmi"] == pytest.approx(1.0) and scores["feat_acc"] == 1.0
    with np.load(tmp_path / "split.npz") as z:
        train, test = cl.stratified_split(targets, 0.2, seed=0)
        assert np.array_equal(z["train"], train) and np.array_equal(z["test"], test) and len(test) == 18
    # features that ignore the class: chance-level k-NN and probe on the held-out split
    noise = rng.standard_normal((90, 8)).astype(np.float32)
    chance = evaluator.evaluate(noise)
    assert all(0 <= chance[k] <= 1 for k in ("knn_top1@20", "linear_top1", "feat_nmi", "feat_acc"))
    assert chance["linear_top1"] < 0.9 and chance["feat_nmi"] < 0.5


def test_without_a_test_split_knn_and_probe_are_not_computed(tmp_path: Path) -> None:
    targets = np.asarray([0, 1, 2, 3, 0, 1])  # classes of 1-2 images: nothing held out
    evaluator = runs().Evaluator(tmp_path, targets, seed=0, write=False)
    scores = evaluator.evaluate(np.eye(6, dtype=np.float32))
    assert scores["knn_top1@20"] is None and scores["linear_top1"] is None and 0 <= scores["feat_nmi"] <= 1
    assert not list(tmp_path.iterdir())  # write=False
    record = {**scores, "nmi": 0.5, "acc": 0.25}
    line = runs().summary_line("ODC", "memory labels", record, {"random_net": scores, "pixels": None})
    assert line.startswith("final ODC: kNN@20 n/a  probe n/a  feat NMI") and "| memory labels NMI 0.500  ACC 0.250 |" in line
    assert line.endswith("| pixels: not computed (too large)") and "\n" not in line


def test_baselines_are_stored_and_an_unreadable_file_counts_as_missing(tmp_path: Path) -> None:
    targets = np.repeat(np.arange(2), 10)
    evaluator = runs().Evaluator(tmp_path, targets, seed=0, write=True)
    assert evaluator.load_baselines() is None
    made = evaluator.make_baselines(np.eye(20, dtype=np.float32), None)
    assert evaluator.load_baselines() == made and made["pixels"] is None
    (tmp_path / "baselines.json").write_text('{"random_net": ')  # torn write of another tool
    assert evaluator.load_baselines() is None


def test_assignments_name_files_or_dataset_indices(tmp_path: Path) -> None:
    r = runs()
    digits = r.demo_digits(8).subset(5)
    path = r.write_assignments(tmp_path, digits, np.asarray([1, 0, 1, 2, 2]))
    rows = path.read_text().splitlines()
    assert rows[0] == "index,path_or_id,cluster" and len(rows) == 6
    assert rows[2] == f"1,{digits.ids[1]},0" and digits.ids[1] == 449  # the index among the 1797 digits
    folder = r.ImageData("files", ["a/x.png", "b/y,z.png"], np.asarray([0, 1]))
    rows = r.write_assignments(tmp_path, folder, np.asarray([3, 4])).read_text().splitlines()
    assert rows[1:] == ["0,a/x.png,3", '1,"b/y,z.png",4']  # CSV quoting of a comma in a path
    with pytest.raises(ValueError, match="one entry per image"):
        r.write_assignments(tmp_path, folder, np.asarray([3]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assignments.csv"]  # atomic: no temporary file left


def test_a_large_train_split_fits_the_probe_on_a_fixed_stratified_part(tmp_path: Path, monkeypatch) -> None:
    r = runs()
    targets = np.repeat(np.arange(3), 30)
    monkeypatch.setattr(r, "PROBE_MAX_TRAIN", 30)
    evaluator = r.Evaluator(tmp_path, targets, seed=0, write=False)
    part = evaluator.probe_train
    assert len(evaluator.train) == 72 and len(part) == 30 and np.isin(part, evaluator.train).all()
    assert np.bincount(targets[part]).tolist() == [10, 10, 10]
    assert np.array_equal(part, r.Evaluator(tmp_path, targets, seed=1, write=False).probe_train)  # fixed
    features = np.eye(4, dtype=np.float32)[targets]
    assert evaluator.evaluate(features)["linear_top1"] == 1.0
