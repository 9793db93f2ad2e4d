"""Evaluation of frozen features: k-NN, linear probe, cluster scores, split, cluster assignment.

Each result is checked against an independent computation: scikit-learn's
``KNeighborsClassifier`` with the same weighting, a float64 brute-force k-NN in NumPy, planted
Gaussian mixtures with a known answer, and hand-computed cases.

Exact comparisons of predictions are made only on test rows whose decisions have a margin
above float32 rounding (``_reference_knn``): a cosine similarity of two float32 rows carries an
absolute error of at most γ_{3D+4} (both normalisations and the D-term dot product), so a row
is kept when its k-th and (k+1)-th similarities differ by more than twice that, and its two
best class scores (sums of k weights exp(s / T), each off by that / T relative, plus γ_{k+1})
by more than twice their relative bound.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import clusterlearn as cl
from clusterlearn.knn import knn_accuracy, knn_classify

from bounds import gamma, identical_partitions_nmi_rtol

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
    sim_err = gamma(3 * train.shape[1] + 4, np.float32)
    score_rel = sim_err / temperature + gamma(k + 1, np.float32)
    safe = (rank_gap > 2 * sim_err) & (best2[:, 1] - best2[:, 0] > 2 * score_rel * best2[:, 1])
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
    results = [backend.to_numpy(knn_classify(*args, k=7, block_size=b)) for b in (1, 7, 23)]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    expected, safe = _reference_knn(x, y, xt, 7)
    np.testing.assert_array_equal(results[0][safe], expected[safe])


def test_knn_similarity_blocks_stay_bounded(monkeypatch):
    # No similarity block may exceed block_size x N (or the default budget of 2**24 entries).
    import clusterlearn.knn as knn

    shapes = []
    real = knn._top_k

    def recording_top_k(sims, k):
        shapes.append(tuple(sims.shape))
        return real(sims, k)

    monkeypatch.setattr(knn, "_top_k", recording_top_k)
    monkeypatch.setattr(knn, "_BLOCK_ELEMENTS", 3000)  # the default budget, scaled down to the test
    x, y, xt, _ = _data(seed=6, n=300, m=50)
    knn_classify(x, y, xt, k=5, block_size=4)
    assert shapes and max(r for r, _ in shapes) <= 4 and sum(r for r, _ in shapes) == 50
    shapes.clear()
    knn_classify(x, y, xt, k=5)
    assert max(r * n for r, n in shapes) <= 3000 and sum(r for r, _ in shapes) == 50


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
        pred = knn_classify(backend.asarray(feats), backend.asarray(labels), backend.asarray(test), k=k)
        pred = backend.to_numpy(pred)
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
    got = knn_classify(backend.asarray(x), backend.asarray(y), backend.asarray(xt), k=20, temperature=1e-3)
    got = backend.to_numpy(got)
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


# ----------------------------------------------------------------------------- linear probe
def _blobs(seed, n_per, d=16, c=3, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = 3.0 * np.eye(c, d)  # centres 4.2 apart, 14 sigma
    y = np.repeat(np.arange(c), n_per)
    return (centres[y] + spread * rng.normal(size=(y.shape[0], d))).astype(np.float32), y


def test_linear_probe_separable_data(backend):
    x, y = _blobs(0, 50)
    xt, yt = _blobs(1, 100)
    out = cl.linear_probe(backend.asarray(x), backend.asarray(y), backend.asarray(xt), backend.asarray(yt))
    assert out["probe_top1"] == 1.0 and out["probe_train_top1"] == 1.0 and out["C"] == 1.0


def test_linear_probe_random_labels_at_chance():
    # Labels independent of the features: test accuracy is a binomial proportion around 1/4
    # with standard deviation sqrt(3/16 / 4000) = 0.007; 0.05 is 7 of them.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    xt = rng.normal(size=(4000, 16)).astype(np.float32)
    y, yt = rng.integers(0, 4, 400), rng.integers(0, 4, 4000)
    out = cl.linear_probe(x, y, xt, yt)
    assert abs(out["probe_top1"] - 0.25) < 0.05
    assert out["probe_train_top1"] > out["probe_top1"]  # it fits noise on the train split


def test_linear_probe_standardises_features():
    # Standardisation makes the probe invariant to each feature's affine rescaling; without
    # it, a feature scaled by 1e-4 is all but erased by the L2 penalty.
    x, y = _blobs(5, 40, spread=1.5)
    xt, yt = _blobs(6, 200, spread=1.5)
    scale = np.r_[1e-4, 1e-4, 1e-4, np.ones(13)].astype(np.float32)
    plain = cl.linear_probe(x, y, xt, yt)
    scaled = cl.linear_probe(x * scale + 3.0, y, xt * scale + 3.0, yt)
    assert plain["probe_top1"] > 0.6  # chance is 1/3; the signal lives in the three rescaled features
    assert abs(scaled["probe_top1"] - plain["probe_top1"]) <= 2 / 600  # solver tolerance: a sample or two


def test_linear_probe_cross_validation_uses_train_split_only():
    x, y = _blobs(2, 30, spread=2.0)
    xt, yt = _blobs(3, 40, spread=2.0)
    a = cl.linear_probe(x, y, xt, yt, C=None, cv_folds=3)
    b = cl.linear_probe(x, y, xt[::-1].copy(), (yt[::-1] + 1) % 3, C=None, cv_folds=3)  # other test labels
    assert a["C"] == b["C"] and a["C"] in np.logspace(-4, 4, 9)
    assert a["probe_top1"] != b["probe_top1"]


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"train_features": np.zeros((10, 4), np.int64)}, TypeError, "train_features"),
        ({"test_features": np.zeros((5, 3), np.float32)}, ValueError, "test_features"),
        ({"train_labels": np.zeros(10, np.int64)}, ValueError, "two classes"),
        ({"test_labels": np.zeros(4, np.int64)}, ValueError, "test_labels"),
        ({"C": 0.0}, ValueError, "C"),
        ({"C": None, "cv_folds": 6}, ValueError, "cv_folds"),
        ({"max_iter": 0}, ValueError, "max_iter"),
    ],
)
def test_linear_probe_rejects_bad_input(change, error, words):
    rng = np.random.default_rng(0)
    args = {
        "train_features": rng.normal(size=(10, 4)).astype(np.float32),
        "train_labels": np.arange(10) % 2,
        "test_features": rng.normal(size=(5, 4)).astype(np.float32),
        "test_labels": np.arange(5) % 2,
    }
    args.update(change)
    with pytest.raises(error, match=words):
        cl.linear_probe(**args)


def test_linear_probe_names_the_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    x, y = _blobs(0, 5)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        cl.linear_probe(x, y, x, y)


# ----------------------------------------------------------------------------- clustering
def _directions(seed, n_per, c=4, d=8, noise=0.01):
    """Planted clusters on distinct directions (L2 normalisation keeps them apart)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(c), n_per)
    scale = rng.uniform(0.5, 5.0, size=(y.shape[0], 1))  # norms differ; directions carry the class
    return (scale * (np.eye(c, d)[y] + noise * rng.normal(size=(y.shape[0], d)))).astype(np.float32), y


