"""JAX adapter: the jitted ODC step against the core, small clusters, conversions, 2 devices.

Streams drag features towards two attractors (tests/streams.py), so labels really change,
clusters shrink below the threshold and get re-seeded; batches repeat indices (DDP padding).
Momenta are 0.2 and 0.8 so that a swap of m and 1 - m is caught. The 2-device checks run in
a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set before JAX starts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import clusterlearn as cl  # noqa: E402
from clusterlearn import backend as B  # noqa: E402
from clusterlearn.adapters import _native  # noqa: E402
from clusterlearn.adapters import jax as clj  # noqa: E402

from bounds import linear_head_bounds, momentum_feature_atol, reweight_rtol, rounding_bounds, running_sum_atol, unit_roundoff  # noqa: E402
from streams import BATCH, C, D, N  # noqa: E402
from streams import drifting_stream as make_stream  # noqa: E402
from xla_flags import with_devices  # noqa: E402


def core(like=None, **kw):
    odc = cl.OnlineDeepClustering(N, C, D, **{"momentum": 0.8, "min_cluster_size": 0, **kw}, like=like)
    return odc


def odc_atols(state: clj.ODCState, momentum: float) -> dict[str, float]:
    """Bounds on the JAX state's float entries against a second computation after
    ``state.iteration`` steps (one feature update per step at most): features by the momentum
    rule (two computations), sums by each side's drift (n initial additions, then ≤ 4 n a step:
    the step's and the small-cluster handling's moves, −old and +new; partial sums ≤ n) plus
    each member's feature error, centroids (sums / sizes, refreshed) by both and 2u."""
    n, steps = state.labels.shape[0], int(state.iteration)
    features = momentum_feature_atol(D, momentum, steps, np.float32)
    drift = running_sum_atol(n + 4 * n * steps, n, state.sums.dtype)
    sums = 2 * drift + n * features
    return {"features": features, "sums": sums, "centroids": sums + 2 * unit_roundoff(np.float32)}


def assert_state_matches_core(state: clj.ODCState, odc: cl.OnlineDeepClustering) -> None:
    np.testing.assert_array_equal(np.asarray(state.labels), B.to_numpy(odc.labels))
    np.testing.assert_array_equal(np.asarray(state.sizes), B.to_numpy(odc.cluster_sizes))
    atol = odc_atols(state, odc.momentum)
    np.testing.assert_allclose(np.asarray(state.features), B.to_numpy(odc.features), rtol=0, atol=atol["features"])
    np.testing.assert_allclose(np.asarray(state.centroids), B.to_numpy(odc.centroid_memory.centroids), rtol=0, atol=atol["centroids"])
    np.testing.assert_allclose(np.asarray(state.sums), B.to_numpy(odc.centroid_memory.sums), rtol=0, atol=atol["sums"])
    assert int(state.iteration) == odc.iteration


def run_both(odc, state, config, batches, conv=np.asarray):
    """Step the core and the JAX state side by side; returns the state and counters."""
    seen = {"changed": 0, "small": 0, "refreshed": 0}
    for idx, f in batches:
        want = odc.step(conv(idx), conv(f))
        state, stats = clj.step(state, jnp.asarray(idx), jnp.asarray(f), config)
        assert int(stats["num_changed"]) / int(stats["num_distinct"]) == want["change_ratio"]
        assert float(stats["change_ratio"]) == pytest.approx(want["change_ratio"], rel=unit_roundoff(np.float32), abs=0)  # one float32 division
        assert bool(stats["centroids_refreshed"]) == want["centroids_refreshed"]
        state, handled = clj.small_cluster_step(state, config)  # the core's schedule
        assert (handled.num_small_clusters, handled.num_splits) == (want["num_small_clusters"], want["num_splits"])
        assert_state_matches_core(state, odc)
        rtol = 2 * reweight_rtol(C, odc.reweight_power, N, np.float32)  # two float32 computations
        np.testing.assert_allclose(np.asarray(clj.loss_weights(state, config)), B.to_numpy(odc.loss_weights()), rtol=rtol, atol=0)
        seen["changed"] += int(stats["num_changed"])
        seen["small"] += handled.num_small_clusters
        seen["refreshed"] += bool(stats["centroids_refreshed"])
    return state, seen


