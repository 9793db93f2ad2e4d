"""Online Deep Clustering (Zhan et al., CVPR 2020): the memory side of one training iteration.

:class:`OnlineDeepClustering` composes the four parts, each usable on its own:
:class:`~clusterlearn.SampleMemory` (features and labels of all N samples),
:class:`~clusterlearn.CentroidMemory` (centroids, exact sizes and sums),
:class:`~clusterlearn.SmallClusterHandler` and :func:`~clusterlearn.loss_weights`.

The memory update itself is the pure function :func:`clusterlearn.odc_state.step` over an
:class:`~clusterlearn.odc_state.ODCState`; this class is its checked, stateful shell. One
:meth:`OnlineDeepClustering.step` on a batch with dataset indices ``idx`` and features
``f`` (B, D):

1. merge repeated indices (mean of their normalised features; see
   :func:`~clusterlearn.sample_memory.merge_duplicates`), then
   ``F[idx] <- normalize(m * normalize(f) + (1 - m) * F[idx])``;
2. re-label the batch to the nearest centroid of the updated features (``metric``);
3. update cluster sizes and sums incrementally (O(B D));
4. every ``centroid_update_interval``-th step, set every centroid to ``sums / sizes``;
5. every ``small_cluster_interval``-th step, handle small clusters.

Train on ``labels_of(idx)`` read *before* ``step`` with class weights ``loss_weights()``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import array_api_compat as aac
import numpy as np

from . import backend as B
from .validation import check_features, check_int, check_labels
from .assignment import Metric
from .centroid_memory import CentroidMemory
from .kmeans import kmeans
from .odc_state import STATE_KINDS, ODCConfig, ODCState, check_state, small_clusters_due, state_shapes
from .odc_state import init as init_state
from .odc_state import step as odc_step
from .reweighting import loss_weights
from .sample_memory import SampleMemory, check_nonzero_rows, l2_normalize
from .small_clusters import SmallClusterHandler, SmallClusterStats

Array = Any

__all__ = ["OnlineDeepClustering", "NotInitializedError"]

_STATE_ARRAYS = ODCState._fields[:-1]  # the memory arrays; the iteration is a number

#: Deprecated names of settings and checkpoint keys (docs/glossary.md), kept for one release.
_RENAMED_SETTINGS = {"assign": "metric"}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated, use {new} (docs/glossary.md)", DeprecationWarning, stacklevel=3)


def _scalar(value: Any, name: str) -> Any:
    """A Python number or string from itself, a NumPy scalar or a 0-d array (as ``np.savez`` returns)."""
    if isinstance(value, (np.ndarray, np.generic)):
        if value.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got an array of shape {value.shape}")
        return value.item()
    if aac.is_array_api_obj(value):
        xp = B.namespace(**{name: value})
        if value.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got an array of shape {tuple(value.shape)}")
        return int(value) if xp.isdtype(value.dtype, "integral") else float(value)
    return value


def _unit_norm_tolerance(xp: Any, dtype: Any) -> float:
    """Allowed ``| ||row|| - 1 |`` of a stored feature row: sqrt of the dtype's machine epsilon.

    Normalising in a floating dtype leaves a relative error of a few epsilon; sqrt(eps)
    (3.5e-4 in float32, 0.03 in float16) accepts every legitimately normalised row while
    refusing rows that were never normalised.
    """
    return float(xp.finfo(dtype).eps) ** 0.5


class NotInitializedError(ValueError, AttributeError):
    """Raised when the memories are used before :meth:`OnlineDeepClustering.initialize`."""


class OnlineDeepClustering:
    """ODC's sample and centroid memories with small-cluster handling and loss weights.

    Parameters
    ----------
    num_samples : N, size of the training set (dataset indices are in [0, N))
    num_clusters : C (10,000 for ImageNet)
    feat_dim : D, feature dimension of the neck output (256)
    momentum : weight of the fresh feature in the memory update (0.5)
    min_cluster_size : clusters below this are dissolved and re-seeded (20);
        ``num_clusters * min_cluster_size`` may not exceed ``num_samples``. 1 only refills
        empty clusters; 0 switches handling off (clusters may then empty out)
    centroid_update_interval : refresh all centroids every this many steps (10)
    small_cluster_interval : handle small clusters every this many steps (1)
    reweight_power : p in ``w_c ∝ n_c ** -p`` (0.5)
    metric : ``"l2"`` (nearest centroid in L2, the paper) or ``"dot"`` (largest dot product
        with un-normalised centroids, the reference code); see :mod:`clusterlearn.assignment`.
        ``assign=`` is its deprecated name (``DeprecationWarning``)
    seed : seeds initial k-means and the 2-means splits (results are deterministic)
    like : array whose namespace and device the memory takes, and its dtype if floating
        (float32 otherwise; NumPy float32 when omitted); inputs of other namespaces are converted, outputs returned in the
        caller's namespace and on its device
    device : device of the memory, overriding ``like``'s
    resync_interval : every this many steps the per-cluster sums are recomputed exactly from
        the sample memory (O(N D)), bounding floating-point drift. Default: never where the
        sums accumulate in float64 (drift stays near 1e-16 per update), every 1000 steps
        where they cannot (JAX without x64)

    Examples
    --------
    >>> import numpy as np, clusterlearn as cl
    >>> feats = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> odc = cl.OnlineDeepClustering(200, 4, 8, min_cluster_size=5)
    >>> _ = odc.initialize(feats)
    >>> y = odc.labels_of(np.arange(16))      # train on these, weighted by odc.loss_weights()
    >>> stats = odc.step(np.arange(16), feats[:16])
    """

    def __init__(
        self,
        num_samples: int,
        num_clusters: int,
        feat_dim: int,
        *,
        momentum: float = 0.5,
        min_cluster_size: int = 20,
        centroid_update_interval: int = 10,
        small_cluster_interval: int = 1,
        reweight_power: float = 0.5,
        metric: Metric = "l2",
        seed: int = 0,
        like: Array | None = None,
        device: Any = None,
        resync_interval: int | None = None,
        assign: Metric | None = None,
    ) -> None:
        if assign is not None:
            _deprecated("OnlineDeepClustering(assign=...)", "metric=...")
            metric = assign
        #: the static settings (:class:`~clusterlearn.odc_state.ODCConfig`, which checks them)
        self.config = ODCConfig(
            num_samples, num_clusters, feat_dim, momentum=momentum, min_cluster_size=min_cluster_size,
            centroid_update_interval=centroid_update_interval, small_cluster_interval=small_cluster_interval,
            reweight_power=reweight_power, metric=metric, seed=seed, resync_interval=resync_interval,
        )
        c = self.config
        self.handler = SmallClusterHandler(c.min_cluster_size, metric=c.metric, seed=c.seed)
        #: the :class:`~clusterlearn.SampleMemory` (features and labels of all N samples)
        self.samples = SampleMemory(c.num_samples, c.feat_dim, momentum=c.momentum, like=like, device=device)
        s = self.samples
        #: the :class:`~clusterlearn.CentroidMemory` (centroids, sizes and sums of the C clusters)
        self.centroid_memory = CentroidMemory(c.num_clusters, c.feat_dim, xp=s.xp, device=s.device, dtype=s.dtype)
        self.iteration = 0

    # ------------------------------------------------------------------ properties
    num_samples = property(lambda self: self.config.num_samples, doc="N, number of samples")
    num_clusters = property(lambda self: self.config.num_clusters, doc="C, number of clusters")
    feat_dim = property(lambda self: self.config.feat_dim, doc="D, feature dimension")
    momentum = property(lambda self: self.config.momentum, doc="weight of the fresh feature")
    min_cluster_size = property(lambda self: self.config.min_cluster_size, doc="small-cluster threshold")
    centroid_update_interval = property(lambda self: self.config.centroid_update_interval, doc="steps between refreshes")
    small_cluster_interval = property(lambda self: self.config.small_cluster_interval, doc="steps between handlings")
    reweight_power = property(lambda self: self.config.reweight_power, doc="p in w ∝ n^-p")
    metric = property(lambda self: self.config.metric, doc='"l2" or "dot"')
    seed = property(lambda self: self.config.seed, doc="seed of k-means and the splits")
    resync_interval = property(
        lambda self: self.config.resync_every(self.centroid_memory.acc_dtype), doc="steps between exact resyncs (0: never)"
    )

    @property
    def assign(self) -> Metric:
        """Deprecated name of :attr:`metric`."""
        _deprecated("OnlineDeepClustering.assign", "OnlineDeepClustering.metric")
        return self.metric

    @property
    def centroids(self) -> CentroidMemory:
        """Deprecated name of :attr:`centroid_memory` (``odc.centroids.centroids`` read badly)."""
        _deprecated("OnlineDeepClustering.centroids", "OnlineDeepClustering.centroid_memory")
        return self.centroid_memory

    @property
    def initialized(self) -> bool:
        """Whether the memories hold data (:meth:`initialize` or :meth:`load_state_dict` ran)."""
        return self.samples.initialized

    def require_initialized(self) -> None:
        """Raise :class:`NotInitializedError` unless :attr:`initialized`."""
        if not self.initialized:
            raise NotInitializedError("call initialize(features) before using the memories")

    @property
    def state(self) -> ODCState:
        """The memories as an :class:`~clusterlearn.odc_state.ODCState`: the live arrays, not copies.

        Do not write to them; :func:`clusterlearn.odc_state.step` consumes its state (NumPy,
        PyTorch and CuPy update it in place), so give it a copy (or :meth:`state_dict`'s arrays).

        Assigning a state (``odc.state = new``, e.g. the result of
        :func:`clusterlearn.odc_state.step` or a replica's broadcast arrays) holds its arrays
        without copying. Their shapes and dtype kinds are checked
        (:func:`~clusterlearn.odc_state.check_state`), their values are not: restore
        checkpoints with :meth:`load_state_dict`, which checks the invariants.
        """
        self.require_initialized()
        s, c = self.samples, self.centroid_memory
        iteration = s.xp.asarray(self.iteration, dtype=s.labels.dtype, device=s.device)
        return ODCState(s.features, s.labels, c.centroids, c.sizes, c.sums, iteration)

    @state.setter
    def state(self, state: ODCState) -> None:
        check_state(state, self.config)
        B.eager_namespace(**{f"state.{k}": v for k, v in state._asdict().items() if k != "iteration"})
        xp, to_memory = self.samples.xp, self.samples.to_memory
        self._set_state(ODCState(*(xp.astype(to_memory(x), dtype) for x, dtype in zip(state, self.state_dtypes))))

    @property
    def state_dtypes(self) -> ODCState:
        """The dtype of every :attr:`state` field in this object's namespace, as an ``ODCState``."""
        s, c = self.samples, self.centroid_memory
        return ODCState(s.dtype, s.labels.dtype, s.dtype, c.sizes.dtype, c.acc_dtype, s.labels.dtype)

    def _set_state(self, state: ODCState) -> None:
        """Hold ``state``'s arrays (memory namespace, checked or produced by the step)."""
        self.samples.set_state(state.features, state.labels)
        self.centroid_memory.set_state(state.centroids, state.sizes, state.sums)
        self.iteration = int(state.iteration)

    @property
    def labels(self) -> Array:
        """(N,) copy of the pseudo-labels of all samples (memory namespace).

        A copy, so that ``previous = odc.labels`` still holds an epoch's labels later.
        """
        self.require_initialized()
        return self._copy(self.samples.labels)

    @property
    def features(self) -> Array:
        """(N, D) unit-norm memory features (memory namespace).

        The live buffer, not a copy (it may be gigabytes): later steps change it in place on
        NumPy, PyTorch and CuPy. Do not write to it.
        """
        self.require_initialized()
        return self.samples.features

    @property
    def cluster_sizes(self) -> Array:
        """(C,) copy of the number of samples per cluster, equal to ``bincount(labels, C)``."""
        self.require_initialized()
        return self._copy(self.centroid_memory.sizes)

    def __repr__(self) -> str:
        return (
            f"OnlineDeepClustering(num_samples={self.num_samples}, num_clusters={self.num_clusters}, "
            f"feat_dim={self.feat_dim}, momentum={self.momentum}, min_cluster_size={self.min_cluster_size}, "
            f"metric={self.metric!r}, backend={self.samples.xp.__name__}, device={self.samples.device}, "
            f"iteration={self.iteration}, initialized={self.samples.initialized})"
        )

    # ------------------------------------------------------------------ API
    def initialize(
        self,
        features: Array,
        labels: Array | None = None,
        *,
        n_iter: int = 20,
        init: str = "k-means++",
        kmeans_iters: int | None = None,
        kmeans_init: str | None = None,
    ) -> dict[str, int]:
        """Fill the memories from the features of the whole data set.

        Parameters
        ----------
        features : (N, D) real floating array, any supported namespace; L2-normalised here.
            A row that is all zero (after casting to the memory's dtype) has no direction
            and is refused with ``ValueError``, as :meth:`step` refuses it
        labels : (N,) integer array in [0, C), optional. When omitted,
            :meth:`initial_labels` provides them (k-means with ``n_iter`` iterations and
            ``init`` seeding)
        kmeans_iters, kmeans_init : deprecated names of ``n_iter`` and ``init``

        Returns
        -------
        dict with ``num_small_clusters`` and ``num_splits`` of the small-cluster handling
        run once after initialisation.
        """
        n_iter, init = _renamed_kmeans_args(n_iter, init, kmeans_iters, kmeans_init)
        B.eager_namespace(features=features, **({} if labels is None else {"labels": labels}))
        check_features(features, "features", dim=self.feat_dim, rows=self.num_samples)
        if labels is not None:
            check_labels(labels, "labels", upper=self.num_clusters, length=self.num_samples)
        n_iter, init = _check_kmeans_args(n_iter, init)
        feats = self._unit_rows(features)
        check_nonzero_rows(feats, "features")
        if labels is None:
            labels = self._kmeans_labels(feats, n_iter, init)
        # normalised again in the memory's dtype: a cast from a narrower input is not unit-norm
        self._set_state(init_state(l2_normalize(feats), self.samples.to_memory(labels), self.num_clusters))
        handled = self.handler(self.samples, self.centroid_memory, key=0)
        return {"num_small_clusters": handled.num_small_clusters, "num_splits": handled.num_splits}

    def initial_labels(self, features: Array, *, n_iter: int = 20, init: str = "k-means++") -> Array:
        """(N,) the labels :meth:`initialize` computes when given none (memory namespace).

        k-means (:func:`clusterlearn.kmeans`, ``n_iter`` iterations, ``init`` seeding, this
        object's ``seed``) of the (N, D) ``features`` L2-normalised and cast to the memory's
        dtype, exactly as :meth:`initialize` clusters them (a distributed shell computes
        them on one rank and broadcasts them). Does not change the object.
        """
        B.eager_namespace(features=features)
        check_features(features, "features", dim=self.feat_dim, rows=self.num_samples)
        n_iter, init = _check_kmeans_args(n_iter, init)
        feats = self._unit_rows(features)
        check_nonzero_rows(feats, "features")
        return self._kmeans_labels(feats, n_iter, init)

    def _unit_rows(self, features: Array) -> Array:
        """``features`` in the memory's namespace, L2-normalised, cast to the memory's dtype."""
        return self.samples.xp.astype(l2_normalize(self.samples.to_memory(features)), self.samples.dtype)

    def _kmeans_labels(self, unit_features: Array, n_iter: int, init: str) -> Array:
        """(N,) initial labels: k-means of the L2-normalised memory-namespace features."""
        return kmeans(unit_features, self.num_clusters, n_iter=n_iter, seed=self.seed, init=init).labels

    def labels_of(self, indices: Array) -> Array:
        """(B,) pseudo-labels of dataset ``indices`` (B,), in their namespace and on their device."""
        xp_in = B.eager_namespace(indices=indices)
        self.require_initialized()
        idx = self.samples.check_indices(indices)
        return B.convert(self.samples.xp.take(self.samples.labels, idx), xp_in, aac.device(indices))

    def loss_weights(self, like: Array | None = None) -> Array:
        """(C,) class weights ``w_c ∝ n_c ** -p`` over non-empty clusters, summing to 1.

        O(C) from the incrementally kept sizes. float32 in the memory's namespace, or in
        ``like``'s namespace, on its device and (if floating, e.g. bfloat16 logits) its dtype.
        """
        self.require_initialized()
        w = loss_weights(self.centroid_memory.sizes, self.reweight_power)
        if like is None:
            return w
        xp = B.namespace(like=like)
        w = B.convert(w, xp, aac.device(like))
        return xp.astype(w, like.dtype) if xp.isdtype(like.dtype, "real floating") else w

    def step(self, indices: Array, features: Array) -> dict[str, float | int | bool]:
        """One ODC memory iteration on a batch (after the optimiser step).

        Parameters
        ----------
        indices : (B,) integer dataset indices in [0, N); repeats allowed (DDP padding):
            a repeated sample gets the mean of its normalised features and counts once
        features : (B, D) real floating features of those samples (detached if torch)

        Returns
        -------
        dict with
            ``change_ratio`` fraction of the batch's distinct samples whose label changed;
            ``num_small_clusters`` clusters dissolved this step;
            ``num_splits`` clusters split to re-seed them;
            ``centroids_refreshed`` whether all centroids were recomputed this step.
        """
        self.require_initialized()
        idx, feats = self.samples.validate_batch(indices, features)
        # Every check has passed (the step applies the batch): from here on the state changes.
        state, stats = odc_step(self.state, idx, feats, self.config, half_sq_norms=self.centroid_memory.half_sq_norms)
        self._set_state(state)
        handled = SmallClusterStats(0, 0, 0)
        if small_clusters_due(self.iteration, self.config):
            handled = self.handler(self.samples, self.centroid_memory, key=self.iteration)
        return {
            "change_ratio": int(stats["num_changed"]) / int(stats["num_distinct"]),
            "num_small_clusters": handled.num_small_clusters,
            "num_splits": handled.num_splits,
            "centroids_refreshed": bool(stats["centroids_refreshed"]),
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Copies of the state as plain arrays (memory namespace) and numbers; no pickled objects.

        Keys: ``features`` (N, D), ``labels`` (N,), ``centroids`` (C, D), ``sizes`` (C,),
        ``sums`` (C, D), ``iteration``, and the settings that determine later steps
        (``num_samples``, ``num_clusters``, ``feat_dim``, ``momentum``, ``min_cluster_size``,
        ``centroid_update_interval``, ``small_cluster_interval``, ``reweight_power``,
        ``metric``, ``seed``, ``resync_interval``), which :meth:`load_state_dict` checks.
        """
        arrays = self.state._asdict()
        del arrays["iteration"]
        return {**{k: self._copy(v) for k, v in arrays.items()}, "iteration": self.iteration, **self._settings()}

    def _settings(self) -> dict[str, int | float | str]:
        """The constructor settings a resumed run must share to continue identically: the
        :class:`~clusterlearn.odc_state.ODCConfig` fields, ``resync_interval`` resolved."""
        return {**dataclasses.asdict(self.config), "resync_interval": self.resync_interval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (arrays of any supported namespace), after checking it.

        Everything is verified before anything is replaced: the settings, every array's type,
        shape, dtype kind and finiteness, labels in [0, C), and the invariants the memories
        keep: feature rows of unit norm, ``sizes`` equal to ``bincount(labels, C)``, ``sums``
        equal to the members' feature sums up to accumulated rounding (``sqrt(eps)`` of the
        checkpoint's sums dtype times the cluster size), centroids (means of unit vectors) of
        norm at most 1. A failed check raises ``ValueError``/``TypeError`` saying which key is
        wrong and how, and leaves the object as it was.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        # checkpoints written before the glossary (docs/glossary.md) use the old setting names
        state = {**{new: state[old] for old, new in _RENAMED_SETTINGS.items() if old in state and new not in state}, **state}
        missing = [k for k in ODCState._fields if k not in state]
        if missing:
            raise ValueError(f"state is missing keys {missing}")
        n, k, d = self.num_samples, self.num_clusters, self.feat_dim
        for key, want in self._settings().items():
            if key in state and _scalar(state[key], f"state[{key!r}]") != want:
                raise ValueError(
                    f"state[{key!r}] is {_scalar(state[key], f'state[{key!r}]')!r}, this object has {want!r}: "
                    "construct it with the checkpoint's settings"
                )
        B.eager_namespace(**{f"state[{key!r}]": state[key] for key in _STATE_ARRAYS})
        # every memory array, in ODCState field order: floating ones are finite matrices, integral
        # ones label arrays whose values are bounded by UPPER (cluster ids, cluster sizes)
        upper = {"labels": k, "sizes": n + 1}
        for key, shape, kind in zip(_STATE_ARRAYS, state_shapes(self.config), STATE_KINDS):
            if kind == "integral":
                check_labels(state[key], f"state[{key!r}]", upper=upper[key], length=shape[0])
            else:
                check_features(state[key], f"state[{key!r}]", dim=d, rows=shape[0])
        iteration = check_int(_scalar(state["iteration"], "state['iteration']"), "state['iteration']", minimum=0)
        xp = self.samples.xp
        copies = [self._copy(state[key]) for key in _STATE_ARRAYS]
        sums_tol = float(xp.finfo(copies[ODCState._fields.index("sums")].dtype).eps) ** 0.5
        arrays = [xp.astype(x, dtype) for x, dtype in zip(copies, self.state_dtypes)]
        iteration = xp.asarray(iteration, dtype=self.state_dtypes.iteration, device=self.samples.device)
        new = ODCState(*arrays, iteration)
        _verify_state(new, self.samples.dtype, sums_tol, self.centroid_memory.acc_dtype)
        self._set_state(new)

    def _copy(self, x: Array) -> Array:
        """A private copy of ``x`` in the memory's namespace (the memory writes in place)."""
        return self.samples.xp.asarray(self.samples.to_memory(x), copy=True)


def _renamed_kmeans_args(n_iter: int, init: str, kmeans_iters: int | None, kmeans_init: str | None) -> tuple[int, str]:
    """``n_iter`` and ``init``, or their deprecated names' values when those are given."""
    if kmeans_iters is not None:
        _deprecated("initialize(kmeans_iters=...)", "n_iter=...")
        n_iter = kmeans_iters
    if kmeans_init is not None:
        _deprecated("initialize(kmeans_init=...)", "init=...")
        init = kmeans_init
    return n_iter, init


def _check_kmeans_args(n_iter: int, init: str) -> tuple[int, str]:
    n_iter = check_int(n_iter, "n_iter", minimum=0)
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    return n_iter, init


def _verify_state(state: ODCState, dtype: Any, sums_tol: float, acc: Any) -> None:
    """Check a checkpoint's state (memory namespace and dtypes) against the invariants of the memories.

    ``sums_tol``: allowed deviation of ``sums`` per unit of cluster size (``sqrt(eps)`` of the
    dtype the sums were saved in: float32 sums that ran 1000 steps between resyncs drift by a
    few 1e-6 of the cluster size, a wrong or stale array by far more).
    """
    features, labels, centroids, sizes, sums, _ = state
    xp = aac.array_namespace(features)
    k = sizes.shape[0]
    tol = _unit_norm_tolerance(xp, dtype)
    norms = xp.sqrt(xp.sum(xp.astype(features, acc) ** 2, axis=1))
    bad = xp.abs(norms - 1) > tol
    if bool(xp.any(bad)):
        row = int(xp.argmax(xp.astype(bad, xp.int8)))
        raise ValueError(
            f"state['features'] must have rows of unit L2 norm (within {tol:.1e}); row {row} has norm {float(norms[row]):.6g}"
        )
    counts = B.bincount(labels, k)
    if not bool(xp.all(counts == sizes)):
        cluster = int(xp.argmax(xp.astype(counts != sizes, xp.int8)))
        raise ValueError(
            f"state['sizes'] must equal the bincount of state['labels']; cluster {cluster} has "
            f"size {int(sizes[cluster])} but {int(counts[cluster])} members"
        )
    exact = B.scatter_add(xp.zeros(sums.shape, dtype=acc, device=aac.device(sums)), labels, features)
    err = xp.max(xp.abs(sums - exact), axis=1)
    allowed = sums_tol * xp.astype(xp.maximum(sizes, xp.ones_like(sizes)), acc)
    bad = err > allowed
    if bool(xp.any(bad)):
        cluster = int(xp.argmax(xp.astype(bad, xp.int8)))
        raise ValueError(
            f"state['sums'] must equal the sums of state['features'] over state['labels']; cluster {cluster} "
            f"is off by {float(err[cluster]):.3g} (allowed {float(allowed[cluster]):.3g} for its {int(sizes[cluster])} members)"
        )
    cnorms = xp.sqrt(xp.sum(xp.astype(centroids, acc) ** 2, axis=1))
    bad = cnorms > 1 + tol
    if bool(xp.any(bad)):
        cluster = int(xp.argmax(xp.astype(bad, xp.int8)))
        raise ValueError(
            f"state['centroids'] must be means of unit vectors (norm <= 1); centroid {cluster} has norm {float(cnorms[cluster]):.6g}"
        )