def test_cluster_scores_recover_planted_clusters(backend):
    x, y = _directions(0, 40)
    out = cl.cluster_scores(backend.asarray(x), backend.asarray(y), seed=0)
    assert out["num_clusters"] == 4
    # equal partitions: ARI's pair counts give 2 x / (x + x) = 1 exactly; NMI rounds
    assert out["nmi"] == pytest.approx(1.0, rel=identical_partitions_nmi_rtol(4), abs=0) and out["ari"] == 1.0
    assert out["acc"] == 1.0 and out["many_to_one"] == 1.0


def test_cluster_scores_over_clustering():
    x, y = _directions(1, 40)
    out = cl.cluster_scores(x, y, 8, seed=0)
    assert out["num_clusters"] == 8
    assert out["many_to_one"] == 1.0  # every cluster lies within one class
    assert out["acc"] < 1.0  # one-to-one matching leaves 4 clusters unmatched


def test_cluster_scores_random_labels_score_low():
    x, _ = _directions(2, 50)
    y = np.random.default_rng(0).integers(0, 4, x.shape[0])
    out = cl.cluster_scores(x, y, seed=0)
    assert out["nmi"] < 0.1 and abs(out["ari"]) < 0.1


def test_cluster_scores_rejects_bad_input():
    x, y = _directions(0, 5)
    with pytest.raises(ValueError, match="labels"):
        cl.cluster_scores(x, y[:-1])
    with pytest.raises(ValueError, match="num_clusters"):
        cl.cluster_scores(x, y, 21)
    with pytest.raises(TypeError, match="features"):
        cl.cluster_scores(x.astype(np.int64), y)
    with pytest.raises(ValueError, match="backend"):
        cl.cluster_scores(x, y, backend="sklearn")