@pytest.mark.parametrize(
    ("momentum", "metric", "resync", "min_size"),
    [(0.2, "l2", 3, N // (2 * C)), (0.8, "dot", None, N // (2 * C)), (0.8, "l2", None, N // C)],
)
def test_jitted_step_equals_numpy_core(momentum, metric, resync, min_size):
    """Labels, sizes exactly; features, centroids, sums closely; stats equal; every step."""
    x0, batches = make_stream(int(momentum * 10) + len(metric), steps=36)  # long enough for small clusters to form
    odc = core(momentum=momentum, metric=metric, resync_interval=resync, min_cluster_size=min_size,
               centroid_update_interval=3, small_cluster_interval=2, seed=5)
    odc.initialize(x0)
    config, state = clj.config_from_core(odc), clj.state_from_core(odc)
    assert config.momentum == momentum and config.metric == metric and config.resync_interval == resync
    _, seen = run_both(odc, state, config, batches)
    assert seen["changed"] > 0 and seen["refreshed"] == 12, seen  # labels really changed
    assert seen["small"] > 0, seen  # the handler really ran


def test_jitted_step_equals_jax_core():
    """Against the core on JAX arrays (float32 sums, resync every 2 steps; eager, so short)."""
    x0, batches = make_stream(3, steps=3)
    kw = dict(momentum=0.2, centroid_update_interval=1, resync_interval=2)
    start = core(**kw)
    start.initialize(x0)  # NumPy k-means: eager JAX k-means compiles for seconds
    odc = core(**kw, like=jnp.zeros(1))
    odc.load_state_dict(start.state_dict())
    config, state = clj.config_from_core(odc), clj.state_from_core(odc)
    _, seen = run_both(odc, state, config, batches, conv=jnp.asarray)
    assert seen["changed"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_handling_equals_the_core_on_jax_arrays(dtype):
    """Given the same state, the adapter's ``handle_small_clusters`` and the core's handler on
    JAX arrays (which computes on host copies) hand back the same bits, bfloat16 included."""
    x0, _ = make_stream(4, steps=0)
    labels = cl.kmeans(cl.l2_normalize(x0), C, seed=0).labels.astype(np.int64)
    labels[labels == 1] = 0  # cluster 1 empty, cluster 2 cut to 3 members
    labels[np.flatnonzero(labels == 2)[3:]] = 3
    odc = core(like=jnp.zeros(1, dtype=getattr(jnp, dtype)))  # min_cluster_size 0: initialised unhandled
    odc.initialize(jnp.asarray(x0), jnp.asarray(labels))
    config = dataclasses.replace(clj.config_from_core(odc), min_cluster_size=20)
    got, stats = clj.handle_small_clusters(clj.state_from_core(odc), config, key=3)
    want = cl.SmallClusterHandler(20, metric=config.metric, seed=config.seed)(odc.samples, odc.centroid_memory, key=3)
    assert stats == want and want.num_small_clusters == 2
    for name in ("labels", "centroids", "sizes", "sums"):
        g, w = getattr(got, name), getattr(odc.state, name)
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(np.asarray(g).view(np.uint8), np.asarray(w).view(np.uint8), err_msg=name)


def test_default_resync_follows_the_sums_dtype():
    """Core default (float64 sums: never) maps to None: float32 JAX sums resync every 1000."""
    odc = core()
    odc.initialize(make_stream(0, 0)[0])
    config = clj.config_from_core(odc)
    assert odc.resync_interval == 0 and config.resync_interval is None
    assert config.resync_every(jnp.float32) == clj.DEFAULT_FLOAT32_RESYNC and config.resync_every(jnp.float64) == 0
    with jax.enable_x64(True):
        state = clj.state_from_core(odc)
        assert state.sums.dtype == jnp.float64 and state.labels.dtype == jnp.int64
        idx, f = make_stream(0, 1)[1][0]
        state, _ = clj.step(state, jnp.asarray(idx), jnp.asarray(f), config)
        odc.step(idx, f)
        np.testing.assert_allclose(np.asarray(state.sums), odc.centroid_memory.sums, rtol=0, atol=odc_atols(state, odc.momentum)["sums"])


def test_duplicates_merged_as_the_core_and_counted_once():
    x0, _ = make_stream(2, steps=0)
    rng = np.random.default_rng(2)
    idx = np.array([5, 9, 5, 17, 9, 5])
    f = rng.normal(size=(6, D)).astype(np.float32)
    odc = core(momentum=0.2)
    odc.initialize(x0)
    config, state = clj.config_from_core(odc), clj.state_from_core(odc)
    want = odc.step(idx, f)
    perm = rng.permutation(6)
    state, stats = clj.step(state, jnp.asarray(idx[perm]), jnp.asarray(f[perm]), config)
    assert int(stats["num_distinct"]) == 3
    assert float(stats["change_ratio"]) == pytest.approx(want["change_ratio"], rel=unit_roundoff(np.float32), abs=0)
    assert_state_matches_core(state, odc)


def test_step_compiles_once_per_config_and_batch_shape():
    x0, batches = make_stream(4, steps=5)
    odc = core(seed=11)  # a config no other test uses: a fresh cache entry
    odc.initialize(x0)
    config, state = clj.config_from_core(odc), clj.state_from_core(odc)
    before = clj.step._cache_size()
    for idx, f in batches:
        state, _ = clj.step(state, jnp.asarray(idx), jnp.asarray(f), config)
    assert clj.step._cache_size() == before + 1


def test_norms_from_their_own_program_give_the_bits_of_the_core_step():
    """The adapter computes the centroids' half squared norms in a program of their own and
    passes them to the step: every state equals the core's traced step (which computes them
    inside) bit for bit, through refreshes and small-cluster handling."""
    from clusterlearn import odc_state

    x0, batches = make_stream(8, steps=12)
    odc = core(momentum=0.2, min_cluster_size=N // C, centroid_update_interval=2)
    odc.initialize(x0)
    config = clj.config_from_core(odc)
    state, twin = clj.state_from_core(odc), clj.state_from_core(odc)
    core_step = jax.jit(lambda s, i, f: odc_state.step(s, i, f, config))
    handled = 0
    for idx, f in batches:
        state, got = clj.step(state, jnp.asarray(idx), jnp.asarray(f), config)
        twin, want = core_step(twin, jnp.asarray(idx), jnp.asarray(f))
        assert {k: np.asarray(v).item() for k, v in got.items()} == {k: np.asarray(v).item() for k, v in want.items()}
        state, done = clj.small_cluster_step(state, config)
        twin, _ = clj.small_cluster_step(twin, config)
        handled += done.num_small_clusters
        for name, a, b in zip(clj.ODCState._fields, state, twin):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert handled > 0


def test_load_into_core_continues_the_run():
    x0, batches = make_stream(6, steps=6)
    kw = dict(momentum=0.2, min_cluster_size=10, centroid_update_interval=2)
    odc = core(**kw)
    odc.initialize(x0)
    config, state = clj.config_from_core(odc), clj.state_from_core(odc)
    for idx, f in batches[:3]:
        state, _ = clj.step(state, jnp.asarray(idx), jnp.asarray(f), config)
        state, _ = clj.handle_small_clusters(state, config)
    with pytest.raises(ValueError, match="momentum"):
        clj.load_into_core(core(**{**kw, "momentum": 0.35}), state, config)
    resumed = core(**kw)
    clj.load_into_core(resumed, state, config)
    assert_state_matches_core(state, resumed)
    run_both(resumed, state, config, batches[3:])  # donates state


def test_resync_recomputes_exact_sums():
    odc = core()
    odc.initialize(make_stream(7, 0)[0])
    state = clj.state_from_core(odc)
    broken = state._replace(sums=state.sums + 1.0, sizes=state.sizes * 0)
    fixed = clj.resync(broken)
    np.testing.assert_array_equal(np.asarray(fixed.sizes), np.bincount(np.asarray(state.labels), minlength=C))
    # N float32 unit vectors summed in float32 against float64: γ_N · (largest cluster)
    np.testing.assert_allclose(np.asarray(fixed.sums), odc.centroid_memory.sums, rtol=0, atol=running_sum_atol(N, N, np.float32))


def test_handle_small_clusters_leaves_a_healthy_state_alone():
    odc = core(min_cluster_size=5)
    odc.initialize(make_stream(8, 0)[0])
    config, state = clj.config_from_core(odc), clj.state_from_core(odc)
    out, stats = clj.handle_small_clusters(state, config)
    assert out is state and stats == cl.SmallClusterStats(0, 0, 0)


# ---------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def ready():
    odc = core()
    x0, batches = make_stream(9, steps=1)
    odc.initialize(x0)
    return odc, clj.config_from_core(odc), batches[0]


BAD_STEPS = [
    (lambda i, f: (i[:, None], f), ValueError, "indices must be 1-D"),
    (lambda i, f: (i.astype(np.float32), f), TypeError, "indices must have an integer dtype"),
    (lambda i, f: (i[:0], f[:0]), ValueError, "indices must not be empty"),
    (lambda i, f: (i, f[:, :-1]), ValueError, r"features must have shape \(32, 8\)"),
    (lambda i, f: (i, f[:-1]), ValueError, r"features must have shape \(32, 8\)"),
    (lambda i, f: (i, f.astype(np.int32)), TypeError, "features must have a real floating dtype"),
    (lambda i, f: (i.tolist(), f), TypeError, "indices must be a jax.Array or a numpy.ndarray, got builtins.list"),
    (lambda i, f: (i, None), TypeError, "features must be a jax.Array or a numpy.ndarray, got builtins.NoneType"),
    (lambda i, f: (i, np.ma.masked_array(f)), TypeError, "features must be a jax.Array or a numpy.ndarray, got numpy.ma"),
]


@pytest.mark.parametrize(("mutate", "err", "match"), BAD_STEPS, ids=[b[2][:24] for b in BAD_STEPS])
def test_bad_batch_rejected(ready, mutate, err, match):
    odc, config, (idx, f) = ready
    bad_i, bad_f = mutate(idx, f)
    as_jax = lambda x: jnp.asarray(x) if type(x) is np.ndarray else x  # noqa: E731 (lists, None, masked as given)
    with pytest.raises(err, match=match):
        clj.step(clj.state_from_core(odc), as_jax(bad_i), as_jax(bad_f), config)


def _host_bits(state: clj.ODCState) -> dict[str, bytes]:
    return {k: np.asarray(v).tobytes() for k, v in state._asdict().items()}


REFUSED_BATCHES = {
    "NaN": lambda i, f: (i, np.where(np.arange(f.size).reshape(f.shape) == 13, np.nan, f).astype(f.dtype)),
    "inf": lambda i, f: (i, np.where(np.arange(f.size).reshape(f.shape) == 3, -np.inf, f).astype(f.dtype)),
    "zero row": lambda i, f: (i, np.where((np.arange(f.shape[0]) == 2)[:, None], 0, f).astype(f.dtype)),
    "index N": lambda i, f: (np.where(np.arange(i.size) == 4, N, i), f),
    "index -1": lambda i, f: (np.where(np.arange(i.size) == 4, -1, i), f),
}


@pytest.mark.parametrize("kind", sorted(REFUSED_BATCHES))
def test_batch_the_core_rejects_is_refused_state_unchanged(ready, kind):
    """Inside jit values cannot raise: the step keeps the state bit for bit, says applied=False."""
    odc, config, (idx, f) = ready
    state = clj.state_from_core(odc)
    state, _ = clj.step(state, jnp.asarray(idx), jnp.asarray(f), config)  # a state that has moved
    before = _host_bits(state)
    bad_i, bad_f = REFUSED_BATCHES[kind](idx, f)
    with pytest.raises((ValueError, TypeError)):
        odc.step(bad_i, bad_f)  # the core raises for the same batch
    out, stats = clj.step(state, jnp.asarray(bad_i), jnp.asarray(bad_f), config)
    assert not bool(stats["applied"]) and int(stats["num_changed"]) == 0
    assert not bool(stats["centroids_refreshed"])
    assert _host_bits(out) == before
    out, stats = clj.step(out, jnp.asarray(idx), jnp.asarray(f), config)
    assert bool(stats["applied"]) and int(out.iteration) == 2


def test_permuted_batch_gives_bit_identical_state(ready):
    """Merged duplicates do not depend on the batch order, to the last bit (float32 sums)."""
    odc, config, _ = ready
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 6, size=BATCH)  # many copies of few indices
    f = rng.normal(size=(BATCH, D)).astype(np.float32)
    results = []
    for perm in (np.arange(BATCH), rng.permutation(BATCH), rng.permutation(BATCH)[::-1]):
        state, stats = clj.step(clj.state_from_core(odc), jnp.asarray(idx[perm]), jnp.asarray(f[perm]), config)
        assert bool(stats["applied"])
        results.append(_host_bits(state))
    assert results[0] == results[1] == results[2]


def test_bad_state_config_and_core_rejected(ready):
    odc, config, (idx, f) = ready
    state = clj.state_from_core(odc)
    args = (jnp.asarray(idx), jnp.asarray(f))
    with pytest.raises(ValueError, match=r"state.features must have shape \(240, 8\)"):
        clj.step(state._replace(features=state.features[:, :-1]), *args, config)
    with pytest.raises(TypeError, match="state.labels must have a integral dtype"):
        clj.step(state._replace(labels=state.labels.astype(jnp.float32)), *args, config)
    with pytest.raises(TypeError, match="state must be an ODCState"):
        clj.handle_small_clusters(tuple(state), config)
    with pytest.raises(TypeError, match="config must be an ODCConfig"):
        clj.handle_small_clusters(state, {"num_samples": N})
    with pytest.raises(ValueError, match="key must be >= 0"):
        clj.handle_small_clusters(state, config, key=-1)
    with pytest.raises(TypeError, match="odc must be a clusterlearn.OnlineDeepClustering"):
        clj.state_from_core(state)
    with pytest.raises(cl.NotInitializedError):
        clj.state_from_core(core())


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(momentum=1.5), ValueError, "momentum must be in"),
        (dict(metric="cosine"), ValueError, "metric must be one of"),
        (dict(num_clusters=2.0), TypeError, "num_clusters must be an integer"),
        (dict(centroid_update_interval=0), ValueError, "centroid_update_interval must be >= 1"),
        (dict(resync_interval=0), ValueError, "resync_interval must be >= 1"),
        (dict(min_cluster_size=N), ValueError, "exceeds num_samples"),
        (dict(reweight_power=float("inf")), ValueError, "reweight_power must be finite"),
    ],
)
def test_bad_config(kwargs, err, match):
    with pytest.raises(err, match=match):
        clj.ODCConfig(**{"num_samples": N, "num_clusters": C, "feat_dim": D, **kwargs})


