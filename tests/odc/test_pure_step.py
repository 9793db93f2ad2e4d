"""The pure ODC step (``clusterlearn.odc_state``): traced by ``jax.jit``, shared by the core
shell and the JAX adapter, refusing bad batches on every backend, and continuing a checkpoint
written before it existed exactly as the old code did.

Float tolerances: features are unit vectors re-normalised every step, so two correct
evaluations that round differently (XLA fuses a multiply into a reduction under ``jit``, which
it does not do op by op) differ by a few float32 ulps per step, and an error in the stored
feature shrinks by (1 - m) at each later visit: ``8 * eps * steps`` bounds them. Sums of
``n`` such rows differ by at most ``n`` times that.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import clusterlearn as cl
from clusterlearn import odc_state

from streams import BATCH, C, D, N
from streams import drifting_stream as make_stream

EPS32 = float(np.finfo(np.float32).eps)
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "odc_stream_v0.npz")


def test_config_is_the_constructors_check():
    """One set of checks: the core constructor raises what ODCConfig raises, and keeps it."""
    with pytest.raises(ValueError, match="exceeds num_samples"):
        cl.OnlineDeepClustering(N, C, D, min_cluster_size=N)
    with pytest.raises(ValueError, match="momentum must be in"):
        odc_state.ODCConfig(N, C, D, momentum=2.0)
    odc = cl.OnlineDeepClustering(np.int64(N), C, D, momentum=1, resync_interval=7)
    assert odc.config == odc_state.ODCConfig(N, C, D, momentum=1.0, resync_interval=7)
    assert type(odc.config.num_samples) is int and type(odc.config.momentum) is float
    assert odc.resync_interval == 7 and cl.OnlineDeepClustering(N, C, D).resync_interval == 0


def test_jitted_step_equals_eager_step():
    """The core's step traces under jax.jit (one compilation) and agrees with its eager run
    on JAX arrays: labels, sizes, iteration and statistics exactly, floats within rounding."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    x0, batches = make_stream(3, steps=12)
    odc = cl.OnlineDeepClustering(N, C, D, momentum=0.2, min_cluster_size=0, centroid_update_interval=3, resync_interval=4)
    odc.initialize(x0)
    config = odc.config
    arrays = lambda: odc_state.ODCState(*(jnp.asarray(np.asarray(x)) for x in odc.state))  # noqa: E731
    traced, eager = arrays(), arrays()
    jitted = jax.jit(odc_state.step, static_argnames="config")
    refreshed = changed = 0
    for k, (idx, f) in enumerate(batches, start=1):
        traced, got = jitted(traced, jnp.asarray(idx), jnp.asarray(f), config)
        eager, want = odc_state.step(eager, jnp.asarray(idx), jnp.asarray(f), config)
        assert {key: np.asarray(v).item() for key, v in got.items()} == {key: np.asarray(v).item() for key, v in want.items()}
        for name in ("labels", "sizes", "iteration"):
            np.testing.assert_array_equal(getattr(traced, name), getattr(eager, name), err_msg=name)
        bound = 8 * EPS32 * k
        np.testing.assert_allclose(traced.features, eager.features, rtol=0, atol=bound)
        np.testing.assert_allclose(traced.centroids, eager.centroids, rtol=0, atol=bound)
        np.testing.assert_allclose(traced.sums, eager.sums, rtol=0, atol=bound * N)
        refreshed += bool(got["centroids_refreshed"])
        changed += int(got["num_changed"])
    assert jitted._cache_size() == 1
    assert refreshed == 4 and changed > 0 and int(traced.iteration) == 12


def test_refused_batch_leaves_state_unchanged(backend):
    """The refusal lives in the core function: on every backend a non-finite batch or an
    index out of range changes no bit and reports applied False; a good batch applies."""
    x0, batches = make_stream(1, steps=1)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=0, like=backend.asarray(np.zeros(1, np.float32)))
    odc.initialize(backend.asarray(x0))
    idx, f = batches[0]
    before = [backend.to_numpy(x).copy() for x in odc.state]
    bad_f = f.copy()
    bad_f[5, 2] = np.nan
    bad_idx = idx.copy()
    bad_idx[4] = N
    for i, x in ((idx, bad_f), (bad_idx, f)):
        state, stats = odc_state.step(odc.state, backend.asarray(i), backend.asarray(x), odc.config)
        assert not bool(stats["applied"])
        for name, old, new in zip(odc_state.ODCState._fields, before, state):
            np.testing.assert_array_equal(backend.to_numpy(new), old, err_msg=name)
    state, stats = odc_state.step(odc.state, backend.asarray(idx), backend.asarray(f), odc.config)
    assert bool(stats["applied"]) and int(state.iteration) == 1
    assert int(stats["num_distinct"]) == BATCH - 3


