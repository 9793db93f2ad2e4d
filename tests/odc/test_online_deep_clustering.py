"""OnlineDeepClustering and its parts: invariants on streams where labels really change.

The streams drag features towards two attractors, so clusters really shrink, get dissolved
and re-seeded, and labels change at every step. Momenta are drawn away from 0.5 so that a
swap of m and 1 - m would be caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clusterlearn as cl
from clusterlearn import backend as B

from bounds import gamma, momentum_feature_atol, reweight_rtol, running_sum_atol, unit_norm_atol, unit_roundoff
from streams import BATCH, C, D, N
from streams import drifting_stream as make_stream

MAX_EXAMPLES = {"jax": 2, "array_api_strict": 5}  # eager JAX compiles every new shape


def run_property(backend, strategy, check):
    """Run ``check(example)`` for hypothesis examples: half the profile's count, fewer on slow
    backends (``HYPOTHESIS_PROFILE=thorough`` raises both)."""
    n = settings.default.max_examples // 2
    n = min(n, MAX_EXAMPLES[backend.name] * (n // 12)) if backend.name in MAX_EXAMPLES else n
    settings(max_examples=n, deadline=None)(given(strategy)(check))()


def exact_means(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    sums = np.zeros((k, features.shape[1]))
    np.add.at(sums, labels, features.astype(np.float64))
    return sums / np.maximum(np.bincount(labels, minlength=k), 1)[:, None]


def snapshot(odc) -> dict:
    return {k: (v if isinstance(v, (int, float, str)) else B.to_numpy(v).copy()) for k, v in odc.state_dict().items()}


def sums_atol(odc, steps: int) -> float:
    """Drift of the incremental cluster sums after ``steps`` steps: the initial sum of n unit
    vectors, then per step each sample moved (−old, +new) by the step and again by the
    small-cluster handling, 4 n additions per entry at most; partial sums ≤ the largest size."""
    n, acc = B.to_numpy(odc.labels).shape[0], B.to_numpy(odc.centroid_memory.sums).dtype
    return running_sum_atol(n + 4 * n * steps, int(B.to_numpy(odc.cluster_sizes).max()) + 1, acc)


def check_invariants(odc, min_size: int, steps: int = 0) -> None:
    labels = B.to_numpy(odc.labels)
    sizes = B.to_numpy(odc.cluster_sizes)
    feats = B.to_numpy(odc.features)
    np.testing.assert_array_equal(sizes, np.bincount(labels, minlength=odc.num_clusters))
    assert sizes.min() >= max(min_size, 1), sizes
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=0, atol=unit_norm_atol(feats.shape[1], feats.dtype))
    want = exact_means(feats, labels, odc.num_clusters) * sizes[:, None]
    np.testing.assert_allclose(B.to_numpy(odc.centroid_memory.sums), want, rtol=0, atol=sums_atol(odc, steps))


params = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "momentum": st.sampled_from([0.2, 0.35, 0.8, 0.95]),
        "min_size": st.integers(1, N // C),  # up to C * min == N (splits + fill)
        "refresh": st.integers(1, 4),
        "metric": st.sampled_from(["l2", "dot"]),
        "resync": st.sampled_from([1, 3, 1000]),  # exact recompute of the sums vs incremental
    }
)


def test_stream_invariants(backend):
    """Sizes, norms, sums, label reads, refreshed means and re-labelling after every step."""

    def check(p):
        x0, batches = make_stream(p["seed"], steps=10)
        odc = cl.OnlineDeepClustering(
            N, C, D, momentum=p["momentum"], min_cluster_size=p["min_size"], centroid_update_interval=p["refresh"],
            metric=p["metric"], seed=p["seed"], resync_interval=p["resync"], like=backend.asarray(np.zeros(1)),
        )
        odc.initialize(backend.asarray(x0))
        check_invariants(odc, p["min_size"])
        changed = 0.0
        for step, (idx, f) in enumerate(batches, 1):
            cen_before = B.to_numpy(odc.centroid_memory.centroids).copy()
            feat_before = B.to_numpy(odc.features).copy()
            stats = odc.step(backend.asarray(idx), backend.asarray(f))
            changed += stats["change_ratio"]
            check_invariants(odc, p["min_size"], step)
            labels, feats = B.to_numpy(odc.labels), B.to_numpy(odc.features)
            y = odc.labels_of(backend.asarray(idx))
            assert B.namespace(y=y) is B.namespace(i=backend.asarray(idx))
            np.testing.assert_array_equal(backend.to_numpy(y), labels[idx])
            # the momentum rule, computed independently in float64 (no duplicates at the head)
            head = idx[3:-3]
            unit = f[3:-3] / np.linalg.norm(f[3:-3], axis=1, keepdims=True)
            mix = p["momentum"] * unit + (1 - p["momentum"]) * feat_before[head]
            atol = momentum_feature_atol(D, p["momentum"], 1, np.float32, computations=1)  # against float64
            np.testing.assert_allclose(feats[head], mix / np.linalg.norm(mix, axis=1, keepdims=True), rtol=0, atol=atol)
            if stats["num_small_clusters"] == 0:  # labels = nearest centroid before the step
                scores = feats[idx] @ cen_before.T
                if p["metric"] == "l2":
                    scores = 2 * scores - (cen_before**2).sum(1)
                best = scores.max(axis=1)
                chosen = scores[np.arange(len(idx)), labels[idx]]
                # scores of unit features and centroids (‖c‖ ≤ 1): a D-term dot product off by γ_D,
                # 2 f·c − ‖c‖² by 3 γ_D; the core's ‖f − c‖² form adds γ_D (‖f‖²); two computations
                np.testing.assert_allclose(chosen, best, rtol=0, atol=8 * gamma(D, np.float32))
            if stats["centroids_refreshed"]:
                # sums / sizes: the sums' drift (≥ its share per member) and one float32 rounding of a mean ≤ 1
                atol = sums_atol(odc, step) + unit_roundoff(np.float32)
                np.testing.assert_allclose(B.to_numpy(odc.centroid_memory.centroids), exact_means(feats, labels, C), rtol=0, atol=atol)
            elif stats["num_small_clusters"] == 0:  # nothing may move the centroids in between
                np.testing.assert_array_equal(B.to_numpy(odc.centroid_memory.centroids), cen_before)
        assert changed > 0, "the stream never changed a label: the test would prove nothing"

    run_property(backend, params, check)


def test_stream_really_forms_small_clusters():
    x0, batches = make_stream(0, steps=15)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=N // (2 * C), momentum=0.8)
    odc.initialize(x0)
    total = sum(odc.step(i, f)["num_small_clusters"] for i, f in batches)
    assert total > 0


def test_handling_reads_features_only_through_rows_and_only_the_members_it_needs():
    """``handle_small_clusters(..., rows=...)`` (how a memory sharded over processes is
    handled) gives the result of the default path bit for bit with a placeholder for the
    features, and asks only for the members of the small clusters and of the clusters that
    give members to the re-seeded ones (N = 2 C m: no fill step)."""
    import dataclasses

    from clusterlearn import odc_state
    from clusterlearn.small_clusters import handle_small_clusters

    x0, batches = make_stream(0, steps=6)  # sizes then 11, 20, 30, 39, 67, 73
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=0, momentum=0.8)
    odc.initialize(x0)
    for i, f in batches:
        odc.step(i, f)
    state = odc_state.ODCState(*(np.asarray(a) for a in odc.state))
    config = dataclasses.replace(odc.config, min_cluster_size=N // (2 * C))
    want, want_stats = handle_small_clusters(state, config, key=3)
    asked = []

    def rows(indices):
        asked.append(np.asarray(indices))
        return state.features[indices]

    placeholder = np.broadcast_to(np.full((), np.nan, dtype=np.float32), state.features.shape)  # never read
    got, got_stats = handle_small_clusters(state._replace(features=placeholder), config, key=3, rows=rows)
    assert got_stats == want_stats and got_stats.num_small_clusters > 0
    for name in ("labels", "centroids", "sizes", "sums"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    small = np.flatnonzero(state.sizes < config.min_cluster_size)
    reseeded = np.isin(want.labels, small) & ~np.isin(state.labels, small)
    needed = np.flatnonzero(np.isin(state.labels, np.union1d(small, state.labels[reseeded])))
    np.testing.assert_array_equal(np.unique(np.concatenate(asked)), needed)
    assert len(needed) < N // 2
    with pytest.raises(TypeError, match="rows"):
        handle_small_clusters(state, config, key=3, rows=state.features)


def test_loss_weights_formula(backend):
    x0, batches = make_stream(1, steps=3)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, reweight_power=0.7, like=backend.asarray(np.zeros(1)))
    odc.initialize(backend.asarray(x0))
    for idx, f in batches:
        odc.step(backend.asarray(idx), backend.asarray(f))
        n = B.to_numpy(odc.cluster_sizes).astype(np.float64)
        w = n**-0.7 / (n**-0.7).sum()
        got = backend.to_numpy(odc.loss_weights())
        np.testing.assert_allclose(got, w, rtol=reweight_rtol(C, 0.7, N, got.dtype), atol=0)
    torch = pytest.importorskip("torch")
    w = odc.loss_weights(like=torch.zeros(1, dtype=torch.bfloat16))  # bf16 logits: bf16 weights
    assert isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16


def test_loss_weights_zero_for_empty_and_validates():
    w = cl.loss_weights(np.array([4, 0, 1]), 0.5)
    np.testing.assert_allclose(w, np.array([0.5, 0, 1]) / 1.5, rtol=reweight_rtol(3, 0.5, 4, w.dtype), atol=0)
    with pytest.raises(ValueError, match="at least one positive"):
        cl.loss_weights(np.array([0, 0]))
    with pytest.raises(ValueError, match="^power must be in"):
        cl.loss_weights(np.array([1, 2]), -1.0)


def test_duplicates_are_averaged_order_free_and_counted_once(backend):
    x0, _ = make_stream(2, steps=0)
    rng = np.random.default_rng(2)
    idx = np.array([5, 9, 5, 17, 9, 5])
    f = rng.normal(size=(6, D)).astype(np.float32)

    def fresh():
        odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=0, momentum=0.3, like=backend.asarray(np.zeros(1)))
        odc.initialize(backend.asarray(x0))
        return odc

    a, b, c = fresh(), fresh(), fresh()
    a.step(backend.asarray(idx), backend.asarray(f))
    perm = rng.permutation(6)
    b.step(backend.asarray(idx[perm]), backend.asarray(f[perm]))
    unit = f / np.linalg.norm(f, axis=1, keepdims=True)
    merged = np.stack([unit[idx == i].mean(0) for i in (5, 9, 17)])
    c.step(backend.asarray(np.array([5, 9, 17])), backend.asarray(merged))
    # the mean of 3 unit vectors off by γ_{D+5} (normalisations, the sum), amplified by
    # 1 / ‖mean‖, then the momentum rule (÷ |2m − 1|) as in test_stream_invariants; two computations
    shrink = np.linalg.norm(merged, axis=1).min() * abs(2 * 0.3 - 1)
    atol = 2 * gamma(3 * D + 13, np.float32) / shrink
    for other in (b, c):
        sa, so = snapshot(a), snapshot(other)
        for key in ("labels", "sizes"):
            np.testing.assert_array_equal(sa[key], so[key])
        np.testing.assert_allclose(sa["features"], so["features"], rtol=0, atol=atol)
    check_invariants(a, 1)


def test_same_labels_on_every_backend(backend):
    x0, batches = make_stream(7, steps=6)
    kw = dict(min_cluster_size=N // (2 * C), momentum=0.8, centroid_update_interval=2, seed=3)
    ref = cl.OnlineDeepClustering(N, C, D, **kw)
    ref.initialize(x0)
    odc = cl.OnlineDeepClustering(N, C, D, **kw, like=backend.asarray(np.zeros(1)))
    odc.initialize(backend.asarray(x0))
    for idx, f in batches:
        s_ref = ref.step(idx, f)
        s = odc.step(backend.asarray(idx), backend.asarray(f))
        assert s == s_ref
        np.testing.assert_array_equal(B.to_numpy(odc.labels), B.to_numpy(ref.labels))
        atol = momentum_feature_atol(D, 0.8, len(batches), np.float32)  # at most one update per step
        np.testing.assert_allclose(B.to_numpy(odc.features), B.to_numpy(ref.features), rtol=0, atol=atol)


def test_state_dict_round_trip_gives_identical_steps(backend):
    x0, batches = make_stream(4, steps=8)
    kw = dict(min_cluster_size=10, momentum=0.35, centroid_update_interval=3, like=backend.asarray(np.zeros(1)))
    a = cl.OnlineDeepClustering(N, C, D, **kw)
    a.initialize(backend.asarray(x0))
    for idx, f in batches[:4]:
        a.step(backend.asarray(idx), backend.asarray(f))
    state = a.state_dict()
    b = cl.OnlineDeepClustering(N, C, D, **kw)
    b.load_state_dict(state)
    for idx, f in batches[4:]:
        assert a.step(backend.asarray(idx), backend.asarray(f)) == b.step(backend.asarray(idx), backend.asarray(f))
    sa, sb = snapshot(a), snapshot(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key])


def test_labels_given_to_initialize_are_used_and_small_clusters_handled():
    x0, _ = make_stream(5, steps=0)
    labels = np.zeros(N, dtype=np.int64)  # everything in one cluster: C - 1 empty clusters
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=20)
    stats = odc.initialize(x0, labels)
    assert stats["num_small_clusters"] == C - 1
    check_invariants(odc, 20)


def test_parts_compose_without_the_wrapper():
    x0, batches = make_stream(6, steps=3)
    mem = cl.SampleMemory(N, D, momentum=0.8)
    feats = cl.l2_normalize(x0)
    mem.initialize(feats, cl.kmeans(feats, C, seed=0).labels)
    cen = cl.CentroidMemory(C, D, xp=mem.xp, device=None, dtype=mem.dtype)
    cen.initialize(mem.features, mem.labels)
    handler = cl.SmallClusterHandler(30)
    for idx, f in batches:
        idx, first, old, new, _ = mem.update(idx, f)
        old_y, new_y = mem.labels[idx], cen.assign(new)
        mem.set_labels(idx, new_y)
        cen.move(old_y, new_y, old, new, count=first)
        cen.refresh()
        handler(mem, cen, key=1)
        assert np.bincount(mem.labels, minlength=C).min() >= 30
        np.testing.assert_array_equal(cen.sizes, np.bincount(mem.labels, minlength=C))


def test_jax_small_cluster_handling_runs_on_host_copies():
    """On JAX arrays the handler computes on NumPy copies, so eager JAX compiles nothing for
    the data-dependent shapes (a second handling with other member counts compiles nothing)
    and gives the result of the handler on NumPy arrays (NumPy's int64 and float64
    accumulators) bit for bit, in JAX's dtypes."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    x0, _ = make_stream(5, steps=0)
    feats = cl.l2_normalize(x0)
    base = cl.kmeans(feats, C, seed=0).labels.astype(np.int64)

    def memories(xp, labels):
        mem = cl.SampleMemory.wrap(xp.asarray(feats), xp.asarray(labels.astype(B.index_dtype(xp))))
        cen = cl.CentroidMemory(C, D, xp=xp, device=None, dtype=mem.dtype)
        cen.initialize(mem.features, mem.labels)
        return mem, cen

    warm = base.copy()
    warm[warm == 1] = 0  # cluster 1 empty
    cl.SmallClusterHandler(20, seed=3)(*memories(jnp, warm), key=4)  # compiles the static-shape operations once
    labels = base.copy()
    labels[labels == 4] = 2  # cluster 4 empty, cluster 5 cut below the threshold
    labels[np.flatnonzero(labels == 5)[3:]] = 0
    compiled: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_args, **_kw: compiled.append(event) if "backend_compile" in event else None)
    jmem, jcen = memories(jnp, labels)
    mem = cl.SampleMemory.wrap(feats, labels)  # the same state on NumPy, float32 sums widened
    cen = cl.CentroidMemory(C, D, xp=np, device=None, dtype=np.float32)
    cen.set_state(np.array(jcen.centroids), np.asarray(jcen.sizes, dtype=np.int64), np.asarray(jcen.sums, dtype=np.float64))
    got = cl.SmallClusterHandler(20, seed=3)(jmem, jcen, key=4)
    handling_compiles, compiled[:] = list(compiled), []
    want = cl.SmallClusterHandler(20, seed=3)(mem, cen, key=4)
    assert want.num_small_clusters == 2 and want.num_moved == 3
    assert got == want
    assert handling_compiles == [], handling_compiles
    for name, g, w in [("labels", jmem.labels, mem.labels), ("sizes", jcen.sizes, cen.sizes),
                       ("sums", jcen.sums, cen.sums), ("centroids", jcen.centroids, cen.centroids)]:
        assert isinstance(g, jax.Array) and g.dtype == (jnp.float32 if name in ("sums", "centroids") else jnp.int32), name
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w).astype(np.asarray(g).dtype), err_msg=name)