def test_many_to_one_accuracy_hand_computed(backend):
    truth = np.array([0, 0, 1, 1, 1, 2])
    clusters = np.array([5, 5, 5, 7, 7, 9])  # majorities: 2 of 3, 2 of 2, 1 of 1
    assert cl.many_to_one_accuracy(backend.asarray(truth), backend.asarray(clusters)) == 5 / 6
    assert cl.many_to_one_accuracy(np.array([-3, 4, 4]), np.array([0, 0, 0])) == 2 / 3


def test_many_to_one_accuracy_matches_brute_force():
    rng = np.random.default_rng(0)
    truth, clusters = rng.integers(0, 5, 500), rng.integers(0, 40, 500) * 3
    expected = sum(np.bincount(truth[clusters == c]).max() for c in np.unique(clusters)) / 500
    assert cl.many_to_one_accuracy(truth, clusters) == expected  # the same integer over 500


def test_many_to_one_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="labels_pred"):
        cl.many_to_one_accuracy(np.zeros(3, np.int64), np.zeros(4, np.int64))
    with pytest.raises(TypeError, match="labels_true"):
        cl.many_to_one_accuracy(np.zeros(3), np.zeros(3, np.int64))


# ----------------------------------------------------------------------------- split
def test_stratified_split_partitions_each_class(backend):
    labels = np.r_[np.zeros(10), np.ones(7), np.full(1, 5), np.full(3, 9)].astype(np.int64)
    labels = labels[np.random.default_rng(0).permutation(labels.shape[0])]
    train, test = cl.stratified_split(backend.asarray(labels), 0.3, seed=1)
    assert train.dtype == np.int64 and test.dtype == np.int64
    np.testing.assert_array_equal(np.sort(np.r_[train, test]), np.arange(labels.shape[0]))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    # round-half-up(0.3 n_c), capped at n_c - 1: 10 -> 3, 7 -> 2 (2.1), 1 -> 0, 3 -> 1 (0.9)
    for c, n_test in [(0, 3), (1, 2), (5, 0), (9, 1)]:
        assert np.sum(labels[test] == c) == n_test
    # round(0.6 * 1) = 1 is capped at 0: a singleton class stays in the train split.
    train, test = cl.stratified_split(backend.asarray(np.array([0, 0, 1])), 0.6)
    assert list(train) == [1, 2] or list(train) == [0, 2]
    assert test.shape == (1,) and test[0] in (0, 1)