def test_passed_half_norms_are_a_cache_of_the_same_bits(backend):
    """``half_sq_norms=`` only saves the recomputation: on every backend a step given
    ``centroid_half_sq_norms(state.centroids)`` returns every bit of the step that computes
    them, the shell's kept norms equal a fresh computation after its steps, refreshes and
    small-cluster handling (a stale cache would relabel), and the norms passed are the ones
    used (norms that favour cluster 0 put the whole batch there)."""
    from clusterlearn.assignment import centroid_half_sq_norms

    xp = backend.xp
    x0, batches = make_stream(4, steps=8)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=N // (2 * C), centroid_update_interval=2,
                                  like=backend.asarray(np.zeros(1, np.float32)))
    odc.initialize(backend.asarray(x0))
    favour_first = backend.asarray(np.eye(1, C, dtype=np.float32)[0] * 1e6)
    handled = refreshed = 0
    for idx, f in batches:
        idx, f = backend.asarray(idx), backend.asarray(f)
        copy = lambda: odc_state.ODCState(*(xp.asarray(x, copy=True) for x in odc.state))  # noqa: E731 (steps consume)
        norms = centroid_half_sq_norms(odc.state.centroids)
        np.testing.assert_array_equal(backend.to_numpy(odc.centroid_memory.half_sq_norms), backend.to_numpy(norms))
        given, got = odc_state.step(copy(), idx, f, odc.config, half_sq_norms=norms)
        computed, want = odc_state.step(copy(), idx, f, odc.config)
        assert {k: backend.to_numpy(v).item() for k, v in got.items()} == {k: backend.to_numpy(v).item() for k, v in want.items()}
        for name, a, b in zip(odc_state.ODCState._fields, given, computed):
            np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b), err_msg=name)
        skewed, _ = odc_state.step(copy(), idx, f, odc.config, half_sq_norms=norms - favour_first)
        assert not np.any(backend.to_numpy(xp.take(skewed.labels, idx)))
        stats = odc.step(idx, f)
        handled += stats["num_small_clusters"]
        refreshed += stats["centroids_refreshed"]
    assert handled > 0 and refreshed == 4, (handled, refreshed)


def test_checkpoint_of_the_previous_code_loads_and_continues_alike():
    """tests/data/odc_stream_v0.npz was written by the step before it became pure (see
    tests/data/make_odc_stream_v0.py): its checkpoint loads, and its 16 batches (repeats,
    resyncs, refreshes) give the same statistics up to the first small-cluster handling; from
    there on the 2-means splits start from greedy k-means++ seeds (a later change to
    :func:`clusterlearn.kmeans`), so the re-seeded clusters differ and only the memories'
    invariants are compared."""
    with np.load(DATA) as z:
        data = {k: z[k] for k in z.files}
    before = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("before/")}
    after = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("after/")}
    settings = ("momentum", "min_cluster_size", "centroid_update_interval", "small_cluster_interval", "seed", "resync_interval")
    odc = cl.OnlineDeepClustering(N, C, D, **{k: before[k].item() for k in settings})
    odc.load_state_dict(before)
    same = True  # until the first small-cluster handling
    for idx, f, want in zip(data["indices"], data["features"], data["stats"]):
        s = odc.step(idx, f)
        if same:
            assert [s["change_ratio"], s["num_small_clusters"], s["num_splits"], s["centroids_refreshed"]] == list(want)
            same = want[1] == 0
    assert not same and data["stats"][:, 1].sum() == 7  # the comparison covered steps before a handling
    got = odc.state_dict()
    assert int(got["iteration"]) == int(after["iteration"])
    np.testing.assert_array_equal(got["sizes"], np.bincount(got["labels"], minlength=C))
    assert got["sizes"].min() >= odc.min_cluster_size
    np.testing.assert_allclose(np.linalg.norm(got["features"], axis=1), 1.0, rtol=0, atol=8 * EPS32)


def test_argmax_rows_takes_the_lowest_of_tied_positions(backend):
    """The labelling's argmax keeps argmax's rule on every backend: among equal
    scores the lowest cluster id, also with -inf (excluded clusters) and under jax.jit."""
    from clusterlearn import backend as B

    x = np.array([[1, 3, 3, 0], [-np.inf, -np.inf, 2, 2], [5, 5, 5, 5], [0, -1, -2, 7]], dtype=np.float32)
    want = [1, 2, 0, 3]
    got = B.argmax_rows(backend.asarray(x))
    np.testing.assert_array_equal(backend.to_numpy(got), want)
    xp = backend.xp
    assert got.dtype == B.index_dtype(xp)
    if backend.name == "jax":
        import jax

        np.testing.assert_array_equal(np.asarray(jax.jit(B.argmax_rows)(backend.asarray(x))), want)


