"""Nearest-centroid assignment: the one matmul every ODC iteration and k-means step pays for.

Pure functions over arrays of any array-API namespace; no state.

Two rules are offered because the ODC paper and its reference code disagree:

``"l2"`` (default, the paper)
    ``argmin_c ||x - c||^2 = argmin_c (||c||^2 - 2 x.c)``.
``"dot"`` (the reference implementation)
    ``argmax_c x.c`` with un-normalised centroids. For unit-norm ``x`` this equals ``"l2"`` only
    when all centroids have the same norm; centroids that are means of unit vectors are
    shorter the more spread their members are, so ``"dot"`` favours tight clusters.
"""

from __future__ import annotations

from typing import Any, Literal

import array_api_compat as aac

from . import backend as B

Array = Any
Metric = Literal["l2", "dot"]

METRICS = ("l2", "dot")
_BLOCK_ELEMENTS = 1 << 24  # rows x clusters per score block: 64 MiB of float32


def centroid_half_sq_norms(centroids: Array) -> Array:
    """(C,) ``||c||^2 / 2`` of every row of ``centroids`` (C, D), their dtype: the shift of the
    ``"l2"`` scores.

    The one expression every caller uses, so that a value computed once (when the centroids
    change) and passed as ``half_sq_norms=`` gives bit for bit the scores of recomputing it.
    """
    xp = aac.array_namespace(centroids)
    return xp.sum(centroids * centroids, axis=1) / 2


def centroid_scores(x: Array, centroids: Array, *, metric: Metric = "l2", half_sq_norms: Array | None = None) -> Array:
    """Scores to *maximise* over clusters, shape (B, C), dtype of ``x``.

    ``"l2"``: ``x.c - ||c||^2 / 2`` (half the negated squared distance, up to the constant
    ``||x||^2 / 2``); ``"dot"``: ``x.c``. ``half_sq_norms`` (C,) may pass
    :func:`centroid_half_sq_norms` of ``centroids``.
    One matmul and, for ``"l2"``, one in-place pass over the (B, C) result.
    """
    xp = aac.array_namespace(x, centroids)
    scores = xp.matmul(x, xp.matrix_transpose(centroids))
    if metric == "l2":
        if half_sq_norms is None:
            half_sq_norms = centroid_half_sq_norms(centroids)
        scores -= half_sq_norms[None, :]  # in place where the backend allows it
    return scores


def nearest_centroid(
    x: Array,
    centroids: Array,
    *,
    metric: Metric = "l2",
    exclude: Array | None = None,
    half_sq_norms: Array | None = None,
    return_distances: bool = False,
) -> Array | tuple[Array, Array]:
    """Index of the nearest centroid for every row of ``x``.

    Parameters
    ----------
    x : (B, D) real floating array
    centroids : (C, D) array, same namespace and dtype as ``x``
    metric : {"l2", "dot"}
    exclude : (C,) bool array, optional
        Clusters that may not be chosen (at least one must stay allowed).
    half_sq_norms : (C,) array, optional
        :func:`centroid_half_sq_norms` of ``centroids``, when already computed (``"l2"`` only; not
        checked against them).
    return_distances : bool
        Also return the (B,) squared L2 distance to the chosen centroid (``"l2"`` only).

    Returns
    -------
    labels : (B,) array of the namespace's default integer dtype; ties go to the lowest id
    distances : (B,) array, only if ``return_distances``

    Rows are processed in blocks so that the score matrix stays below 64 MiB.
    """
    xp = aac.array_namespace(x, centroids)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if return_distances and metric != "l2":
        raise ValueError("return_distances=True needs metric='l2'")
    if metric == "l2" and half_sq_norms is None:
        half_sq_norms = centroid_half_sq_norms(centroids)
    n, k = x.shape[0], centroids.shape[0]
    block = max(1, _BLOCK_ELEMENTS // max(k, 1))
    labels, dists = [], []
    for start in range(0, n, block):
        xb = x[start : min(start + block, n), ...]
        scores = centroid_scores(xb, centroids, metric=metric, half_sq_norms=half_sq_norms)
        if exclude is not None:
            scores = xp.where(exclude[None, :], xp.asarray(-float("inf"), dtype=scores.dtype), scores)
        labels.append(B.argmax_rows(scores))
        if return_distances:
            best = xp.sum(xb * xb, axis=1) - 2 * xp.max(scores, axis=1)
            dists.append(xp.clip(best, min=0.0))
    out = labels[0] if len(labels) == 1 else xp.concat(labels)
    if not return_distances:
        return out
    return out, dists[0] if len(dists) == 1 else xp.concat(dists)