# ---------------------------------------------------------------------------- bad input
def _ready(backend):
    x0, batches = make_stream(8, steps=1)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, like=backend.asarray(np.zeros(1)))
    odc.initialize(backend.asarray(x0))
    return odc, batches[0]


BAD_STEPS = [
    ("indices", lambda i, f: (i[:, None], f), ValueError, "indices must be 1-D"),
    ("indices", lambda i, f: (i.astype(np.float32), f), TypeError, "indices must have an integer dtype"),
    ("indices", lambda i, f: (i + N, f), ValueError, r"indices must lie in \[0, 240\)"),
    ("indices", lambda i, f: (i - N, f), ValueError, r"indices must lie in \[0, 240\)"),
    ("features", lambda i, f: (i, f[:, :-1]), ValueError, "features must have 8 columns"),
    ("features", lambda i, f: (i, f[:-1]), ValueError, "features must have 32 rows"),
    ("features", lambda i, f: (i, np.where(np.arange(D) == 2, np.nan, f).astype(np.float32)), ValueError, "NaN or Inf"),
    ("features", lambda i, f: (i, np.full_like(f, np.inf)), ValueError, "NaN or Inf"),
    ("features", lambda i, f: (i, f.astype(np.int64)), TypeError, "real floating"),
]


@pytest.mark.parametrize(("arg", "mutate", "err", "match"), BAD_STEPS, ids=[f"{b[0]}-{b[3][:20]}" for b in BAD_STEPS])
def test_bad_step_input_leaves_state_unchanged(backend, arg, mutate, err, match):
    odc, (idx, f) = _ready(backend)
    before = snapshot(odc)
    bad_i, bad_f = mutate(idx, f)
    with pytest.raises(err, match=match):
        odc.step(backend.asarray(bad_i), backend.asarray(bad_f))
    after = snapshot(odc)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_mixed_namespaces_rejected(backend):
    if backend.name == "numpy":
        pytest.skip("needs a second namespace")
    odc, (idx, f) = _ready(backend)
    before = snapshot(odc)
    with pytest.raises(TypeError, match="indices from .*features from"):
        odc.step(idx, backend.asarray(f))
    np.testing.assert_array_equal(before["labels"], snapshot(odc)["labels"])


