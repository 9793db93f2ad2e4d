"""Centroid memory: cluster centroids, exact cluster sizes and exact per-cluster feature sums.

The reference ODC recomputes every centroid by scanning all N samples. Keeping the sizes
``n = bincount(labels)`` and sums ``S[c] = sum of members' features`` in step with the sample
memory makes a refresh ``S / n``: O(C D) instead of O(N D). Sums accumulate in float64 where
the backend has it; :meth:`CentroidMemory.resync` recomputes them exactly from the sample
memory (the ODC object does so periodically) so they cannot drift.
"""

from __future__ import annotations

from typing import Any

import array_api_compat as aac

from . import backend as B
from .assignment import Metric, centroid_half_sq_norms, nearest_centroid

Array = Any

__all__ = ["CentroidMemory", "centroids_from_sums"]


def centroids_from_sums(centroids: Array, sizes: Array, sums: Array) -> Array:
    """(K, D) ``sums / sizes`` in the dtype of ``centroids`` (K, D); empty clusters keep theirs.

    ``sizes`` (K,) integers, ``sums`` (K, D) floating. Pure and static-shaped (``jax.jit``-able).
    """
    xp = aac.array_namespace(centroids, sizes, sums)
    safe = xp.astype(xp.maximum(sizes, xp.ones_like(sizes)), sums.dtype)
    means = xp.astype(sums / safe[:, None], centroids.dtype)  # divided in the sums' precision: one rounding
    return xp.where((sizes > 0)[:, None], means, centroids)


class CentroidMemory:
    """Centroids, sizes and sums of C clusters over D-dimensional features.

    Parameters
    ----------
    num_clusters : C
    feat_dim : D
    xp, device, dtype : namespace, device and floating dtype of the arrays

    Attributes
    ----------
    centroids : (C, D) ``dtype``; the members' mean as of the cluster's last refresh
    sizes : (C,) default integer dtype; always equal to ``bincount(labels, C)``
    sums : (C, D) float64 where available, else ``dtype``; sum of members' current features
    """

    def __init__(self, num_clusters: int, feat_dim: int, *, xp: Any, device: Any, dtype: Any) -> None:
        self.num_clusters, self.feat_dim = num_clusters, feat_dim
        self.xp, self.device, self.dtype = xp, device, dtype
        self.acc_dtype = B.accumulator_dtype(xp, device)
        self.centroids = xp.zeros((num_clusters, feat_dim), dtype=dtype, device=device)
        self.sizes = xp.zeros((num_clusters,), dtype=B.index_dtype(xp, device), device=device)
        self.sums = xp.zeros((num_clusters, feat_dim), dtype=self.acc_dtype, device=device)
        self._half_sq_norms = xp.zeros((num_clusters,), dtype=dtype, device=device)

    def resync(self, features: Array, labels: Array) -> None:
        """Recompute ``sums`` and ``sizes`` exactly from all samples (O(N D))."""
        xp = self.xp
        zeros = xp.zeros((self.num_clusters, self.feat_dim), dtype=self.acc_dtype, device=self.device)
        self.sums = B.scatter_add(zeros, labels, features)
        self.sizes = B.bincount(labels, self.num_clusters)

    def initialize(self, features: Array, labels: Array) -> None:
        """Exact sums, sizes and centroids (members' means) from all samples."""
        self.resync(features, labels)
        self.refresh()  # from the exact sums just computed: one O(N D) pass, not two

    @property
    def half_sq_norms(self) -> Array:
        """(C,) :func:`~clusterlearn.assignment.centroid_half_sq_norms` of ``centroids``, kept
        in step by :meth:`refresh` and :meth:`set_state` (read-only: do not write to it)."""
        return self._half_sq_norms

    def assign(self, features: Array, *, metric: Metric = "l2", exclude: Array | None = None) -> Array:
        """(B,) nearest-centroid labels of (B, D) ``features``; see :mod:`clusterlearn.assignment`."""
        return nearest_centroid(features, self.centroids, metric=metric, exclude=exclude, half_sq_norms=self._half_sq_norms)

    def move(
        self,
        old_labels: Array,
        new_labels: Array,
        old_features: Array,
        new_features: Array,
        count: Array | None = None,
    ) -> None:
        """Replace samples (``old_labels``, ``old_features``) by (``new_labels``, ``new_features``).

        All four have B rows describing the same B samples; sizes and sums stay exact whether
        a sample changed cluster, changed feature, or both. ``count`` (B,) bool marks the rows
        to apply (one per sample when the batch repeats samples); all rows when omitted.
        """
        xp = self.xp
        labels = xp.concat([old_labels, new_labels])
        if count is None:
            one = xp.ones(old_labels.shape, dtype=self.sizes.dtype, device=self.device)
        else:
            one = xp.astype(count, self.sizes.dtype)
            weight = xp.astype(count, self.acc_dtype)[:, None]
            old_features, new_features = old_features * weight, new_features * weight
        self.sizes = B.scatter_add(self.sizes, labels, xp.concat([-one, one]))
        feats = xp.concat([-xp.astype(old_features, self.acc_dtype), xp.astype(new_features, self.acc_dtype)])
        self.sums = B.scatter_add(self.sums, labels, feats)

    def refresh(self, clusters: Array | None = None) -> None:
        """Set centroids to their members' mean ``sums / sizes`` (empty clusters keep theirs).

        clusters : (K,) distinct cluster ids to refresh; all clusters when omitted.
        """
        xp = self.xp
        if clusters is None:
            sums, sizes, current = self.sums, self.sizes, self.centroids
        else:
            sums = xp.take(self.sums, clusters, axis=0)
            sizes = xp.take(self.sizes, clusters)
            current = xp.take(self.centroids, clusters, axis=0)
        means = centroids_from_sums(current, sizes, sums)
        if clusters is None:
            self.centroids = means
        else:
            self.centroids = B.set_rows(self.centroids, clusters, means)
        self._half_sq_norms = centroid_half_sq_norms(self.centroids)

    def set_state(self, centroids: Array, sizes: Array, sums: Array) -> None:
        """Hold ``centroids`` (C, D), ``sizes`` (C,) and ``sums`` (C, D) themselves (not checked)."""
        if centroids is not self.centroids:
            self._half_sq_norms = centroid_half_sq_norms(centroids)
        self.centroids, self.sizes, self.sums = centroids, sizes, sums
