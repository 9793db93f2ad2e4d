"""The PyTorch adapter in one process: memories, modules, sampler, feature extraction.

The multi-process behaviour is in tests/odc/test_torch_ddp.py.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import clusterlearn as cl  # noqa: E402
from clusterlearn.adapters import torch as clt  # noqa: E402

from bounds import gamma, rounding_bounds, unit_norm_atol, unit_roundoff  # noqa: E402
from streams import drifting_stream  # noqa: E402

N, C, D = 120, 5, 8


@pytest.fixture
def feats() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)


def make(**kw: object) -> clt.OnlineDeepClustering:
    return clt.OnlineDeepClustering(N, C, D, momentum=0.8, min_cluster_size=4, centroid_update_interval=2, device="cpu", **kw)


def test_single_process_equals_core(feats: np.ndarray) -> None:
    odc = make()
    core = cl.OnlineDeepClustering(N, C, D, momentum=0.8, min_cluster_size=4, centroid_update_interval=2, like=torch.empty(0))
    odc.initialize(torch.from_numpy(feats))
    core.initialize(torch.from_numpy(feats))
    changed = 0.0
    for idx, f in drifting_stream(1, 6, num_samples=N, batch=10)[1]:
        a = odc.step(torch.from_numpy(idx), torch.from_numpy(f))
        b = core.step(torch.from_numpy(idx), torch.from_numpy(f))
        assert a == b
        changed += a["change_ratio"]
    assert changed > 0
    for key, value in core.state_dict().items():
        got = odc.state_dict()[key]
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
    assert isinstance(odc.labels, torch.Tensor) and odc.labels.device.type == "cpu"


def test_fingerprint_tracks_every_change(feats: np.ndarray) -> None:
    odc = make()
    odc.initialize(torch.from_numpy(feats))
    seen = {odc.fingerprint()}
    for idx, f in drifting_stream(1, 3, num_samples=N, batch=10)[1]:
        odc.step(torch.from_numpy(idx), torch.from_numpy(f))
        seen.add(odc.fingerprint())
    assert len(seen) == 4
    odc.check_consistency()  # one process: trivially consistent
    odc.sync_from_rank0()


def test_state_dict_round_trips_through_torch_save_weights_only(feats: np.ndarray) -> None:
    odc = make()
    odc.initialize(torch.from_numpy(feats))
    odc.step(torch.arange(10), torch.from_numpy(feats[:10]))
    buf = io.BytesIO()
    torch.save(odc.state_dict(), buf)
    buf.seek(0)
    other = make()
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.fingerprint() == odc.fingerprint() and other.iteration == odc.iteration


def test_features_on_another_device_than_promised_raise(feats: np.ndarray) -> None:
    odc = make()
    odc.initialize(torch.from_numpy(feats))
    before = odc.fingerprint()
    with pytest.raises(ValueError, match="features is on meta, this memory expects it on cpu"):
        odc.step(torch.arange(4), torch.empty(4, D, device="meta"))
    with pytest.raises(ValueError, match="indices is on meta"):
        odc.step(torch.arange(4, device="meta"), torch.ones(4, D))
    assert odc.fingerprint() == before


@pytest.mark.parametrize(
    ("indices", "features", "error", "match"),
    [
        (torch.arange(4.0), torch.ones(4, D), TypeError, "indices"),
        (np.arange(4), torch.ones(4, D), TypeError, "indices must be a torch.Tensor"),
        (torch.arange(4), torch.ones(4, D + 1), ValueError, "features"),
        (torch.arange(4) + N, torch.ones(4, D), ValueError, "indices"),
        (torch.arange(4), torch.full((4, D), float("inf")), ValueError, "features"),
    ],
)
def test_bad_input_raises_and_changes_nothing(feats: np.ndarray, indices, features, error, match) -> None:
    odc = make()
    odc.initialize(torch.from_numpy(feats))
    before = odc.fingerprint()
    with pytest.raises(error, match=match):
        odc.step(indices, features)
    assert odc.fingerprint() == before


def test_constructor_checks() -> None:
    with pytest.raises(TypeError, match="dtype"):
        clt.OnlineDeepClustering(N, C, D, dtype=torch.int64, device="cpu")
    with pytest.raises(TypeError, match="like="):
        clt.OnlineDeepClustering(N, C, D, like=torch.empty(0))
    odc = clt.OnlineDeepClustering(N, C, D, device="cpu", dtype=torch.float64, min_cluster_size=1)
    assert odc.samples.dtype == torch.float64 and odc.world_size == 1


def test_memory_on_cpu_in_float64_accepts_float32_features(feats: np.ndarray) -> None:
    odc = clt.OnlineDeepClustering(N, C, D, device="cpu", dtype=torch.float64, min_cluster_size=1)
    odc.initialize(torch.from_numpy(feats))
    odc.step(torch.arange(3), torch.ones(3, D))
    assert odc.features.dtype == torch.float64


# ---------------------------------------------------------------------- modules
def test_odc_neck_pools_and_projects() -> None:
    neck = clt.ODCNeck(16, 32, 8)
    assert neck(torch.randn(4, 16, 3, 3)).shape == (4, 8)
    assert neck(torch.randn(4, 16)).shape == (4, 8)
    with pytest.raises(ValueError, match="feature maps"):
        neck(torch.randn(4, 16, 3))


def test_odc_head_loss_is_weighted_cross_entropy(feats: np.ndarray) -> None:
    odc = make()
    odc.initialize(torch.from_numpy(feats))
    head = clt.ODCHead(D, C)
    idx = torch.tensor([0, 5, 7, 7, 30])
    logits = head(torch.from_numpy(feats)[idx])
    y = odc.labels[idx]
    w = odc.loss_weights()
    logp = torch.log_softmax(logits, dim=1)
    want = -(w[y] * logp[torch.arange(5), y]).sum() / w[y].sum()
    # two float32 computations: each log-softmax entry off by γ_{C+2} (max|logit| + |log p|),
    # the weighted mean of 5 of them (weights ≥ 0) by γ_{12} relative
    lp_err = gamma(C + 2, torch.float32) * float(logits.abs().max() + logp.abs().max())
    atol = 2 * (lp_err + gamma(12, torch.float32) * float(want.abs()))
    torch.testing.assert_close(clt.ODCHead.loss(logits, idx, odc), want, rtol=0, atol=atol)
    before = head.fc.weight.clone()
    head.reset_parameters()
    assert not torch.equal(before, head.fc.weight)


def test_self_classifier_head_outputs_one_logit_matrix_per_head() -> None:
    head = clt.SelfClassifierHead(16, 32, 8, num_classes=(3, 5), num_layers=2, fixed_heads=True)
    out = head(torch.randn(6, 16, 2, 2))
    assert [o.shape for o in out] == [(6, 3), (6, 5)]
    torch.testing.assert_close(head.embed(torch.randn(6, 16)).norm(dim=1), torch.ones(6), rtol=0, atol=unit_norm_atol(8, torch.float32))
    assert not any(p.requires_grad for p in head.heads.parameters())
    assert all(p.requires_grad for p in head.projection.parameters())
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in head.projection) == 2
    with pytest.raises(ValueError, match="num_classes"):
        clt.SelfClassifierHead(16, 32, 8, num_classes=(1,))


def test_self_classifier_module_matches_core() -> None:
    gen = np.random.default_rng(2)
    a, b = (torch.from_numpy(gen.normal(size=(12, 7))).requires_grad_() for _ in range(2))
    got = clt.SelfClassifierLoss()(a, b)
    views = [a.detach().requires_grad_(), b.detach().requires_grad_()]
    want = cl.SelfClassifierLoss()(*views)
    grads = [g.numpy() for g in torch.autograd.grad(want, views)]
    bound = 2 * rounding_bounds([v.detach().numpy() for v in views], float(want), grads, np.float64)[0]  # two float64 computations
    torch.testing.assert_close(got.detach(), want.detach(), rtol=0, atol=bound)
    got.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


# ---------------------------------------------------------------------- data
def test_uniform_cluster_sampler_single_process() -> None:
    labels = torch.from_numpy(np.repeat(np.arange(4), [1, 2, 3, 20]))
    sampler = clt.UniformClusterSampler(labels, seed=3)
    assert len(sampler) == 26
    epoch0 = list(sampler)
    np.testing.assert_array_equal(epoch0, cl.UniformLabelSampler(labels, seed=3).epoch_indices(0))
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_labels(torch.zeros(26, dtype=torch.int64))
    assert sampler.epoch == 1 and sorted(sampler) != sorted(epoch0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(26)), batch_size=5, sampler=sampler)
    assert sum(len(b[0]) for b in loader) == 26
    with pytest.raises(ValueError, match="rank"):
        clt.UniformClusterSampler(labels, num_replicas=2, rank=2)


def test_uniform_cluster_sampler_explicit_shards_cover_the_epoch() -> None:
    labels = np.repeat(np.arange(3), [2, 5, 9])
    shards = [list(clt.UniformClusterSampler(labels, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    full = cl.UniformLabelSampler(labels, seed=1).epoch_indices(0)
    merged = np.empty(18, dtype=np.int64)
    for r in range(3):
        merged[r::3] = shards[r]
    np.testing.assert_array_equal(merged[:16], full)


def test_extract_features_in_dataset_order() -> None:
    x = torch.randn(13, 4)
    data = torch.utils.data.TensorDataset(x, torch.arange(13))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model.train()
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    got = clt.extract_features(model, loader, progress=False)
    assert model.training  # restored
    model.eval()
    # batches of 4 against all 13 rows: the GEMM may round differently (γ_5 (|x| |W|ᵀ + |b|),
    # bias included), then the eval-mode BatchNorm's affine map (3 u, times its scale)
    lin = model[0]
    bn = model[1]
    scale = (bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)).max()
    mag = (x.abs() @ lin.weight.abs().T + lin.bias.abs()).max()
    atol = float(2 * (gamma(5, torch.float32) * mag * scale + 3 * unit_roundoff(torch.float32) * got.abs().max()))
    torch.testing.assert_close(got, model(x).detach(), rtol=0, atol=atol)
    shuffled = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="fixed order"):
        clt.extract_features(model, shuffled, progress=False)
    dropped = torch.utils.data.DataLoader(data, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="never visited"):
        clt.extract_features(model, dropped, progress=False)
    with pytest.raises(TypeError, match="inputs_of"):
        clt.extract_features(model, torch.utils.data.DataLoader([{"x": v} for v in x], batch_size=4), progress=False)
    picked = clt.extract_features(model, torch.utils.data.DataLoader([{"x": v} for v in x], batch_size=4), inputs_of=lambda b: b["x"], progress=False)
    assert torch.equal(picked, got)  # the same batches through the same model


def test_odc_initialize_from_extracted_features() -> None:
    gen = np.random.default_rng(5)
    centres = gen.normal(size=(C, 4)) * 5
    truth = np.arange(N) % C
    x = torch.from_numpy((centres[truth] + gen.normal(size=(N, 4))).astype(np.float32))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, D)
    feats = clt.extract_features(model, torch.utils.data.DataLoader(x, batch_size=32), progress=False)
    odc = make()
    odc.initialize(feats)
    core = cl.OnlineDeepClustering(N, C, D, momentum=0.8, min_cluster_size=4, centroid_update_interval=2)
    core.initialize(feats.numpy())
    np.testing.assert_array_equal(odc.labels.numpy(), core.labels)
    assert cl.metrics.nmi(truth, core.labels) > 0.8


def test_odc_deprecated_names_warn_and_still_work() -> None:
    """The torch adapter keeps the old names of docs/glossary.md for one release: each warns
    (DeprecationWarning naming the new one) and does what the new name does."""
    gen = np.random.default_rng(6)
    feats = torch.from_numpy(gen.normal(size=(N, D)).astype(np.float32))
    new = make(metric="dot")
    new.initialize(feats, n_iter=3, init="random")
    with pytest.warns(DeprecationWarning, match="metric"):
        old = make(assign="dot")
    with pytest.warns(DeprecationWarning, match="n_iter"):
        old.initialize(feats, kmeans_iters=3, kmeans_init="random")
    assert old.metric == new.metric == "dot"
    assert old.fingerprint() == new.fingerprint()
    with pytest.warns(DeprecationWarning, match="centroid_memory"):
        assert old.centroids is old.centroid_memory


def test_odc_checkpoint_in_the_previous_state_dict_format_loads() -> None:
    """A torch checkpoint as the previous code wrote it (``torch.save`` of ``state_dict()``:
    tensors and Python numbers, the metric under its old key ``"assign"``; the state of
    tests/data/odc_stream_v0.npz) loads with ``torch.load(weights_only=True)``, the old key is
    checked, not ignored, and the run continues with the recorded statistics up to the first
    small-cluster handling (see tests/test_odc_state.py)."""
    with np.load(os.path.join(os.path.dirname(__file__), "data", "odc_stream_v0.npz")) as z:
        data = {k: z[k] for k in z.files}
    old = {k.split("/", 1)[1]: (torch.from_numpy(v) if v.ndim else v.item()) for k, v in data.items() if k.startswith("before/")}
    assert old["assign"] == "l2" and "metric" not in old
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    settings = ("momentum", "min_cluster_size", "centroid_update_interval", "small_cluster_interval", "seed", "resync_interval")
    n, c, d = (old[k] for k in ("num_samples", "num_clusters", "feat_dim"))
    with pytest.raises(ValueError, match=r"state\['metric'\] is 'l2', this object has 'dot'"):
        clt.OnlineDeepClustering(n, c, d, device="cpu", metric="dot", **{k: old[k] for k in settings}).load_state_dict(saved)
    odc = clt.OnlineDeepClustering(n, c, d, device="cpu", **{k: old[k] for k in settings})
    odc.load_state_dict(saved)
    assert odc.iteration == old["iteration"] and odc.state_dict()["metric"] == "l2"
    for idx, f, want in zip(data["indices"], data["features"], data["stats"]):
        s = odc.step(torch.from_numpy(idx), torch.from_numpy(f))
        assert [s["change_ratio"], s["num_small_clusters"], s["num_splits"], s["centroids_refreshed"]] == list(want)
        if want[1]:
            break
    else:
        raise AssertionError("the stream has no small-cluster handling")


def test_extract_features_follows_a_batch_sampler() -> None:
    x = torch.arange(6, dtype=torch.float32)[:, None]
    model = torch.nn.Linear(1, 1)
    torch.nn.init.ones_(model.weight)
    torch.nn.init.zeros_(model.bias)
    reversed_batches = [[5, 4], [3, 2], [1, 0]]
    got = clt.extract_features(model, torch.utils.data.DataLoader(x, batch_sampler=reversed_batches), progress=False)
    assert torch.equal(got, x)  # 1 · x + 0 is exact
    shuffled = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(x), batch_size=2, drop_last=False)
    with pytest.raises(ValueError, match="fixed order"):
        clt.extract_features(model, torch.utils.data.DataLoader(x, batch_sampler=shuffled), progress=False)