def test_inputs_of_another_namespace_are_converted(backend):
    odc, (idx, f) = _ready(backend)
    odc.step(idx, f)  # NumPy batch into a memory of any backend
    y = odc.labels_of(idx)
    assert isinstance(y, np.ndarray)


def test_use_before_initialize():
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5)
    calls = (
        lambda: odc.step(np.arange(3), np.zeros((3, D), np.float32)),
        lambda: odc.labels_of(np.arange(3)),
        odc.loss_weights,
        odc.state_dict,
        lambda: odc.labels,
        lambda: odc.cluster_sizes,
    )
    for call in calls:
        with pytest.raises(cl.NotInitializedError, match="initialize"):
            call()
    assert issubclass(cl.NotInitializedError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(num_clusters=C, min_cluster_size=N // C + 1), ValueError, "exceeds num_samples"),
        (dict(num_clusters=N + 1, min_cluster_size=0), ValueError, "must not exceed num_samples"),
        (dict(num_clusters=C, momentum=1.5), ValueError, "momentum must be in"),
        (dict(num_clusters=C, metric="cosine"), ValueError, "metric must be one of"),
        (dict(num_clusters=2.0), TypeError, "num_clusters must be an integer"),
        (dict(num_clusters=C, centroid_update_interval=0), ValueError, "centroid_update_interval must be >= 1"),
    ],
)
def test_bad_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        cl.OnlineDeepClustering(N, feat_dim=D, **kwargs)