def test_checkpoints_with_the_old_setting_names_load():
    """Checkpoints written before the glossary (docs/glossary.md) name the metric ``assign``
    (tests/data/odc_stream_v0.npz does): they load, and the old value is checked against
    ``metric``, not ignored."""
    with np.load(DATA) as z:
        before = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("before/")}
    assert "assign" in before and "metric" not in before
    settings = ("momentum", "min_cluster_size", "centroid_update_interval", "small_cluster_interval", "seed", "resync_interval")
    kw = {k: before[k].item() for k in settings}
    odc = cl.OnlineDeepClustering(N, C, D, **kw)
    odc.load_state_dict(before)
    np.testing.assert_array_equal(odc.state_dict()["labels"], before["labels"])
    assert odc.state_dict()["metric"] == "l2" and "assign" not in odc.state_dict()
    with pytest.raises(ValueError, match=r"state\['metric'\] is 'l2', this object has 'dot'"):
        cl.OnlineDeepClustering(N, C, D, **kw, metric="dot").load_state_dict(before)
    old = {**odc.state_dict(), "assign": "dot"}  # the current format under the old key
    del old["metric"]
    dot = cl.OnlineDeepClustering(N, C, D, **kw, metric="dot")
    dot.load_state_dict(old)
    assert dot.iteration == odc.iteration


def test_fingerprint_is_the_same_on_every_backend():
    """One digest of a state's exact bytes: NumPy, torch and JAX arrays of the same state
    (same dtypes) give the same fingerprint, the torch and JAX adapters' included; any
    changed bit, dtype or setting changes it."""
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    from clusterlearn.adapters import jax as clj
    from clusterlearn.adapters import torch as clt

    x0, batches = make_stream(3, steps=3)
    odc = clt.OnlineDeepClustering(N, C, D, device="cpu", min_cluster_size=0)
    odc.initialize(torch.from_numpy(x0))
    for idx, f in batches:
        odc.step(torch.from_numpy(idx), torch.from_numpy(f))
    # 32-bit everywhere: JAX without x64 holds no int64 or float64
    as32 = odc_state.ODCState(*(np.asarray(x).astype(np.int32 if np.asarray(x).dtype.kind == "i" else np.float32)
                                 for x in odc.state))
    on_torch = odc_state.ODCState(*(torch.from_numpy(np.array(x)) for x in as32))
    on_jax = odc_state.ODCState(*(jnp.asarray(x) for x in as32))
    digest = odc_state.fingerprint(as32, odc.config)
    assert odc_state.fingerprint(on_torch, odc.config) == digest
    assert clj.fingerprint(on_jax, odc.config) == digest
    core = clt.OnlineDeepClustering(N, C, D, device="cpu", min_cluster_size=0)
    core.load_state_dict({**odc.state_dict()})
    assert core.fingerprint() == odc.fingerprint() == odc_state.fingerprint(odc.state, odc.config)
    flipped = as32.features.copy()
    flipped.view(np.uint32)[0, 0] ^= 1
    assert odc_state.fingerprint(as32._replace(features=flipped), odc.config) != digest
    assert odc_state.fingerprint(as32._replace(labels=as32.labels.astype(np.int64)), odc.config) != digest
    other = odc_state.ODCConfig(N, C, D, min_cluster_size=0, seed=1)
    assert odc_state.fingerprint(as32, other) != digest
    bf16 = torch.from_numpy(as32.features).to(torch.bfloat16)  # 2-byte floats keep their own bits
    assert odc_state.fingerprint(on_torch._replace(features=bf16), odc.config) == clj.fingerprint(
        on_jax._replace(features=jnp.asarray(bf16.float().numpy()).astype(jnp.bfloat16)), odc.config)


def test_check_replicas_names_what_differs():
    x0, _ = make_stream(3, steps=1)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=0)
    odc.initialize(x0)
    parts = odc_state.fingerprint_parts(odc.state, odc.config)
    odc_state.check_replicas({"a": parts, "b": dict(parts)})
    changed = {**parts, "iteration": "int64 [] 3"}
    with pytest.raises(RuntimeError, match=r"ODC memories of b differ from a's \(b in iteration; iteration: int64 \[\] 3 on b .*; fix"):
        odc_state.check_replicas({"a": parts, "b": changed, "c": parts}, "fix")


