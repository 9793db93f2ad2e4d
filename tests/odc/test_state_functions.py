"""The pure functions of :mod:`clusterlearn.odc_state` on every backend and under ``jax.jit``.

Each test runs one function (``init``, ``step``, ``refresh``, ``resync``, ``loss_weights``)
through ``core_backend`` (every array backend eagerly, and ``jit``: traced by ``jax.jit`` with
the config static) and compares it with the same function run eagerly on NumPy. A function
that stops being traceable (a Python ``bool``/``float``/``int`` of an array value, a shape
that depends on values) fails here on ``jit`` only.

Each step starts from the NumPy run's state before it (moved to the backend), so rounding does
not accumulate along the run and one step's bounds (``tests/bounds.py``) apply. Labels, sizes,
the iteration and the integer statistics are compared exactly: the reference checks that every
label it assigns beats the runner-up by more than two float32 evaluations of the score can
disagree.
"""

from __future__ import annotations

import numpy as np

from clusterlearn import odc_state

from bounds import gamma, momentum_feature_atol, reweight_rtol, running_sum_atol, unit_roundoff
from streams import BATCH, C, D, N, drifting_stream

CONFIG = odc_state.ODCConfig(N, C, D, momentum=0.2, min_cluster_size=0, centroid_update_interval=3, resync_interval=4)
U32 = unit_roundoff(np.float32)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)


def initial() -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm (N, D) float32 features and labels with every cluster non-empty."""
    x0, _ = drifting_stream(20, 0)
    return unit_rows(x0), np.random.default_rng(21).permutation(np.arange(N) % C)


def batches() -> list[tuple[np.ndarray, np.ndarray]]:
    """8 batches of the drifting stream (repeated indices), a refused one (NaN) after the
    second and one of distinct indices after the fourth: every branch of the step, 9 applied
    steps, so resyncs (every 4) and refreshes (every 3) both happen."""
    _, stream = drifting_stream(22, 8)
    _, (distinct,) = drifting_stream(23, 1, repeats=0)
    refused = (stream[0][0], stream[0][1].copy())
    refused[1][1, 1] = np.nan
    return [*stream[:2], refused, *stream[2:4], distinct, *stream[4:]]


def snapshot(state: odc_state.ODCState, backend=None) -> odc_state.ODCState:
    """Host copies of the arrays (NumPy and PyTorch update the memory in place)."""
    return odc_state.ODCState(*(np.array(x if backend is None else backend.to_numpy(x), copy=True) for x in state))


#: One float32 momentum update's error of a memory entry (two computations).
FEATURE_ATOL = momentum_feature_atol(D, CONFIG.momentum, 1, np.float32)


def assign_margin_atol() -> float:
    """How far two evaluations of a score ``|c|² − 2 f·c`` (unit ``f``, ``|c| <= 1``, the same
    centroids) of one step can disagree: the D-term dot product and two operations, γ_{D+2} · 3
    each, and the updated feature's error, at most 2 sqrt(D) FEATURE_ATOL each."""
    return 2 * (3 * gamma(D + 2, np.float32) + 2 * np.sqrt(D) * FEATURE_ATOL)


def sums_atol(dtype) -> float:
    """One step's sums against NumPy's float64 ones: a cast to ``dtype`` and at most 2 B
    moves, or a resync's N-term sums, partial sums <= N, in each; plus the B moved rows'
    feature errors."""
    return running_sum_atol(N + 2 * BATCH + 1, N, dtype) + running_sum_atol(N + 2 * BATCH, N, np.float64) + 2 * BATCH * FEATURE_ATOL


def reference() -> list[tuple[odc_state.ODCState, tuple[np.ndarray, np.ndarray], odc_state.ODCState, dict]]:
    """The NumPy run: ``(state before, batch, state after, stats)`` per batch.

    Checks that each assigned label wins by more than :func:`assign_margin_atol`, so that the
    other backends must assign the same labels.
    """
    x0, y0 = initial()
    state = odc_state.init(x0, y0, C)
    run = []
    for idx, f in batches():
        before = snapshot(state)
        state, stats = odc_state.step(state, idx, f, CONFIG)
        if bool(stats["applied"]):
            rows, c = state.features[idx].astype(np.float64), before.centroids.astype(np.float64)
            scores = np.sort((c * c).sum(axis=1)[None, :] - 2 * rows @ c.T, axis=1)
            assert (scores[:, 1] - scores[:, 0]).min() > assign_margin_atol()
        run.append((before, (idx, f), snapshot(state), {key: np.asarray(v).item() for key, v in stats.items()}))
    return run