def test_bad_initialize_and_state():
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5)
    x0, _ = make_stream(9, steps=0)
    with pytest.raises(ValueError, match="features must have 240 rows"):
        odc.initialize(x0[:-1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        odc.initialize(x0, np.full(N, C))
    with pytest.raises(cl.NotInitializedError):
        odc.step(np.arange(3), x0[:3])
    odc.initialize(x0)
    state = odc.state_dict()
    state["sizes"] = state["sizes"] + 1
    with pytest.raises(ValueError, match="bincount"):
        odc.load_state_dict(state)
    with pytest.raises(ValueError, match="missing keys"):
        odc.load_state_dict({"features": x0})


def test_state_dict_survives_npz_round_trip(tmp_path):
    """np.savez turns the ints into 0-d arrays; loading accepts them."""
    x0, batches = make_stream(10, steps=2)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5)
    odc.initialize(x0)
    odc.step(*batches[0])
    np.savez(tmp_path / "odc.npz", **odc.state_dict())
    other = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5)
    other.load_state_dict(dict(np.load(tmp_path / "odc.npz")))
    assert other.iteration == 1
    assert odc.step(*batches[1]) == other.step(*batches[1])


# ---------------------------------------------------------------------------- edges (review)
def test_dissolved_samples_go_to_nearest_normal_centroid():
    x0, _ = make_stream(11, steps=0)
    feats = cl.l2_normalize(x0)
    labels = cl.kmeans(feats, C, seed=0, backend="array").labels
    labels[labels == 2] = 3  # cluster 2 empty
    labels[np.flatnonzero(labels == 4)[3:]] = 5  # cluster 4 small (3 members)
    mem = cl.SampleMemory(N, D)
    mem.initialize(feats, labels)
    cen = cl.CentroidMemory(C, D, xp=mem.xp, device=None, dtype=mem.dtype)
    cen.initialize(mem.features, mem.labels)
    small = np.bincount(labels, minlength=C) < 10
    movers = np.flatnonzero(small[labels])
    scores = feats[movers] @ cen.centroids.T - (cen.centroids**2).sum(1) / 2
    scores[:, small] = -np.inf
    moved, receivers = cl.SmallClusterHandler(10)._dissolve(mem, cen, small)
    assert moved == len(movers) == 3
    np.testing.assert_array_equal(mem.labels[movers], scores.argmax(1))  # nearest *normal* centroid
    np.testing.assert_array_equal(cen.sizes, np.bincount(mem.labels, minlength=C))


