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
    """The labelling's argmax (lax.top_k on JAX CPU) keeps argmax's rule: among equal
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
