"""Evaluation of frozen features: k-NN, linear probe, cluster scores, split, cluster assignment.

Each result is checked against an independent computation: scikit-learn's
``KNeighborsClassifier`` with the same weighting, a float64 brute-force k-NN in NumPy, planted
Gaussian mixtures with a known answer, and hand-computed cases.

Exact comparisons of predictions are made only on test rows whose decisions have a margin far
above float32 rounding: similarities carry an absolute error of about ``D * eps32`` (< 1e-5
for D <= 16), so a row is kept when its k-th and (k+1)-th similarities differ by more than
1e-4 and its two best class scores by more than 1e-2 relative (the weights' relative error is
about ``1e-5 / T = 1.4e-4``).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import clusterlearn as cl
from clusterlearn.knn import knn_accuracy, knn_classify

T = 0.07


# ----------------------------------------------------------------------------- references
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_knn(train, labels, test, k, temperature=T, num_classes=None):
    """Float64 brute force: predictions and the rows whose decision has a safe margin."""
    c = int(labels.max()) + 1 if num_classes is None else num_classes
    sims = _unit(test.astype(np.float64)) @ _unit(train.astype(np.float64)).T
    order = np.argsort(-sims, axis=1, kind="stable")
    top = np.take_along_axis(sims, order[:, : k + 1], axis=1)
    scores = np.zeros((test.shape[0], c))
    for i in range(test.shape[0]):
        for j in order[i, :k]:
            scores[i, labels[j]] += np.exp(sims[i, j] / temperature)
    best2 = np.sort(scores, axis=1)[:, -2:]
    rank_gap = top[:, k - 1] - top[:, k] if k < train.shape[0] else np.full(test.shape[0], np.inf)
    safe = (rank_gap > 1e-4) & (best2[:, 1] - best2[:, 0] > 1e-2 * best2[:, 1])
    return np.argmax(scores, axis=1), safe


def _data(seed=0, n=300, m=80, d=8, c=4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d))
    y = rng.integers(0, c, size=n)
    yt = rng.integers(0, c, size=m)
    x = centres[y] + 1.5 * rng.normal(size=(n, d))
    xt = centres[yt] + 1.5 * rng.normal(size=(m, d))
    return x, y, xt, yt


# ----------------------------------------------------------------------------- k-NN
@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_sklearn(k):
    from sklearn.neighbors import KNeighborsClassifier

    x, y, xt, _ = _data()
    ref = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda dist: np.exp((1.0 - dist) / T)
    ).fit(x, y)
    expected = ref.predict(xt)
    _, safe = _reference_knn(x, y, xt, k)
    assert safe.mean() > 0.9  # the data leave almost every decision far from a tie
    got = knn_classify(x, y, xt, k=k, temperature=T)
    np.testing.assert_array_equal(got[safe], expected[safe])


def test_knn_backends_match_brute_force(backend):
    x, y, xt, _ = _data(seed=1)
    got = knn_classify(backend.asarray(x), backend.asarray(y), backend.asarray(xt), k=(5, 20), temperature=T)
    assert set(got) == {5, 20}
    for k, pred in got.items():
        expected, safe = _reference_knn(x, y, xt, k)
        assert safe.mean() > 0.9
        pred = backend.to_numpy(pred)
        assert pred.shape == (xt.shape[0],)
        np.testing.assert_array_equal(pred[safe], expected[safe])


def test_knn_block_size_does_not_change_result(backend):
    x, y, xt, _ = _data(seed=2, m=23)
    args = backend.asarray(x), backend.asarray(y), backend.asarray(xt)
    results = [backend.to_numpy(knn_classify(*args, k=7, block_size=b)) for b in (1, 7, 23, 1000)]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    expected, safe = _reference_knn(x, y, xt, 7)
    np.testing.assert_array_equal(results[0][safe], expected[safe])


def test_knn_tied_neighbours_go_to_lowest_training_index(backend):
    # 60 copies of one direction: the first 10 labelled 1, the other 50 labelled 0. All 60
    # similarities tie at 1, so k=10 must take the first 10 copies (class 1) on every backend,
    # whichever candidates a native top-k returns.
    feats = np.tile(np.array([[1.0, 0.0, 0.0]]), (60, 1))
    labels = np.r_[np.ones(10, dtype=np.int64), np.zeros(50, dtype=np.int64)]
    # Orthogonal decoys (class 2) first, so that the tied block starts at index 40 (NumPy's
    # introselect then returns candidates from the middle of the block).
    feats = np.vstack([np.tile([[0.0, 1.0, 0.0]], (40, 1)), feats])
    labels = np.r_[np.full(40, 2), labels]
    test = np.array([[2.0, 0.0, 0.0], [1.0, 0.1, 0.0]])
    for k in (10, 11, 59):
        pred = backend.to_numpy(knn_classify(backend.asarray(feats), backend.asarray(labels), backend.asarray(test), k=k))
        expected = 1 if k <= 20 else 0  # 10 of class 1 against k - 10 of class 0
        np.testing.assert_array_equal(pred, [expected, expected])


def test_knn_tied_class_scores_go_to_lowest_class(backend):
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = np.array([2, 1, 0])
    test = np.array([[1.0, 1.0]])  # equally similar to classes 2 and 1
    pred = knn_classify(backend.asarray(feats), backend.asarray(labels), backend.asarray(test), k=2)
    np.testing.assert_array_equal(backend.to_numpy(pred), [1])


def test_knn_small_temperature_does_not_overflow(backend):
    # exp(s / T) overflows float32 for T = 1e-3; shifted weights keep the 1-NN decision,
    # which a vote dominated by the nearest neighbour must give.
    x, y, xt, _ = _data(seed=3)
    sims = _unit(xt) @ _unit(x).T
    top2 = np.sort(sims, axis=1)[:, -2:]
    safe = top2[:, 1] - top2[:, 0] > 0.02  # exp(-20): the nearest outweighs 19 others
    assert safe.mean() > 0.5
    got = backend.to_numpy(knn_classify(backend.asarray(x), backend.asarray(y), backend.asarray(xt), k=20, temperature=1e-3))
    nearest = y[np.argmax(sims, axis=1)]
    np.testing.assert_array_equal(got[safe], nearest[safe])


def test_knn_accuracy(backend):
    x, y, xt, yt = _data(seed=4)
    acc = knn_accuracy(backend.asarray(x), backend.asarray(y), backend.asarray(xt), backend.asarray(yt), k=(5, 20))
    assert set(acc) == {"knn_top1@5", "knn_top1@20"}
    for k in (5, 20):
        pred = backend.to_numpy(knn_classify(backend.asarray(x), backend.asarray(y), backend.asarray(xt), k=k))
        assert acc[f"knn_top1@{k}"] == np.mean(pred == yt)
    assert acc["knn_top1@20"] > 0.5  # four separated classes: far above chance (0.25)


def test_knn_num_classes_wider_than_labels():
    x, y, xt, _ = _data(seed=5)
    a = knn_classify(x, y, xt, k=5)
    b = knn_classify(x, y, xt, k=5, num_classes=10)
    np.testing.assert_array_equal(a, b)


def _bad_knn_calls():
    x, y, xt, _ = _data(n=30, m=5)
    f32 = x.astype(np.float32)
    return [
        ({"train_features": x.tolist()}, TypeError, "train_features"),
        ({"train_features": x.astype(np.int64)}, TypeError, "train_features"),
        ({"test_features": xt[:, :3]}, ValueError, "test_features"),
        ({"test_features": xt.astype(np.float32), "train_features": f32}, None, None),
        ({"test_features": xt}, TypeError, "same dtype"),
        ({"train_features": np.where(np.arange(30)[:, None] == 3, np.nan, f32)}, ValueError, "train_features"),
        ({"train_labels": y[:-1]}, ValueError, "train_labels"),
        ({"train_labels": y.astype(np.float32)}, TypeError, "train_labels"),
        ({"train_labels": y - 1}, ValueError, "train_labels"),
        ({"num_classes": 2}, ValueError, "train_labels"),
        ({"k": 0}, ValueError, "k"),
        ({"k": 31}, ValueError, "k"),
        ({"k": ()}, ValueError, "k"),
        ({"k": 2.0}, TypeError, "k"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"block_size": 0}, ValueError, "block_size"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_knn_calls())))
def test_knn_rejects_bad_input(case):
    x, y, xt, _ = _data(n=30, m=5)
    change, error, words = _bad_knn_calls()[case]
    args = {"train_features": x.astype(np.float32), "train_labels": y, "test_features": xt.astype(np.float32)}
    args.update(change)
    kwargs = {key: args.pop(key) for key in ("k", "temperature", "block_size", "num_classes") if key in args}
    if error is None:
        knn_classify(args["train_features"], args["train_labels"], args["test_features"], **kwargs)
        return
    with pytest.raises(error, match=words):
        knn_classify(args["train_features"], args["train_labels"], args["test_features"], **kwargs)


def test_knn_rejects_mixed_namespaces():
    torch = pytest.importorskip("torch")
    x, y, xt, _ = _data(n=30, m=5)
    with pytest.raises(TypeError, match="test_features"):
        knn_classify(x.astype(np.float32), y, torch.asarray(xt, dtype=torch.float32))


def test_knn_accuracy_rejects_bad_test_labels():
    x, y, xt, yt = _data(n=30, m=5)
    x, xt = x.astype(np.float32), xt.astype(np.float32)
    with pytest.raises(ValueError, match="test_labels"):
        knn_accuracy(x, y, xt, yt[:-1])
    with pytest.raises(TypeError, match="test_labels"):
        knn_accuracy(x, y, xt, yt.astype(np.float32))
    with pytest.raises(ValueError, match="test_labels"):
        knn_accuracy(x, y, xt, yt, num_classes=1)
