"""PCA-whitening followed by row L2-normalisation: DeepCluster's feature pre-processing.

The transform is fitted on an (N, D) feature matrix and maps each row ``x`` to

.. math:: y = \\frac{z}{\\lVert z \\rVert_2}, \\qquad
          z = (x - \\mu)\\, V \\operatorname{diag}\\big((\\lambda + \\varepsilon\\,\\lambda_1)^{-1/2}\\big)

where ``mu`` is the feature mean and ``V`` (D, dim), ``lambda`` (dim,) are the leading
eigenvectors and eigenvalues of the (biased, divided by N) covariance matrix; ``lambda_1`` is the
largest eigenvalue. Before normalisation, the transformed training features therefore have
(nearly) identity covariance.

Design
------
* **Eigendecomposition of the D x D covariance** (``xp.linalg.eigh``) rather than an SVD of the
  centred N x D matrix: N is the data-set size (1.2 M for ImageNet) and D the feature width (a few
  thousand), so the covariance costs O(N D^2) time and O(D^2) memory, and the decomposition
  O(D^3) is independent of N. The covariance is accumulated over row blocks in float64 where
  the backend supports it (float32 on JAX without x64 and on MPS), so no float64 copy of the
  features is ever made.
* **Relative eps**: ``eps`` is multiplied by the largest eigenvalue before it is added to the
  eigenvalues, so the transform does not depend on the scale of the features, and directions with
  negligible variance are damped instead of amplified.
* **Deterministic signs**: each eigenvector is flipped so that its largest-magnitude entry is
  positive, so every backend returns the same transform (up to rounding).
* The fitted state is kept as arrays of the caller's namespace and device, in the dtype the
  covariance was accumulated in; ``transform`` returns the dtype of its input.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import array_api_compat as aac

from .backend import accumulator_dtype, namespace, power_of_two_exponent, times_power_of_two, to_numpy
from .shards import Psum
from .validation import check_features, check_int, check_real

Array = Any

__all__ = ["PCAWhitening", "pca_whiten_l2"]

# Rows per covariance block: about 2**24 elements (128 MiB in float64) at a time.
_BLOCK_ELEMENTS = 1 << 24


def _check_features(x: Array) -> ModuleType:
    """Validate the (N, D) finite real-floating feature matrix ``x``; return its namespace."""
    xp = namespace(x=x)
    check_features(x, "x")
    return xp


class PCAWhitening:
    """PCA to ``dim`` dimensions with whitening, then L2-normalisation of each row.

    Parameters
    ----------
    dim : int, default 256
        Number of principal components kept; ``fit`` refuses ``dim > min(N, D)``. With
        ``dim`` close to N the trailing components carry almost no variance and are damped
        by ``eps`` rather than whitened.
    eps : float, default 1e-5
        Regulariser relative to the largest eigenvalue: component ``i`` is divided by
        ``sqrt(lambda_i + eps * lambda_1)``. Must be positive.
    normalize : bool, default True
        L2-normalise the rows of the output. ``False`` returns the whitened features, whose
        covariance on the training data is (nearly) the identity.

    Attributes
    ----------
    mean_ : (D,) array
        Feature mean of the training data.
    components_ : (D, dim) array
        Principal axes (unit columns), by decreasing variance.
    explained_variance_ : (dim,) array
        Eigenvalues of the covariance (divided by N) for those axes.
    projection_ : (D, dim) array
        ``components_`` with column ``i`` divided by ``sqrt(explained_variance_[i] + eps *
        explained_variance_[0])``.

    Notes
    -----
    The attributes are arrays of the training features' namespace and device, float64 where
    the backend supports it, else float32. They exist only after ``fit``.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(500, 64)).astype(np.float32)
    >>> y = PCAWhitening(dim=16).fit_transform(x)
    >>> y.shape, y.dtype
    ((500, 16), dtype('float32'))
    """

    def __init__(self, dim: int = 256, eps: float = 1e-5, *, normalize: bool = True) -> None:
        self.dim = check_int(dim, "dim", minimum=1)
        self.eps = check_real(eps, "eps", low=0.0, high=math.inf)
        if not 0.0 < self.eps < math.inf:
            raise ValueError(f"eps must be positive and finite, got {self.eps}")
        self.normalize = bool(normalize)

    def fit(self, x: Array, *, psum: Psum | None = None, shard: int = 0, num_shards: int = 1) -> PCAWhitening:
        """Fit the transform on features ``x``, or on the rows of all shards together.

        Parameters
        ----------
        x : (N, D) array, real floating dtype, finite, of any magnitude (the fit runs on x
            scaled by a power of two; ``explained_variance_`` is ``inf`` where it exceeds the
            accumulator dtype). Any array-API backend; the fitted state lives in the same
            namespace and device. With ``psum``: this shard's (n, D) rows (n >= 0).
        psum : callable, optional
            Element-wise sum over shards, the result on every shard
            (``torch.distributed.all_reduce``, ``jax.lax.psum``). Given, the fit is a
            collective over ``num_shards`` shards: the mean and then the centred (D, D)
            scatter are all-reduced (O(D^2) bytes, never the rows), and every shard gets the
            same transform, equal to the fit on all rows to rounding.
        shard, num_shards : int
            This shard's number in [0, num_shards) and the number of shards (with ``psum``).

        Returns
        -------
        self

        Raises
        ------
        TypeError
            ``x`` is not an array or not floating.
        ValueError
            ``x`` is not 2-D, has no rows (over all shards), is not finite or has zero
            variance, or ``dim > min(N, D)``; a bad ``shard``/``num_shards``.
        """
        xp = namespace(x=x)
        dev = aac.device(x)
        acc = accumulator_dtype(xp, dev)
        if psum is None:
            check_features(x, "x")
            total = lambda a: a  # noqa: E731
            peak = x
        else:
            check_features(x, "x", allow_empty=True)
            num_shards = check_int(num_shards, "num_shards", minimum=1)
            shard = check_int(shard, "shard", minimum=0)
            if shard >= num_shards:
                raise ValueError(f"shard must be in [0, num_shards={num_shards}), got {shard}")
            total = psum
            # the largest |entry| of every shard, so that all scale by the same power of two
            local = xp.zeros((num_shards,), dtype=x.dtype, device=dev)
            if x.shape[0]:
                local = xp.where(xp.arange(num_shards, device=dev) == shard, xp.max(xp.abs(x)), local)
            peak = psum(local)
        n = x.shape[0] if psum is None else int(to_numpy(psum(xp.asarray([x.shape[0]], device=dev)))[0])
        if n == 0:
            raise ValueError("x has no rows on any shard")
        d = x.shape[1]
        if self.dim > min(n, d):
            raise ValueError(
                f"dim={self.dim} exceeds min(N, D) = min({n}, {d}) of the features x"
            )
        # The whitened output does not depend on the scale of x (eps is relative): fit on
        # x / 2**e, max entry in [0.5, 1), so the covariance cannot overflow or underflow.
        e = power_of_two_exponent(peak)
        x = times_power_of_two(x, -e)
        mean = total(xp.sum(x, axis=0, dtype=acc)) / n
        cov = xp.zeros((d, d), dtype=acc, device=dev)
        step = max(1, _BLOCK_ELEMENTS // d)
        for start in range(0, x.shape[0], step):
            block = xp.astype(x[start : min(start + step, x.shape[0]), :], acc) - mean
            cov = cov + xp.matmul(xp.matrix_transpose(block), block)
        cov = total(cov) / n
        eigenvalues, eigenvectors = xp.linalg.eigh(cov)  # ascending order
        values = xp.flip(eigenvalues[d - self.dim :], axis=0)
        vectors = xp.flip(eigenvectors[:, d - self.dim :], axis=1)
        # Sign convention: the largest-magnitude entry of every axis is positive.
        flat = xp.reshape(xp.matrix_transpose(vectors), (-1,))
        peak = xp.argmax(xp.abs(vectors), axis=0) + d * xp.arange(self.dim, device=dev)
        vectors = vectors * xp.sign(xp.take(flat, peak))
        values = xp.clip(values, 0.0, None)  # round-off can make null eigenvalues negative
        if not bool(values[0] > 0):
            raise ValueError("x has zero variance (all rows are equal); PCA is undefined")
        scale = 1.0 / xp.sqrt(values + self.eps * values[0])
        self._exponent = e
        self._scaled_projection = vectors * scale  # acts on (x - mean) / 2**e
        self.mean_ = times_power_of_two(mean, e)
        self.components_ = vectors
        self.explained_variance_ = times_power_of_two(values, 2 * e)
        self.projection_ = times_power_of_two(self._scaled_projection, -e)
        return self

    def transform(self, x: Array) -> Array:
        """Apply the fitted transform.

        Parameters
        ----------
        x : (M, D) array, real floating dtype, finite
            Same namespace as the training features and the same D.

        Returns
        -------
        (M, dim) array of ``x``'s namespace, device and dtype; rows of unit L2 norm when
        ``normalize`` (a zero row, possible only for degenerate data, stays zero).

        Raises
        ------
        ValueError
            Called before ``fit``.
        TypeError, ValueError
            Bad ``x`` as in ``fit``, another namespace than the training features, or another D.
        """
        if not hasattr(self, "projection_"):
            raise ValueError("PCAWhitening.transform called before fit; call fit(x) first")
        xp = _check_features(x)
        namespace(x=x, fitted_state=self.projection_)
        if x.shape[1] != self.projection_.shape[0]:
            raise ValueError(
                f"x has {x.shape[1]} features but the transform was fitted on "
                f"{self.projection_.shape[0]}"
            )
        # Centred and projected at the fit's scale: neither x - mean nor projection_ need fit x's dtype.
        e = self._exponent
        centred = times_power_of_two(x, -e) - xp.astype(times_power_of_two(self.mean_, -e), x.dtype)
        z = xp.matmul(centred, xp.astype(self._scaled_projection, x.dtype))
        if not self.normalize:
            return z
        norms = xp.linalg.vector_norm(z, axis=1, keepdims=True)
        return z / xp.where(norms > 0, norms, xp.ones_like(norms))

    def fit_transform(self, x: Array) -> Array:
        """``fit(x)`` then ``transform(x)``; see both for shapes and errors."""
        return self.fit(x).transform(x)

    def __repr__(self) -> str:
        return f"PCAWhitening(dim={self.dim}, eps={self.eps}, normalize={self.normalize})"


def pca_whiten_l2(
    x: Array, dim: int = 256, *, eps: float = 1e-5
) -> tuple[Array, PCAWhitening]:
    """Fit PCA-whitening + L2 on ``x`` and transform it, as DeepCluster does each epoch.

    Parameters
    ----------
    x : (N, D) array, real floating dtype, finite
    dim : int, default 256
        Output dimension, at most ``min(N, D)``.
    eps : float, default 1e-5
        Eigenvalue regulariser relative to the largest eigenvalue (see `PCAWhitening`).

    Returns
    -------
    transformed : (N, dim) array
        ``x``'s namespace, device and dtype; unit-norm rows.
    fitted : PCAWhitening
        The fitted transform, to re-apply to other features with ``fitted.transform``.
    """
    fitted = PCAWhitening(dim, eps).fit(x)
    return fitted.transform(x), fitted