def test_weak_regime_still_keeps_every_cluster_at_the_threshold():
    """C*min <= N < 2*C*min: splits alone cannot always give both halves the threshold."""
    n, c, m = 70, 6, 10
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(n, D)).astype(np.float32)
    attract = rng.normal(size=(2, D)) * 2
    odc = cl.OnlineDeepClustering(n, c, D, min_cluster_size=m, momentum=0.8)
    odc.initialize(x0)
    for step in range(1, 31):
        idx = rng.choice(n, 16, replace=False)
        odc.step(idx, (attract[idx % 2] + 0.5 * rng.normal(size=(16, D))).astype(np.float32))
        sizes = odc.cluster_sizes
        assert sizes.min() >= m, sizes
        np.testing.assert_array_equal(sizes, np.bincount(odc.labels, minlength=c))
        np.testing.assert_allclose(odc.centroid_memory.sums, exact_means(odc.features, odc.labels, c) * sizes[:, None], rtol=0, atol=sums_atol(odc, step))


def test_labels_property_is_a_snapshot(backend):
    odc, (idx, f) = _ready(backend)
    previous = odc.labels
    held = backend.to_numpy(previous).copy()
    for _ in range(3):
        odc.step(backend.asarray(idx), backend.asarray(f * -1.0))
    np.testing.assert_array_equal(backend.to_numpy(previous), held)