def _splitmix64(seed: int, i: int) -> int:
    """The documented hash in Python integers, independent of NumPy."""
    mask = (1 << 64) - 1
    z = (i + seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_stratified_split_is_fixed():
    # The split must not change with the machine or the NumPy version: pinned, and equal to
    # the rule computed in pure Python (each class ordered by the seeded hash of its indices).
    labels = np.arange(20) % 2
    train, test = cl.stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(test, [3, 10, 11, 18])
    for seed in (0, 7):
        expected = []
        for c in (0, 1):
            members = sorted((_splitmix64(seed, i), i) for i in range(20) if labels[i] == c)
            expected += [i for _, i in members[:2]]
        np.testing.assert_array_equal(cl.stratified_split(labels, 0.2, seed=seed)[1], sorted(expected))
    _, other = cl.stratified_split(labels, 0.2, seed=1)
    assert not np.array_equal(other, test)


def test_stratified_split_rejects_bad_input():
    with pytest.raises(ValueError, match="test_fraction"):
        cl.stratified_split(np.zeros(4, np.int64), 1.0)
    with pytest.raises(TypeError, match="labels"):
        cl.stratified_split(np.zeros(4))
    with pytest.raises(ValueError, match="seed"):
        cl.stratified_split(np.zeros(4, np.int64), seed=-1)


# ----------------------------------------------------------------------------- assignment
def test_deepcluster_assign(backend):
    # Four blobs span a 3-D affine subspace: whitening to 3 dimensions keeps them apart
    # (more dimensions would whiten the isotropic noise up to the signal's scale).
    x, y = _blobs(3, 30, d=12, c=4, spread=0.05)
    labeler = cl.DeepClusterLabeler(4, pca_dim=3, backend="array", seed=0)
    with pytest.raises(ValueError, match="fitted"):
        labeler.assign(backend.asarray(x))
    epoch = labeler(backend.asarray(x))
    labels = backend.to_numpy(epoch.labels)
    assert cl.metrics.accuracy(y, labels) == 1.0
    np.testing.assert_array_equal(backend.to_numpy(labeler.assign(backend.asarray(x))), labels)
    fresh, fresh_y = _blobs(4, 10, d=12, c=4, spread=0.05)
    cluster_of_class = {int(c): int(labels[y == c][0]) for c in range(4)}
    got = backend.to_numpy(labeler.assign(backend.asarray(fresh)))
    np.testing.assert_array_equal(got, [cluster_of_class[int(c)] for c in fresh_y])
    with pytest.raises(ValueError, match="features"):
        labeler.assign(backend.asarray(fresh[:, :5]))


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_odc_assign(backend, metric):
    x, y = _directions(5, 30, c=4, d=12)
    odc = cl.OnlineDeepClustering(x.shape[0], 4, 12, min_cluster_size=5, metric=metric, like=backend.asarray(x))
    fresh, fresh_y = _directions(6, 10, c=4, d=12)
    with pytest.raises(cl.NotInitializedError):
        cl.odc_assign(odc, backend.asarray(fresh))
    odc.initialize(backend.asarray(x), backend.asarray(y))
    got = cl.odc_assign(odc, fresh)  # a NumPy caller of a memory of any backend
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, fresh_y)
    np.testing.assert_array_equal(backend.to_numpy(cl.odc_assign(odc, backend.asarray(x))), y)
    with pytest.raises(ValueError, match="features"):
        cl.odc_assign(odc, fresh[:, :5])
    with pytest.raises(TypeError, match="odc"):
        cl.odc_assign(cl.DeepClusterLabeler(4), fresh)


def test_odc_assign_normalises_new_features(backend):
    # A tight cluster around e1 (centroid norm ~1) and a spread one around e2 (centroid norm
    # ~0.83). A unit feature at 40 degrees from e1 is nearer the first centroid; the same
    # feature scaled by 0.01 would, unnormalised, be nearer the shorter centroid.
    angles = np.r_[np.linspace(-0.05, 0.05, 20), np.pi / 2 + np.linspace(-1.0, 1.0, 20)]
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    y = np.repeat([0, 1], 20)
    odc = cl.OnlineDeepClustering(40, 2, 2, min_cluster_size=1, like=backend.asarray(x))
    odc.initialize(backend.asarray(x), backend.asarray(y))
    new = np.array([[np.cos(0.7), np.sin(0.7)]], dtype=np.float32)
    for scale in (1.0, 0.01, 100.0):
        np.testing.assert_array_equal(backend.to_numpy(cl.odc_assign(odc, backend.asarray(scale * new))), [0])
