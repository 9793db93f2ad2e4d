"""PCAWhitening / pca_whiten_l2: whitening, unit rows, backend agreement, input validation."""

from __future__ import annotations

import array_api_compat as aac
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterlearn import backend as B
from clusterlearn.pca import PCAWhitening, pca_whiten_l2

from bounds import unit_norm_atol, whitening_bounds

def _features(seed: int, n: int, d: int) -> np.ndarray:
    """(n, d) float32 features: a random rotation of axes with std in [1, 4], offset by 3."""
    gen = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(gen.normal(size=(d, d)))
    scales = gen.uniform(1.0, 4.0, size=d)
    return (gen.normal(size=(n, d)) * scales @ rotation + 3.0).astype(np.float32)


# Two fixed shapes (N, D, dim), shared by the tests: JAX compiles every op (eigh: about a
# second) once per shape, so the properties vary the data rather than the shapes.
SHAPES = [(64, 8, 8), (150, 12, 5)]


@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(SHAPES))
def test_whitened_covariance_then_unit_rows(backend, seed, shape):
    n, d, dim = shape
    x = backend.asarray(_features(seed, n, d))
    bound = whitening_bounds(_features(seed, n, d), dim, B.accumulator_dtype(backend.xp))

    z = PCAWhitening(dim, normalize=False).fit_transform(x)
    assert aac.array_namespace(z) is aac.array_namespace(x)
    z = backend.to_numpy(z).astype(np.float64)
    assert z.shape == (n, dim)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=bound["mean"])
    np.testing.assert_allclose(z.T @ z / n, np.eye(dim), atol=bound["cov"])

    y, fitted = pca_whiten_l2(x, dim)
    assert y.dtype == x.dtype
    y = backend.to_numpy(y)
    assert y.shape == (n, dim)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=0, atol=unit_norm_atol(dim, np.float32))
    # The normalised output is the whitened one, row-normalised (each from its own z: 2 z_rel,
    # and the normalisation); the fit can be re-applied (two computations of z).
    atol = 2 * bound["z_rel"] + unit_norm_atol(dim, np.float32)
    np.testing.assert_allclose(y, z / np.linalg.norm(z, axis=1, keepdims=True), rtol=0, atol=atol)
    np.testing.assert_allclose(backend.to_numpy(fitted.transform(x)), y, rtol=0, atol=atol)


@given(seed=st.integers(0, 2**32 - 1), scale=st.floats(1e-3, 1e3))
def test_same_transform_on_every_backend_and_scale(backend, seed, scale):
    features = _features(seed, 150, 12)
    reference = PCAWhitening(5).fit_transform(features)
    y = PCAWhitening(5).fit_transform(backend.asarray(features * np.float32(scale)))
    # eigenvectors are determined up to sign only: the core fixes it (else this would fail)
    atol = whitening_bounds(features, 5, B.accumulator_dtype(backend.xp))["refit"]
    np.testing.assert_allclose(backend.to_numpy(y), reference, rtol=0, atol=atol)


def test_fitted_state_and_new_data(backend):
    x = backend.asarray(_features(0, 150, 12))
    pca = PCAWhitening(5).fit(x)
    assert tuple(pca.mean_.shape) == (12,)
    assert tuple(pca.components_.shape) == (12, 5)
    variance = backend.to_numpy(pca.explained_variance_)
    assert variance.shape == (5,) and np.all(np.diff(variance) <= 0)
    y = backend.to_numpy(pca.transform(backend.asarray(_features(1, 7, 12))))
    assert y.shape == (7, 5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=0, atol=unit_norm_atol(5, np.float32))


def test_float64_in_float64_out(backend):
    info = backend.xp.__array_namespace_info__()
    if "float64" not in info.dtypes(kind="real floating"):
        pytest.skip("no float64 on this backend/configuration")
    x = backend.asarray(_features(0, 50, 4), dtype=backend.xp.float64)
    assert PCAWhitening(2).fit_transform(x).dtype == backend.xp.float64


@pytest.mark.parametrize(("n", "d", "dim"), [(5, 10, 6), (10, 4, 5), (3, 3, 4)])
def test_dim_larger_than_min_n_d_is_refused(backend, n, d, dim):
    x = backend.asarray(_features(0, n, d))
    with pytest.raises(ValueError, match=r"dim=.*min\(N, D\)"):
        PCAWhitening(dim).fit(x)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: np.ones(10, dtype=np.float32), ValueError, "2-D"),
        (lambda: np.ones((2, 3, 4), dtype=np.float32), ValueError, "2-D"),
        (lambda: np.ones((0, 4), dtype=np.float32), ValueError, "empty"),
        (lambda: np.ones((4, 0), dtype=np.float32), ValueError, r"min\(N, D\) = min\(4, 0\)"),
        (lambda: np.where(np.eye(4) > 0, np.nan, 1.0), ValueError, "NaN or Inf"),
        (lambda: np.where(np.eye(4) > 0, np.inf, 1.0), ValueError, "NaN or Inf"),
        (lambda: np.arange(12).reshape(4, 3), TypeError, "floating"),
        (lambda: np.ones((64, 8), dtype=np.float32), ValueError, "zero variance"),
    ],
)
def test_bad_features_raise(backend, make, error, match):
    with pytest.raises(error, match=match):
        PCAWhitening(2).fit(backend.asarray(make()))


def test_not_an_array_raises():
    with pytest.raises(TypeError, match="x must be an array"):
        PCAWhitening(2).fit([[1.0, 2.0], [3.0, 4.0]])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"dim": 0}, ValueError),
        ({"dim": 2.0}, TypeError),
        ({"eps": 0.0}, ValueError),
        ({"eps": float("nan")}, ValueError),
        ({"eps": float("inf")}, ValueError),
        ({"eps": "1e-5"}, TypeError),
    ],
)
def test_bad_parameters_raise(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        PCAWhitening(**kwargs)


def test_transform_before_fit_and_mismatched_input(backend, numpy_backend):
    features = _features(0, 64, 8)
    with pytest.raises(ValueError, match="before fit"):
        PCAWhitening(8).transform(backend.asarray(features))
    pca = PCAWhitening(8).fit(backend.asarray(features))
    with pytest.raises(ValueError, match="fitted on 8"):
        pca.transform(backend.asarray(features[:, :7]))
    if backend.name != "numpy":
        with pytest.raises(TypeError, match="different namespaces"):
            pca.transform(numpy_backend.asarray(features))