def test_sharded_step_validates_mesh_and_axis():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    config = clj.ODCConfig(N, C, D)
    with pytest.raises(ValueError, match="axis_name 'batch' is not an axis"):
        clj.make_sharded_step(mesh, config, axis_name="batch")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        clj.make_sharded_step(jax.devices(), config)


# ---------------------------------------------------------------------------- 2 devices
def two_device_worker() -> dict:
    """Runs in a subprocess with 2 CPU devices; returns the differences to a 1-device run."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("data",))
    out: dict = {}

    # ODC: sharded step vs the plain step on the concatenated batch. Device 1's batch repeats
    # device 0's indices, so duplicates span devices.
    x0, batches = make_stream(12, steps=6)
    odc = core(momentum=0.2, centroid_update_interval=2, resync_interval=3)
    odc.initialize(x0)
    config = clj.config_from_core(odc)
    single, sharded = clj.state_from_core(odc), clj.state_from_core(odc)
    sharded_step = clj.make_sharded_step(mesh, config)
    changed, worst = 0, {k: 0.0 for k in clj.ODCState._fields}
    for idx, f in batches:
        idx[BATCH // 2 : BATCH // 2 + 2] = idx[:2]
        single, s1 = clj.step(single, jnp.asarray(idx), jnp.asarray(f), config)
        sharded, s2 = sharded_step(sharded, jnp.asarray(idx), jnp.asarray(f))
        assert {k: v.tolist() for k, v in s1.items()} == {k: v.tolist() for k, v in s2.items()}, (s1, s2)
        changed += int(s1["num_changed"])
        for k in worst:
            shards = [np.asarray(s.data) for s in getattr(sharded, k).addressable_shards]
            assert len(shards) == 2 and np.array_equal(shards[0], shards[1]), k  # replicas identical
            worst[k] = max(worst[k], float(np.max(np.abs(shards[0] - np.asarray(getattr(single, k))))))
    out["odc_max_diff"], out["odc_changed"] = worst, changed
    out["odc_atol"] = {**odc_atols(single, 0.2), "labels": 0, "sizes": 0, "iteration": 0}

    # The README's flow: a core memory on a jax device (arrays committed to device 0) and a
    # batch committed there too; the sharded step places them on the mesh itself.
    committed = core(momentum=0.2, like=jnp.zeros(1))
    committed.initialize(x0)
    state = clj.state_from_core(committed)
    assert state.features.committed
    idx, f = batches[0]
    state, _ = clj.make_sharded_step(mesh, clj.config_from_core(committed))(
        state, jax.device_put(jnp.asarray(idx), jax.devices()[0]), jax.device_put(jnp.asarray(f), jax.devices()[0])
    )
    out["committed_ok"] = bool(int(state.iteration) == 1)

    # A NaN on one device's shard: every replica refuses the global batch alike.
    before = {k: np.asarray(v).tobytes() for k, v in sharded._asdict().items()}
    idx, f = batches[1]
    f = f.copy()
    f[-1, 0] = np.nan  # in device 1's half
    sharded, s3 = sharded_step(sharded, jnp.asarray(idx), jnp.asarray(f))
    out["refused_ok"] = bool(not bool(s3["applied"]) and before == {k: np.asarray(v).tobytes() for k, v in sharded._asdict().items()})

    # Self-Classifier loss over the global batch: value and gradients (logits = x @ w).
    rng = np.random.default_rng(0)
    views = [jnp.asarray(rng.normal(size=(16, D)).astype(np.float32)) for _ in range(2)]
    local = [jax.device_put(v, NamedSharding(mesh, P("data"))) for v in views]  # 8 rows per device
    w = jnp.asarray(rng.normal(size=(D, 10)).astype(np.float32))

    def global_loss(w, a, b):
        return cl.SelfClassifierLoss()(a @ w, b @ w)

    want_value, want_grads = jax.value_and_grad(global_loss, argnums=(0, 1, 2))(w, *views)
    # Bounds: two float32 computations of the loss of s = x @ w (bounds.linear_head_bounds)
    logits = [v @ w for v in views]
    g_s = jax.grad(lambda s, t: cl.SelfClassifierLoss()(s, t), argnums=(0, 1))(*logits)
    loss_tol, w_tol, x_tols = linear_head_bounds(views, w, float(want_value), g_s, np.float32)
    out["loss_atol"], out["grad_atol"] = loss_tol, [w_tol, *x_tols]
    # the core loss, and the adapter's with its jax.numpy custom_vjp and with the fused kernel
    # (an FFI call, whose results must be typed as varying over the mesh for jax.grad)
    criteria = {"core": cl.SelfClassifierLoss(gather=clj.make_gather("data"))}
    for kernel in ("array", "fused") if _native.xla_targets() is not None else ("array",):
        criteria[kernel] = clj.SelfClassifierLoss(gather=clj.make_gather("data"), kernel=kernel)
    out["loss"] = {}
    for name, criterion in criteria.items():

        def per_device(w, a, b, criterion=criterion):
            # the global-batch loss is the mean of the per-device losses (equal local batches)
            def loss(w, a, b):
                return jax.lax.pmean(criterion(a @ w, b @ w), "data")

            return jax.value_and_grad(loss, argnums=(0, 1, 2))(w, a, b)

        specs = dict(in_specs=(P(), P("data"), P("data")), out_specs=(P(), (P(), P("data"), P("data"))))
        value, grads = jax.jit(jax.shard_map(per_device, mesh=mesh, **specs))(w, *local)
        out["loss"][name] = {
            "value": [float(value), float(want_value)],
            "grad_max_diff": [float(jnp.max(jnp.abs(g - h))) for g, h in zip(grads, want_grads)],
            "grad_max": [float(jnp.max(jnp.abs(h))) for h in want_grads],
        }

    # A local loss (no gather) of a view sharded over the mesh and one replicated on it: the
    # views are cast to one varying type, and the replicated view's gradient is the sum of the
    # devices' gradients (the cast's transpose).
    b_rep = views[1][:8]
    out["mixed"] = {}
    for kernel in [name for name in criteria if name != "core"]:
        criterion = clj.SelfClassifierLoss(kernel=kernel)

        def grads(a, b, criterion=criterion):
            return jax.grad(lambda a, b: criterion(a, b), argnums=(0, 1))(a, b)

        specs = dict(in_specs=(P("data"), P()), out_specs=(P("data"), P()))
        got = jax.jit(jax.shard_map(grads, mesh=mesh, **specs))(local[0], b_rep)
        per_device = [grads(views[0][8 * i : 8 * (i + 1)], b_rep) for i in range(2)]
        want = (jnp.concatenate([g[0] for g in per_device]), per_device[0][1] + per_device[1][1])
        # the views are the logits: each device's gradient within two computations' bound; b's
        # is the sum of the two devices' (plus one rounding of the sum)
        tols = [2 * rounding_bounds([views[0][8 * i : 8 * (i + 1)], b_rep], 0.0, per_device[i], np.float32)[1] for i in range(2)]
        b_tol = sum(tols) + 2 * unit_roundoff(np.float32) * float(jnp.max(jnp.abs(want[1])))
        out["mixed"][kernel] = [[float(jnp.max(jnp.abs(g - h))), float(jnp.max(jnp.abs(h))), t] for g, h, t in zip(got, want, (max(tols), b_tol))]
    return out


@pytest.mark.slow
def test_two_devices_sharded_step_and_global_loss():
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bounds.py, streams.py
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "XLA_FLAGS": with_devices(2), "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["odc_changed"] > 0, out
    assert out["committed_ok"], out
    assert out["refused_ok"], out
    for key, diff in out["odc_max_diff"].items():
        assert diff <= out["odc_atol"][key], (key, out)  # integers exactly
    assert {"core", "array"} | ({"fused"} if _native.xla_targets() is not None else set()) <= set(out["loss"]), out
    assert set(out["mixed"]) == set(out["loss"]) - {"core"}, out
    for kernel, diffs in out["mixed"].items():
        for diff, scale, atol in diffs:
            assert scale > 0 and diff <= atol, (kernel, diffs)
    for name, loss in out["loss"].items():
        value, want = loss["value"]
        assert abs(value - want) <= out["loss_atol"], (name, loss, out["loss_atol"])
        for diff, scale, atol in zip(loss["grad_max_diff"], loss["grad_max"], out["grad_atol"], strict=True):
            assert scale > 0 and diff <= atol, (name, loss, out["grad_atol"])


if __name__ == "__main__":
    print(json.dumps(two_device_worker()))