def test_state_dict_carries_settings_and_refuses_mismatch():
    x0, _ = make_stream(12, steps=0)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, seed=5, momentum=0.8)
    odc.initialize(x0)
    state = odc.state_dict()
    assert state["seed"] == 5 and state["momentum"] == 0.8 and state["metric"] == "l2"
    with pytest.raises(ValueError, match="state\\['seed'\\] is 5, this object has 0"):
        cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, momentum=0.8).load_state_dict(state)


def test_extreme_and_half_precision_features_stay_unit_norm():
    rng = np.random.default_rng(0)
    for scale in (1e-25, 1.0, 1e20):
        x = (rng.normal(size=(5, D)) * scale).astype(np.float32)
        np.testing.assert_allclose(np.linalg.norm(cl.l2_normalize(x), axis=1), 1.0, rtol=0, atol=unit_norm_atol(D, np.float32))
    torch = pytest.importorskip("torch")
    x0, _ = make_stream(13, steps=0)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, like=torch.zeros(1, dtype=torch.float16))
    odc.initialize(torch.from_numpy(x0).half())
    odc.step(torch.arange(8), (torch.randn(8, D) * 300).half())  # squares overflow float16
    assert torch.isfinite(odc.features).all() and torch.isfinite(odc.centroid_memory.sums).all()


