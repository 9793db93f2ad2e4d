"""Hostile inputs to the core: every rejected call raises ValueError/TypeError naming the
argument and leaves the state exactly as it was; accepted edge cases give exact answers.

The "no half-update" properties deep-copy the state, feed one corruption of a valid input
(drawn by hypothesis from a catalogue of kinds), and compare the state bit for bit.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import clusterlearn as cl

from bounds import gamma, reweight_rtol, whitening_bounds

pytestmark = [
    pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),  # NumPy's, before our error
]

N, C, D, BATCH = 120, 4, 6, 16


def _features(seed: int, n: int = N, d: int = D, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(dtype)


def _ready(**kwargs) -> cl.OnlineDeepClustering:
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, **kwargs)
    odc.initialize(_features(0))
    return odc


def _bits(odc: cl.OnlineDeepClustering) -> dict[str, bytes]:
    """Every array of the state as raw bytes (exact comparison, NaN- and sign-of-zero-aware)."""
    s, c = odc.samples, odc.centroid_memory
    arrays = {
        "features": s.features, "labels": s.labels, "centroids": c.centroids, "sizes": c.sizes,
        "sums": c.sums, "half_sq_norms": c._half_sq_norms,
    }
    out = {k: np.ascontiguousarray(cl.backend.to_numpy(v)).tobytes() for k, v in arrays.items()}
    out["iteration"] = str(odc.iteration).encode()
    out["initialized"] = str(s.initialized).encode()
    return out


# ---------------------------------------------------------------------------- step
def _masked(x):
    return np.ma.masked_array(x, mask=np.zeros(x.shape, dtype=bool))


def _bf16(x):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return x.astype(ml_dtypes.bfloat16)


def _with(x, pos, value):
    x = x.astype(np.float32, copy=True)
    x.flat[pos % x.size] = value
    return x


def _zero_row(x, pos):
    x = x.copy()
    x[pos % x.shape[0]] = 0
    return x


# (argument the message must name, corruption of (indices, features, position))
STEP_CORRUPTIONS = {
    "indices None": ("indices", lambda i, f, p: (None, f)),
    "indices list": ("indices", lambda i, f, p: (i.tolist(), f)),
    "indices float": ("indices", lambda i, f, p: (i.astype(np.float64), f)),
    "indices bool": ("indices", lambda i, f, p: (i % 2 == 0, f)),
    "indices 2-D": ("indices", lambda i, f, p: (i[:, None], f)),
    "indices 0-d": ("indices", lambda i, f, p: (i[0], f[:1])),
    "indices empty": ("indices", lambda i, f, p: (i[:0], f[:0])),
    "indices too large": ("indices", lambda i, f, p: (_set(i, p, N + p), f)),
    "indices negative": ("indices", lambda i, f, p: (_set(i, p, -1 - p), f)),
    "indices masked": ("indices", lambda i, f, p: (_masked(i), f)),
    "indices str": ("indices", lambda i, f, p: (i.astype(str), f)),
    "indices object": ("indices", lambda i, f, p: (i.astype(object), f)),
    "features None": ("features", lambda i, f, p: (i, None)),
    "features list": ("features", lambda i, f, p: (i, f.tolist())),
    "features int": ("features", lambda i, f, p: (i, f.astype(np.int64))),
    "features complex": ("features", lambda i, f, p: (i, f.astype(np.complex64))),
    "features 1-D": ("features", lambda i, f, p: (i, f[:, 0])),
    "features 3-D": ("features", lambda i, f, p: (i, f[:, :, None])),
    "features wrong D": ("features", lambda i, f, p: (i, f[:, :-1])),
    "features wrong rows": ("features", lambda i, f, p: (i, f[:-1])),
    "features NaN": ("features", lambda i, f, p: (i, _with(f, p, np.nan))),
    "features +inf": ("features", lambda i, f, p: (i, _with(f, p, np.inf))),
    "features -inf": ("features", lambda i, f, p: (i, _with(f, p, -np.inf))),
    "features beyond float32": ("features", lambda i, f, p: (i, _set(f.astype(np.float64), p, 1e39))),
    "features zero row": ("features", lambda i, f, p: (i, _zero_row(f, p))),
    "features masked": ("features", lambda i, f, p: (i, _masked(f))),
    "features matrix": ("features", lambda i, f, p: (i, np.asmatrix(f))),
    "features bfloat16 (ml_dtypes)": ("features", lambda i, f, p: (i, _bf16(f))),
}


def _set(x, pos, value):
    x = x.copy()
    x[pos % x.shape[0]] = value
    return x


@given(kind=st.sampled_from(sorted(STEP_CORRUPTIONS)), pos=st.integers(0, 10**6), seed=st.integers(0, 3))
def test_step_rejects_hostile_batches_without_changing_state(kind, pos, seed):
    odc = _ready()
    odc.step(np.arange(BATCH), _features(seed, BATCH))  # a state that has moved
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, N, size=BATCH)
    feats = _features(seed + 1, BATCH)
    name, corrupt = STEP_CORRUPTIONS[kind]
    bad_idx, bad_feats = corrupt(idx, feats, pos)
    before = copy.deepcopy(_bits(odc))
    with pytest.raises((ValueError, TypeError)) as err:
        odc.step(bad_idx, bad_feats)
    assert name in str(err.value), (kind, str(err.value))
    assert _bits(odc) == before, kind


def test_masked_features_rejected_before_the_memory_is_written():
    """The reported case: a MaskedArray used to be written into the memory, then fail."""
    odc = _ready()
    before = _bits(odc)
    with pytest.raises(TypeError, match="features.*MaskedArray"):
        odc.step(np.arange(4), np.ma.masked_array(_features(1, 4)))
    assert _bits(odc) == before


@pytest.mark.parametrize("call", ["labels_of", "initialize"])
def test_none_and_subclasses_are_named(call):
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5)
    arg = "indices" if call == "labels_of" else "features"
    if call == "labels_of":
        odc.initialize(_features(0))
    for bad in (None, np.ma.masked_array(np.arange(N)), np.asmatrix(np.arange(N))):
        with pytest.raises(TypeError, match=arg):
            getattr(odc, call)(bad)


def test_jax_tracer_into_the_core_is_named():
    jax = pytest.importorskip("jax")
    odc = _ready()
    before = _bits(odc)

    idx = jax.numpy.arange(4)  # concrete: captured from outside jit

    def inside(f):
        odc.step(idx, f)
        return f

    with pytest.raises(TypeError, match="features is a JAX tracer"):
        jax.jit(inside)(jax.numpy.asarray(_features(1, 4)))
    assert _bits(odc) == before


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "uint64"])
def test_torch_wide_unsigned_indices_are_type_errors(dtype):
    torch = pytest.importorskip("torch")
    odc = _ready()
    before = _bits(odc)
    idx = torch.arange(4).to(getattr(torch, dtype))
    with pytest.raises(TypeError, match="indices must have an integer dtype"):
        odc.step(idx, torch.from_numpy(_features(1, 4)))
    with pytest.raises(TypeError, match="indices"):
        odc.labels_of(idx)
    assert _bits(odc) == before


@pytest.mark.parametrize("kind", ["float8", "sparse"])
def test_torch_float8_and_sparse_features_are_type_errors(kind):
    torch = pytest.importorskip("torch")
    odc = _ready()
    before = _bits(odc)
    f = torch.from_numpy(_features(1, 4))
    f = f.to(torch.float8_e4m3fn) if kind == "float8" else f.to_sparse()
    with pytest.raises(TypeError, match="features"):
        odc.step(torch.arange(4), f)
    assert _bits(odc) == before


# ---------------------------------------------------------------------------- initialize
def test_initialize_refuses_a_zero_row_and_stays_uninitialized():
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5)
    x = _features(0)
    x[7] = 0
    with pytest.raises(ValueError, match="features has an all-zero row.*row 7"):
        odc.initialize(x)
    assert not odc.samples.initialized
    with pytest.raises(cl.NotInitializedError):
        odc.step(np.arange(4), _features(1, 4))


def test_antipodal_update_keeps_the_stored_row():
    """D = 1, m = 0.5: a fresh feature opposite to the stored one blends to exactly zero."""
    odc = cl.OnlineDeepClustering(8, 2, 1, min_cluster_size=0, momentum=0.5)
    odc.initialize(np.array([[1.0], [2.0], [3.0], [1.0], [-1.0], [-2.0], [-1.0], [-4.0]], dtype=np.float32))
    old = np.asarray(odc.features).copy()
    idx = np.array([0, 4, 5])
    odc.step(idx, -old[idx] * 3)
    after = np.asarray(odc.features)
    np.testing.assert_array_equal(after[idx], old[idx])  # kept, not zeroed
    assert np.all(np.abs(after) == 1)
    sums = np.zeros((2, 1))
    np.add.at(sums, np.asarray(odc.labels), after.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(odc.centroid_memory.sums), sums)  # +-1 sums are exact


def test_momentum_update_never_returns_a_zero_row():
    old = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    new = np.array([[-2.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(cl.momentum_update(old, new, 0.5)[0], old[0])  # antipodal at m = 0.5
    out = cl.momentum_update(old, new, 1.0)
    np.testing.assert_array_equal(out[0], [-1.0, 0.0])  # m = 1 takes the fresh direction
    np.testing.assert_array_equal(out[1], old[1])  # a zero fresh feature at m = 1 has none


# ---------------------------------------------------------------------------- repeated indices
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(2, 40),
    distinct=st.integers(1, 6),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_merged_duplicates_are_bit_for_bit_order_independent(seed, batch, distinct, dtype):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, distinct, size=batch)
    f = (rng.normal(size=(batch, D)) * rng.choice([1e-3, 1.0, 1e3], size=(batch, 1))).astype(dtype)
    f[rng.random(f.shape) < 0.1] = 0  # zeros of either sign
    f[rng.random(f.shape) < 0.1] *= -0.0
    ref = cl.merge_duplicates(idx, f)
    for _ in range(3):
        perm = rng.permutation(batch)
        got = cl.merge_duplicates(idx[perm], f[perm])
        np.testing.assert_array_equal(got[0], ref[0])
        assert got[1].tobytes() == ref[1].tobytes()


def test_merged_duplicates_are_the_normalised_mean():
    f = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, -5.0]])
    s, merged, first, lead = cl.merge_duplicates(np.array([2, 0, 2, 5]), f)
    np.testing.assert_array_equal(s, [0, 2, 2, 5])
    np.testing.assert_array_equal(first, [True, True, False, True])
    np.testing.assert_array_equal(lead, [0, 1, 1, 3])
    mean = np.array([0.6, 0.8]) + np.array([0.0, 1.0])
    np.testing.assert_allclose(merged, [[1, 0], mean / np.linalg.norm(mean), mean / np.linalg.norm(mean), [0, -1]],
                               rtol=4 * np.finfo(np.float64).eps)


def test_permuted_batch_gives_bit_identical_float64_memory():
    rng = np.random.default_rng(11)
    x0 = rng.normal(size=(N, D))
    idx = rng.integers(0, 8, size=48)
    f = rng.normal(size=(48, D))
    states = []
    for perm in (np.arange(48), rng.permutation(48), rng.permutation(48)):
        odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, like=np.zeros(1))  # float64 memory
        odc.initialize(x0)
        odc.step(idx[perm], f[perm])
        states.append(_bits(odc))
    assert states[0] == states[1] == states[2]


# ---------------------------------------------------------------------------- checkpoints
def _corrupt_state(state: dict, kind: str, pos: int) -> tuple[dict, str]:
    """A copy of ``state`` with one defect; returns it and the key the message must name."""
    s = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    k = s["sizes"].shape[0]
    cluster = int(np.flatnonzero(s["sizes"] > 0)[pos % int(np.sum(s["sizes"] > 0))])
    row = pos % s["features"].shape[0]
    if kind == "sums shifted":
        s["sums"][cluster, pos % D] += 1e-3 * max(int(s["sizes"][cluster]), 1)
    elif kind == "sums of another run":
        s["sums"] = s["sums"][::-1].copy()
        if np.array_equal(s["sums"], state["sums"]):
            s["sums"][0, 0] += 1.0
    elif kind == "features not unit":
        s["features"][row] *= 1.01
    elif kind == "features norm 1000":
        s["features"] *= 1000
    elif kind == "features zero row":
        s["features"][row] = 0
    elif kind == "features NaN":
        s["features"][row, 0] = np.nan
    elif kind == "centroids inf":
        s["centroids"][pos % k, 0] = np.inf
    elif kind == "centroids too long":
        s["centroids"][pos % k] = 0
        s["centroids"][pos % k, 0] = 1.5
    elif kind == "sizes off by one":
        s["sizes"][cluster] += 1
    elif kind == "sizes list":
        s["sizes"] = s["sizes"].tolist()
    elif kind == "sizes float":
        s["sizes"] = s["sizes"].astype(np.float64)
    elif kind == "labels out of range":
        s["labels"][row] = k
    elif kind == "labels float":
        s["labels"] = s["labels"].astype(np.float32)
    elif kind == "iteration negative":
        s["iteration"] = -1
    elif kind == "iteration array":
        s["iteration"] = np.array([3, 4])
    elif kind == "momentum differs":
        s["momentum"] = 0.25
    elif kind == "features None":
        s["features"] = None
    elif kind == "sums masked":
        s["sums"] = np.ma.masked_array(s["sums"])
    else:
        raise AssertionError(kind)
    key = kind.split()[0]
    return s, key


STATE_CORRUPTIONS = [
    "sums shifted", "sums of another run", "features not unit", "features norm 1000", "features zero row",
    "features NaN", "centroids inf", "centroids too long", "sizes off by one", "sizes list", "sizes float",
    "labels out of range", "labels float", "iteration negative", "iteration array", "momentum differs",
    "features None", "sums masked",
]


@given(kind=st.sampled_from(STATE_CORRUPTIONS), pos=st.integers(0, 10**6))
def test_load_state_dict_refuses_inconsistent_checkpoints_without_changing_state(kind, pos):
    source = _ready()
    for seed in range(3):
        source.step(np.random.default_rng(seed).integers(0, N, BATCH), _features(seed, BATCH))
    bad, key = _corrupt_state(source.state_dict(), kind, pos)
    target = _ready(seed=0)
    target.step(np.arange(BATCH), _features(9, BATCH))
    before = copy.deepcopy(_bits(target))
    with pytest.raises((ValueError, TypeError)) as err:
        target.load_state_dict(bad)
    assert f"state[{key!r}]" in str(err.value), (kind, str(err.value))
    assert _bits(target) == before, kind


def test_load_state_dict_reports_how_far_the_sums_are_off():
    odc = _ready()
    state = odc.state_dict()
    state["sums"][1] *= 1.1
    with pytest.raises(ValueError, match=r"state\['sums'\].*cluster 1 is off by"):
        _ready().load_state_dict(state)


def test_load_state_dict_accepts_numpy_scalars_of_settings_and_float32_sums():
    """np.savez returns 0-d arrays and NumPy scalars (np.str_ for ``metric``); JAX without x64
    keeps float32 sums, which differ from exact float64 sums by rounding only."""
    odc = _ready()
    odc.step(np.arange(BATCH), _features(3, BATCH))
    state = odc.state_dict()
    state = {k: (np.asarray(v) if not isinstance(v, np.ndarray) else v) for k, v in state.items()}
    state["metric"] = np.str_(odc.metric)
    state["sums"] = state["sums"].astype(np.float32)
    other = _ready()
    other.load_state_dict(state)
    np.testing.assert_array_equal(np.asarray(other.labels), np.asarray(odc.labels))


# ---------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("backend", ["array", "faiss"])
@pytest.mark.parametrize("exponent", [-100, -60, 60, 100, 126])
def test_kmeans_is_exactly_scale_equivariant_at_any_float32_magnitude(backend, exponent):
    if backend == "faiss":
        pytest.importorskip("faiss")
    x = _features(4, 300, 5) * np.float32(0.25)  # max |x| below 2, so x * 2**126 stays finite
    assert np.abs(x).max() < 2
    scaled = x * np.float32(2.0**exponent)
    assert np.isfinite(scaled).all() and np.array_equal(scaled / np.float32(2.0**exponent), x)
    init = "random" if backend == "faiss" else None
    ref = cl.kmeans(x, 4, backend=backend, init=init, seed=1)
    got = cl.kmeans(scaled, 4, backend=backend, init=init, seed=1)
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_array_equal(got.centroids, ref.centroids * np.float32(2.0**exponent))
    assert got.inertia == ref.inertia * 4.0**exponent


@pytest.mark.parametrize("backend", ["array", "faiss", "auto"])
def test_kmeans_near_float32_max_is_finite(backend):
    """The reported case: |x| ~ 1e37 gave NaN (array) or killed the process (faiss)."""
    if backend != "array":
        pytest.importorskip("faiss")
    x = _features(5, 200, 4) * np.float32(1e37)
    r = cl.kmeans(x, 3, backend=backend, init=None if backend == "array" else "random")
    assert np.isfinite(r.centroids).all() and np.isfinite(r.inertia)
    assert np.bincount(r.labels, minlength=3).min() > 0


KMEANS_BAD = {
    "None": (lambda x: None, TypeError),
    "masked": (lambda x: np.ma.masked_array(x), TypeError),
    "bfloat16": (lambda x: _bf16(x), TypeError),
    "NaN": (lambda x: _with(x, 3, np.nan), ValueError),
    "1-D": (lambda x: x[:, 0], ValueError),
    "int": (lambda x: x.astype(np.int32), TypeError),
    "list": (lambda x: x.tolist(), TypeError),
}


@pytest.mark.parametrize("kind", sorted(KMEANS_BAD))
def test_kmeans_hostile_x_is_named(kind):
    make, error = KMEANS_BAD[kind]
    with pytest.raises(error, match="x"):
        cl.kmeans(make(_features(6, 40, 3)), 3)


# ---------------------------------------------------------------------------- loss weights
@pytest.mark.parametrize("power", [40.0, 200.0, 1e6, 1e300])
def test_loss_weights_stay_finite_for_large_powers(power):
    sizes = np.array([50, 51, 0, 49, 60, 49])
    w = np.asarray(cl.loss_weights(sizes, power))
    # w = exp(a − logsumexp(a)): the logsumexp's γ_{C+2} error shifts every weight alike, each
    # exp and the sum add γ_{C+2}
    assert np.isfinite(w).all() and abs(float(w.sum()) - 1) <= gamma(2 * len(sizes) + 4, w.dtype)
    assert w[2] == 0 and w[3] == w[5] == w.max()  # all weight goes to the smallest clusters


@pytest.mark.parametrize("power", [float("inf"), float("nan"), -1.0])
def test_non_finite_or_negative_power_is_refused(power):
    with pytest.raises(ValueError, match="^power"):
        cl.loss_weights(np.array([3, 4]), power)
    with pytest.raises(ValueError, match="reweight_power"):
        cl.OnlineDeepClustering(N, C, D, reweight_power=power)


def test_loss_weights_equal_the_power_law_where_it_is_representable():
    sizes = np.array([1, 4, 0, 9, 100])
    w = np.asarray(cl.loss_weights(sizes, 0.5), dtype=np.float64)
    want = np.where(sizes > 0, np.maximum(sizes, 1) ** -0.5, 0)
    np.testing.assert_allclose(w, want / want.sum(), rtol=reweight_rtol(5, 0.5, 100, np.float32), atol=0)


# ---------------------------------------------------------------------------- PCA
def test_pca_transform_before_fit_is_a_value_error():
    with pytest.raises(ValueError, match="before fit"):
        cl.PCAWhitening(2).transform(_features(0, 10, 4))


@pytest.mark.parametrize("exponent", [-100, -60, 60, 120])
def test_pca_whitening_is_exactly_scale_invariant(exponent):
    """Whitening removes the scale (eps is relative): float32 data near 1e36 or 1e-30 give the
    output of the unscaled data, bit for bit (powers of two scale every rounding exactly)."""
    x = _features(7, 80, 6) * np.float32(0.25)
    scaled = x * np.float32(2.0**exponent)
    assert np.array_equal(scaled / np.float32(2.0**exponent), x)
    ref = cl.PCAWhitening(3).fit(x)
    got = cl.PCAWhitening(3).fit(scaled)
    np.testing.assert_array_equal(got.transform(scaled), ref.transform(x))
    np.testing.assert_array_equal(got.mean_, ref.mean_ * 2.0**exponent)
    labels = cl.DeepClusterLabeler(3, pca_dim=3, backend="array")(scaled).labels
    np.testing.assert_array_equal(labels, cl.DeepClusterLabeler(3, pca_dim=3, backend="array")(x).labels)


def test_pca_of_float64_data_near_its_maximum_is_finite():
    x = _features(8, 50, 4).astype(np.float64) * 1e300
    z = cl.PCAWhitening(2).fit_transform(x)
    # x / 1e300 rounds each entry (2 u on the covariance): a refit's bound
    atol = whitening_bounds(x / 1e300, 2, np.float64, np.float64)["refit"]
    np.testing.assert_allclose(z, cl.PCAWhitening(2).fit_transform(x / 1e300), rtol=0, atol=atol)


@pytest.mark.parametrize(("kwargs", "name"), [({"n_iter": -1}, "n_iter"), ({"n_iter": 1.5}, "n_iter"),
                                              ({"init": "x"}, "init")])
def test_initialize_names_its_own_kmeans_arguments(kwargs, name):
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5)
    with pytest.raises((ValueError, TypeError), match=name):
        odc.initialize(_features(0), **kwargs)
    assert not odc.samples.initialized


@pytest.mark.parametrize("memory", ["numpy", "jax-bfloat16"])
def test_jax_bfloat16_features_initialize_step_and_round_trip(memory):
    """JAX bfloat16 arrives on the host as an ml_dtypes array; the memory casts it to its own
    dtype before k-means (initialize used to hand the ml_dtypes array to k-means)."""
    jnp = pytest.importorskip("jax.numpy")
    like = None if memory == "numpy" else jnp.zeros(1, dtype=jnp.bfloat16)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, like=like)
    odc.initialize(jnp.asarray(_features(0), dtype=jnp.bfloat16))
    odc.step(jnp.arange(BATCH), jnp.asarray(-_features(0)[:BATCH], dtype=jnp.bfloat16))
    other = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, like=like)
    other.load_state_dict(odc.state_dict())
    assert _bits(other) == _bits(odc)


def test_self_classifier_loss_names_unsupported_logits():
    torch = pytest.importorskip("torch")
    a = torch.from_numpy(_features(1, 8, 5))
    with pytest.raises(TypeError, match=r"logits\[0\] must have a real floating dtype"):
        cl.self_classifier_loss([a.to(torch.float8_e4m3fn), a.to(torch.float8_e4m3fn)])  # was NotImplementedError
    with pytest.raises(TypeError, match=r"logits\[1\].*MaskedArray"):
        cl.self_classifier_loss([a.numpy(), np.ma.masked_array(a.numpy())])


def test_memory_mapped_features_are_accepted(tmp_path):
    """np.load(..., mmap_mode="r") gives a numpy.memmap: an ndarray subclass that is welcome."""
    np.save(tmp_path / "f.npy", _features(0))
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert type(mapped) is np.memmap
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5)
    odc.initialize(mapped)
    ref = _ready()
    assert _bits(odc) == _bits(ref)


def test_kmeans_of_float16_data_whose_squares_overflow():
    """float16 squares overflow at 256: |x| ~ 100 gave inf distances; rescaled, it clusters as
    the same data at |x| ~ 100 / 128 (a power of two, so the labels are the same)."""
    x = (_features(9, 200, 8) * 100).astype(np.float16)
    assert np.isinf(np.float16(x.max()) * np.float16(x.max()))
    got = cl.kmeans(x, 3, backend="array")
    ref = cl.kmeans(x / np.float16(128), 3, backend="array")
    assert np.isfinite(got.centroids).all() and np.isfinite(got.inertia)
    np.testing.assert_array_equal(got.labels, ref.labels)
    np.testing.assert_array_equal(got.centroids, ref.centroids * np.float16(128))
