"""DeepCluster's pseudo-labelling, one call per epoch.

Each epoch, the features of the whole data set are PCA-whitened and L2-normalised
(:class:`~clusterlearn.pca.PCAWhitening`, fitted afresh on that epoch's features), clustered
with :func:`~clusterlearn.kmeans.kmeans`, and the cluster assignments become the pseudo-labels
of the next training epoch. The normalised mutual information between consecutive epochs'
labels is DeepCluster's stability signal: it rises and plateaus as training settles.

Design
------
* **PCA dimension clipped, not refused.** The whitened dimension is
  ``min(pca_dim, N, D)``: DeepCluster's default of 256 should not fail on narrower features
  (64-pixel digits, a 128-d projection head) or on a small debugging subset. Each result
  reports the dimension actually used.
* **A seed per epoch**, drawn from ``(seed, epoch)``, as the reference draws a fresh k-means
  seed every epoch; the whole run is still reproducible from ``seed``.
* **State is small and explicit**: the epoch counter and the previous epoch's labels (host
  NumPy), saved and restored with ``state_dict``/``load_state_dict`` so that a resumed run
  continues the seed sequence and the stability signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import backend as B
from . import metrics
from .validation import check_features, check_int
from .assignment import nearest_centroid
from .kmeans import BACKENDS, Backend, Init, kmeans
from .pca import PCAWhitening

Array = Any

__all__ = ["DeepClusterEpoch", "DeepClusterLabeler"]

_MAX_SEED = 2**31 - 1  # per-epoch k-means seeds stay in faiss' (C int) range


@dataclass(frozen=True)
class DeepClusterEpoch:
    """Outcome of one :class:`DeepClusterLabeler` call.

    Attributes
    ----------
    labels : (N,) integer array
        Pseudo-labels in [0, num_clusters), in the namespace and on the device of the
        features, the namespace's default integer dtype; no cluster is empty.
    nmi_previous : float or None
        NMI between these labels and the previous epoch's (1.0: the same partition up to a
        renaming of the clusters); ``None`` on the first epoch.
    n_empty_fixed : int
        Empty clusters that k-means re-seeded.
    inertia : float
        k-means objective of ``labels``: sum of squared distances of the whitened, normalised
        features to their cluster's centroid.
    epoch : int
        0-based index of this clustering (the number of earlier calls).
    pca_dim : int
        Dimension the features were whitened to, ``min(pca_dim, N, D)``.
    """

    labels: Array
    nmi_previous: float | None
    n_empty_fixed: int
    inertia: float
    epoch: int
    pca_dim: int


class DeepClusterLabeler:
    """Pseudo-labels for DeepCluster: PCA-whiten + L2, then k-means, once per epoch.

    Parameters
    ----------
    num_clusters : int
        k of k-means (10,000 for ImageNet in the paper, which finds over-segmentation helps).
    pca_dim : int, default 256
        Whitened dimension; clipped to ``min(pca_dim, N, D)`` for features of N rows and
        D columns (see the module docstring).
    n_iter : int, default 20
        k-means iterations, >= 1.
    seed : int, default 0
        Non-negative; with the epoch counter it determines every k-means seed.
    backend : {"auto", "faiss", "array"}, default "auto"
        k-means implementation, see :func:`clusterlearn.kmeans`.
    init : {"random", "k-means++", None}, default "random"
        k-means initialisation, see :func:`clusterlearn.kmeans`. ``"random"`` is the
        reference's start (faiss' own draw of k points), cheap enough to re-cluster every
        epoch at k = 10,000; it can leave well-separated clusters merged. ``"k-means++"``
        (or ``None``) is greedy k-means++ on either backend: a better start, but k sequential
        passes over the features, each about ``2 + ln k`` times a Lloyd iteration's
        arithmetic per centre, which dominates an epoch for k in the thousands on a CPU.

    Attributes
    ----------
    epoch : int
        Number of clusterings done so far.
    pca_ : PCAWhitening
        The transform fitted on the last epoch's features (after the first call), to apply
        to other features of the same network.
    centroids_ : (num_clusters, pca_dim) array
        The last epoch's k-means centroids in the whitened, normalised space (after the first
        call), in the namespace and on the device of that epoch's features; see `assign`.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or out of range.
    ImportError
        scikit-learn (needed for the NMI) is missing.

    Examples
    --------
    >>> import numpy as np
    >>> feats = np.random.default_rng(0).normal(size=(200, 32)).astype(np.float32)
    >>> labeler = DeepClusterLabeler(5, pca_dim=16, backend="array")
    >>> first = labeler(feats)
    >>> first.labels.shape, first.nmi_previous, first.epoch
    ((200,), None, 0)
    >>> labeler(feats).epoch
    1
    """

    def __init__(
        self,
        num_clusters: int,
        *,
        pca_dim: int = 256,
        n_iter: int = 20,
        seed: int = 0,
        backend: Backend = "auto",
        init: Init | None = "random",
    ) -> None:
        self.num_clusters = check_int(num_clusters, "num_clusters", minimum=1)
        self.pca_dim = check_int(pca_dim, "pca_dim", minimum=1)
        self.n_iter = check_int(n_iter, "n_iter", minimum=1)
        self.seed = check_int(seed, "seed", minimum=0)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if init not in (None, "k-means++", "random"):
            raise ValueError(f"init must be None, 'k-means++' or 'random', got {init!r}")
        self.backend = backend
        self.init = init
        metrics._sklearn_metrics()  # fail now, not at the second epoch, without scikit-learn
        self.epoch = 0
        self._previous: np.ndarray | None = None

    def __call__(self, features: Array) -> DeepClusterEpoch:
        """Cluster one epoch's features into pseudo-labels.

        Parameters
        ----------
        features : (N, D) real floating array, finite, any supported namespace and device
            Features of the whole data set, rows in dataset order (the same order every
            epoch, so that the NMI compares the same samples). N >= num_clusters.

        Returns
        -------
        DeepClusterEpoch
            ``labels`` in the namespace and on the device of ``features``.

        Raises
        ------
        TypeError
            ``features`` is not a real floating array.
        ValueError
            ``features`` is not 2-D, empty, not finite or of zero variance; has fewer rows
            than ``num_clusters``; or a different number of rows than the previous epoch's
            (call `reset` first when the data set changed). The state is then unchanged.
        """
        B.namespace(features=features)
        check_features(features, "features")
        n, d = features.shape
        if self.num_clusters > n:
            raise ValueError(f"num_clusters={self.num_clusters} exceeds the number of feature rows N={n}")
        if self._previous is not None and self._previous.shape[0] != n:
            raise ValueError(
                f"features has {n} rows but the previous epoch had {self._previous.shape[0]}; "
                "call reset() when the data set changes"
            )
        dim = min(self.pca_dim, n, d)
        pca = PCAWhitening(dim)
        reduced = pca.fit_transform(features)
        seed = int(B.rng(self.seed, self.epoch).integers(_MAX_SEED))
        result = kmeans(reduced, self.num_clusters, n_iter=self.n_iter, seed=seed, init=self.init, backend=self.backend)
        host = np.array(B.to_numpy(result.labels), dtype=np.int64)
        score = None if self._previous is None else metrics.nmi(self._previous, host)
        epoch = self.epoch
        self.pca_, self.centroids_, self._previous, self.epoch = pca, result.centroids, host, epoch + 1
        return DeepClusterEpoch(result.labels, score, result.n_empty_fixed, result.inertia, epoch, dim)

    def assign(self, features: Array) -> Array:
        """Clusters of new features under the last epoch's PCA and centroids.

        The features are whitened and L2-normalised by ``pca_`` and assigned to the nearest
        of ``centroids_`` (squared L2 distance); the labeler is not changed. Features of the
        last epoch's own rows get (up to floating-point ties) that epoch's labels.

        Parameters
        ----------
        features : (B, D) real floating array, finite, the namespace and D of the last
            epoch's features

        Returns
        -------
        (B,) array of cluster ids in [0, num_clusters), the namespace's default integer
        dtype, on the device of ``features``; ties go to the lowest id.

        Raises
        ------
        ValueError
            Called before the first epoch; ``features`` not 2-D, empty, not finite or of
            another width.
        TypeError
            ``features`` is not a real floating array, or of another namespace than the
            fitted state.
        """
        if not hasattr(self, "centroids_"):
            raise ValueError("DeepClusterLabeler.assign needs a fitted labeler: call it on an epoch's features first")
        xp = B.namespace(features=features)
        check_features(features, "features")
        d = self.pca_.projection_.shape[0]
        if features.shape[1] != d:
            raise ValueError(
                f"features must have {d} columns, as the last epoch's features, got shape {tuple(features.shape)}"
            )
        reduced = self.pca_.transform(B.convert(features, xp))  # detached: no autograd graph
        return nearest_centroid(reduced, xp.astype(self.centroids_, reduced.dtype))

    def reset(self) -> None:
        """Forget the previous epoch's labels (the next NMI is ``None``); keep the epoch count."""
        self._previous = None

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": int, "previous_labels": (N,) int64 NumPy array or None}`` (a copy)."""
        prev = None if self._previous is None else self._previous.copy()
        return {"epoch": self.epoch, "previous_labels": prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; the next call continues from there.

        ``previous_labels`` may be an array of any supported namespace. Raises ``TypeError``
        or ``ValueError`` (leaving the state unchanged) for a missing key, a negative epoch,
        or labels that are not 1-D integers in [0, num_clusters).
        """
        missing = {"epoch", "previous_labels"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        epoch = check_int(state["epoch"], "epoch", minimum=0)
        prev = state["previous_labels"]
        if prev is not None:
            B.namespace(previous_labels=prev)
            host = np.asarray(B.to_numpy(prev))
            if host.dtype.kind not in "iu":
                raise TypeError(f"previous_labels must have an integer dtype, got {host.dtype}")
            if host.ndim != 1 or host.shape[0] == 0:
                raise ValueError(f"previous_labels must be 1-D and non-empty, got shape {host.shape}")
            if host.min() < 0 or host.max() >= self.num_clusters:
                raise ValueError(f"previous_labels must lie in [0, {self.num_clusters})")
            prev = host.astype(np.int64, copy=True)
        self.epoch, self._previous = epoch, prev

    def __repr__(self) -> str:
        return (
            f"DeepClusterLabeler(num_clusters={self.num_clusters}, pca_dim={self.pca_dim}, "
            f"n_iter={self.n_iter}, seed={self.seed}, backend={self.backend!r}, init={self.init!r}, "
            f"epoch={self.epoch})"
        )