def on(backend, state: odc_state.ODCState) -> odc_state.ODCState:
    """``state`` moved to ``backend`` (floats float32, integers the default integer dtype)."""
    return odc_state.ODCState(*(backend.asarray(x) for x in state))


def assert_state_close(got: odc_state.ODCState, want: odc_state.ODCState) -> None:
    for name in ("labels", "sizes", "iteration"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    sums = sums_atol(got.sums.dtype)
    centroids = sums / max(int(want.sizes.min()), 1) + 2 * U32  # sums / sizes, or unchanged
    np.testing.assert_allclose(got.features, want.features, rtol=0, atol=FEATURE_ATOL, err_msg="features")
    np.testing.assert_allclose(got.sums, want.sums, rtol=0, atol=sums, err_msg="sums")
    np.testing.assert_allclose(got.centroids, want.centroids, rtol=0, atol=centroids, err_msg="centroids")


def test_init_equals_numpy(core_backend):
    x0, y0 = initial()
    want = odc_state.init(x0, y0, C)
    got = snapshot(core_backend.call(odc_state.init, core_backend.asarray(x0), core_backend.asarray(y0), num_clusters=C), core_backend)
    np.testing.assert_array_equal(got.features, want.features)
    for name in ("labels", "sizes", "iteration"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    sums = gamma(N, got.sums.dtype) * N + gamma(N, np.float64) * N  # N-term sums
    np.testing.assert_allclose(got.sums, want.sums, rtol=0, atol=sums)
    np.testing.assert_allclose(got.centroids, want.centroids, rtol=0, atol=sums / int(want.sizes.min()) + 2 * U32)


def test_step_equals_numpy(core_backend):
    """Every step of the run from the reference's state before it, the refused batch too."""
    run = reference()
    for k, (before, (idx, f), want, want_stats) in enumerate(run, start=1):
        state, stats = core_backend.call(odc_state.step, on(core_backend, before), core_backend.asarray(idx), core_backend.asarray(f), config=CONFIG)
        got = {key: core_backend.to_numpy(v).item() for key, v in stats.items()}
        ratio, want_ratio = got.pop("change_ratio"), want_stats["change_ratio"]
        assert got == {key: v for key, v in want_stats.items() if key != "change_ratio"}, k
        assert abs(ratio - want_ratio) <= U32 * want_ratio, k  # one float32 division
        assert_state_close(snapshot(state, core_backend), want)
    stats = [r[3] for r in run]
    assert [s["applied"] for s in stats].count(False) == 1 and int(run[-1][2].iteration) == 9
    assert sum(s["centroids_refreshed"] for s in stats) == 3 and sum(s["num_changed"] for s in stats) > 0


def test_refresh_resync_and_loss_weights_equal_numpy(core_backend):
    """On the state after the run: refresh (centroids from the sums), resync (sums and sizes
    from the memory) and the loss weights."""
    final = reference()[-1][2]
    state = on(core_backend, final)
    want = odc_state.refresh(snapshot(final))
    got = snapshot(core_backend.call(odc_state.refresh, state), core_backend)
    np.testing.assert_array_equal(got.labels, want.labels)
    cast = running_sum_atol(1, N, got.sums.dtype)  # the sums cast to float32
    np.testing.assert_allclose(got.centroids, want.centroids, rtol=0, atol=cast / int(final.sizes.min()) + 2 * U32)

    want = odc_state.resync(snapshot(final))
    got = snapshot(core_backend.call(odc_state.resync, state), core_backend)
    np.testing.assert_array_equal(got.sizes, np.bincount(final.labels, minlength=C))
    np.testing.assert_array_equal(got.sizes, want.sizes)
    exact = gamma(N, got.sums.dtype) * N + gamma(N, np.float64) * N  # N-term sums
    np.testing.assert_allclose(got.sums, want.sums, rtol=0, atol=exact)

    want = odc_state.loss_weights(snapshot(final), CONFIG)
    got = core_backend.to_numpy(core_backend.call(odc_state.loss_weights, state, config=CONFIG))
    rtol = 2 * reweight_rtol(C, CONFIG.reweight_power, N, np.float32)  # two float32 computations
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
