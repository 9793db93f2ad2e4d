"""The dispatch primitives the standard lacks, on every backend, duplicates included."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterlearn import backend as B

from bounds import gamma


def assert_sums_close(out: np.ndarray, expected: np.ndarray, idx, vals: np.ndarray) -> None:
    """``out`` equals the scatter-sum ``expected`` to the rounding of summing, in ``out``'s
    dtype and any order, the values landing on each entry (plus their conversion to it):
    γ_{k+1} times the sum of their magnitudes, k = the most values on one entry."""
    magnitude = np.zeros(expected.shape)
    np.add.at(magnitude, np.asarray(idx), np.abs(vals))
    k = int(np.bincount(np.asarray(idx)).max())
    err = np.abs(out - expected)
    tol = gamma(k + 1, out.dtype) * magnitude
    assert np.all(err <= tol), (err.max(), tol.max())

index_lists = st.lists(st.integers(0, 6), min_size=1, max_size=30)


@settings(max_examples=15)
@given(idx=index_lists, seed=st.integers(0, 2**16))
def test_scatter_add_accumulates_duplicates(backend, idx, seed):
    rng = np.random.default_rng(seed)
    vals = rng.normal(size=(len(idx), 3))
    expected = np.zeros((7, 3))
    np.add.at(expected, np.asarray(idx), vals)
    acc = backend.asarray(np.zeros((7, 3)), dtype=backend.xp.float64 if backend.name != "jax" else None)
    out = B.scatter_add(acc, backend.asarray(np.asarray(idx)), backend.asarray(vals, dtype=acc.dtype))
    assert_sums_close(backend.to_numpy(out), expected, idx, vals)
    counts = B.scatter_add(
        backend.asarray(np.zeros(7, dtype=np.int64)), backend.asarray(np.asarray(idx)), backend.asarray(np.ones(len(idx), dtype=np.int64))
    )
    np.testing.assert_array_equal(backend.to_numpy(counts), np.bincount(idx, minlength=7))


@settings(max_examples=15)
@given(idx=index_lists)
def test_bincount_matches_numpy(backend, idx):
    out = B.bincount(backend.asarray(np.asarray(idx)), 9)
    assert out.shape == (9,)
    np.testing.assert_array_equal(backend.to_numpy(out), np.bincount(idx, minlength=9))


def test_set_rows(backend):
    x = backend.asarray(np.zeros((5, 2)))
    out = B.set_rows(x, backend.asarray(np.array([3, 1, 3])), backend.asarray(np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])))
    expected = np.zeros((5, 2))
    expected[3], expected[1] = [1, 2], [3, 4]
    np.testing.assert_array_equal(backend.to_numpy(out), expected)


def test_namespace_rejects_mixing_and_non_arrays(backend):
    if backend.name == "numpy":
        pytest.skip("needs a second namespace")
    with pytest.raises(TypeError, match="indices from .*features from"):
        B.namespace(indices=np.arange(3), features=backend.asarray(np.zeros((3, 2))))
    with pytest.raises(TypeError, match="features must be an array"):
        B.namespace(features=[[1.0, 2.0]])


def test_convert_round_trip(backend):
    import array_api_compat.numpy as npx

    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    moved = B.convert(a, backend.xp)
    assert B.namespace(x=moved) is B.namespace(x=backend.asarray(a))
    np.testing.assert_array_equal(B.to_numpy(B.convert(moved, npx)), a)


def test_accumulator_dtype_is_widest_available(backend):
    dtype = B.accumulator_dtype(backend.xp)
    assert dtype == (backend.xp.float32 if backend.name == "jax" else backend.xp.float64)


def test_scatter_add_rows_sums_a_block_of_rows_at_a_time(backend, monkeypatch):
    """Blocks of 7 rows (a bound of 28 elements at D = 4), repeated indices across blocks:
    the sums of one scatter_add, and no block casts more than the bound (JAX: one scatter,
    whose cast XLA fuses)."""
    monkeypatch.setattr(B, "_ROWS_BLOCK_ELEMENTS", 28)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 5, size=40)
    vals = rng.normal(size=(40, 4)).astype(np.float32)
    expected = np.zeros((5, 4))
    np.add.at(expected, idx, vals.astype(np.float64))
    seen = []
    real = B.scatter_add
    monkeypatch.setattr(B, "scatter_add", lambda x, i, v: seen.append(v.shape[0]) or real(x, i, v))
    acc = backend.xp.zeros((5, 4), dtype=B.accumulator_dtype(backend.xp))
    out = B.scatter_add_rows(acc, backend.asarray(idx), backend.asarray(vals))
    assert seen == ([40] if backend.name == "jax" else [7] * 5 + [5])  # JAX: one fused scatter
    assert_sums_close(backend.to_numpy(out), expected, idx, vals)


def test_scatter_add_many_repeats_uses_chunked_path_exactly(backend):
    """Many repeats over several NumPy chunks (a full resync): same sums as np.add.at."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 50, size=B._NUMPY_CHUNK + 1234)
    vals = rng.normal(size=(idx.shape[0], 4)).astype(np.float32)
    expected = np.zeros((50, 4))
    np.add.at(expected, idx, vals.astype(np.float64))
    acc = backend.xp.zeros((50, 4), dtype=B.accumulator_dtype(backend.xp))
    out = B.scatter_add(acc, backend.asarray(idx), backend.asarray(vals))
    assert_sums_close(backend.to_numpy(out), expected, idx, vals)