def test_deprecated_names_warn_and_still_work():
    """The old names of the glossary (docs/glossary.md) keep working for one release, each
    with a DeprecationWarning naming the new one."""
    x0, batches = make_stream(3, steps=1)
    with pytest.warns(DeprecationWarning, match="metric"):
        odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=0, assign="dot")
    assert odc.metric == "dot" and odc.config.metric == "dot"
    with pytest.warns(DeprecationWarning, match="metric"):
        assert odc.assign == "dot"
    with pytest.warns(DeprecationWarning, match="metric"):
        config = odc_state.ODCConfig(N, C, D, min_cluster_size=0, assign="dot")
    assert config == odc.config
    with pytest.warns(DeprecationWarning, match="ODCConfig.metric"):
        assert config.assign == "dot"
    with pytest.warns(DeprecationWarning, match="n_iter"):
        odc.initialize(x0, kmeans_iters=3)
    with pytest.warns(DeprecationWarning, match="init="):
        cl.OnlineDeepClustering(N, C, D, min_cluster_size=0).initialize(x0, kmeans_init="random")
    with pytest.warns(DeprecationWarning, match="centroid_memory"):
        assert odc.centroids is odc.centroid_memory
    sizes = np.array([4, 0, 1])
    with pytest.warns(DeprecationWarning, match="loss_weights"):
        np.testing.assert_array_equal(cl.reweight(sizes, 0.5), cl.loss_weights(sizes, 0.5))
    with pytest.warns(DeprecationWarning, match="loss_weights"):
        np.testing.assert_array_equal(cl.LossReweighter(0.5)(sizes), cl.loss_weights(sizes, 0.5))
    from clusterlearn.reweighting import size_weights

    with pytest.warns(DeprecationWarning, match="loss_weights"):
        np.testing.assert_array_equal(size_weights(sizes, 0.5), cl.loss_weights(sizes, 0.5))
    with pytest.warns(DeprecationWarning, match="n_iter"):
        handler = cl.SmallClusterHandler(5, split_iters=3)
    assert handler.n_iter == 3
    with pytest.warns(DeprecationWarning, match="n_iter"):
        assert handler.split_iters == 3


def test_state_setter_checks_shapes_and_holds_the_state():
    x0, batches = make_stream(3, steps=1)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=0)
    odc.initialize(x0)
    new, _ = odc_state.step(odc_state.ODCState(*(np.array(x) for x in odc.state)), *batches[0], odc.config)
    odc.state = new
    assert odc.iteration == 1 and odc_state.fingerprint(odc.state, odc.config) == odc_state.fingerprint(new, odc.config)
    with pytest.raises(ValueError, match=r"state.centroids must have shape \(6, 8\)"):
        odc.state = new._replace(centroids=new.centroids[:2])
    with pytest.raises(TypeError, match="state.labels must have a integral dtype"):
        odc.state = new._replace(labels=new.labels.astype(np.float32))
    assert odc.iteration == 1


def test_memory_update_is_a_named_tuple_without_optional_members():
    mem = cl.SampleMemory(10, 3)
    mem.initialize(np.eye(10, 3, dtype=np.float32) + 0.1, np.zeros(10, dtype=np.int64))
    for idx in (np.array([3, 1]), np.array([3, 1, 3])):
        up = mem.update(idx, np.ones((idx.shape[0], 3), dtype=np.float32))
        assert isinstance(up, cl.MemoryUpdate) and up.lead is not None
        np.testing.assert_array_equal(up.indices, np.sort(idx))
        np.testing.assert_array_equal(up.lead, [0, 1] if idx.shape[0] == 2 else [0, 1, 1])


def test_small_cluster_step_follows_the_cores_schedule():
    """The JAX loop's host-side call makes the core's decisions: handling on every
    ``small_cluster_interval``-th iteration only, with the same result as the core."""
    pytest.importorskip("jax")
    from clusterlearn.adapters import jax as clj

    x0, batches = make_stream(3, steps=16)  # the stream of odc_stream_v0.npz: 7 handlings
    odc = cl.OnlineDeepClustering(N, C, D, momentum=0.2, min_cluster_size=35, centroid_update_interval=3,
                                  small_cluster_interval=2, seed=5, resync_interval=4)
    odc.initialize(x0)
    config, state = clj.config_from_core(odc), clj.state_from_core(odc)
    ran = []
    for idx, f in batches:
        core = odc.step(idx, f)
        state, _ = clj.step(state, idx, f, config)
        state, handled = clj.small_cluster_step(state, config)
        ran.append(handled.num_small_clusters)
        assert handled.num_small_clusters == core["num_small_clusters"]
        np.testing.assert_array_equal(np.asarray(state.labels), odc.labels)
    assert sum(ran[0::2]) == 0 and sum(ran) > 0  # odd iterations never handle