def test_torch_bf16_features_and_small_int_indices_into_numpy_memory():
    torch = pytest.importorskip("torch")
    x0, batches = make_stream(14, steps=1)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5)
    odc.initialize(x0)
    idx, f = batches[0]
    odc.step(torch.from_numpy(idx).to(torch.int16), torch.from_numpy(f).to(torch.bfloat16))
    assert odc.labels_of(torch.from_numpy(idx).to(torch.int16)).shape == (BATCH,)


def test_all_zero_feature_row_rejected(numpy_backend):
    odc, (idx, f) = _ready(numpy_backend)
    f = f.copy()
    f[4] = 0
    with pytest.raises(ValueError, match="all-zero row"):
        odc.step(idx, f)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # NumPy's, before our error
def test_float64_features_outside_the_memory_dtype_rejected(numpy_backend):
    odc, (idx, f) = _ready(numpy_backend)
    before = odc.state_dict()
    huge = f.astype(np.float64)
    huge[2] = 1e300  # finite in float64, inf in the float32 memory
    with pytest.raises(ValueError, match="range of the memory's dtype"):
        odc.step(idx, huge)
    tiny = f.astype(np.float64)
    tiny[3] = 1e-50  # rounds to an all-zero float32 row
    with pytest.raises(ValueError, match="all-zero row"):
        odc.step(idx, tiny)
    for key, value in odc.state_dict().items():
        assert np.array_equal(np.asarray(value), np.asarray(before[key]))


def test_dot_metric_has_no_distances():
    with pytest.raises(ValueError, match="needs metric='l2'"):
        cl.nearest_centroid(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), metric="dot", return_distances=True)



def test_state_dict_loads_with_torch_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    x0, batches = make_stream(15, steps=2)
    odc = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, like=torch.zeros(1))
    odc.initialize(torch.from_numpy(x0))
    odc.step(*map(torch.from_numpy, batches[0]))
    torch.save(odc.state_dict(), tmp_path / "odc.pt")
    other = cl.OnlineDeepClustering(N, C, D, min_cluster_size=5, like=torch.zeros(1))
    other.load_state_dict(torch.load(tmp_path / "odc.pt", weights_only=True))
    assert odc.step(*map(torch.from_numpy, batches[1])) == other.step(*map(torch.from_numpy, batches[1]))
