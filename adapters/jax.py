"""JAX adapter: the ODC memory step as a pure, jit-compiled function over a pytree state.

The core objects accept and return ``jax.Array`` eagerly; this module gives JAX training loops
the same memories with JAX idioms:

- :class:`ODCState`, a ``NamedTuple`` pytree of the memory arrays, and :class:`ODCConfig`, the
  frozen, hashable static settings (a ``static_argnames`` argument of ``jax.jit``);
- :func:`config_from_core`, :func:`state_from_core` and :func:`load_into_core` convert to and
  from :class:`clusterlearn.OnlineDeepClustering` (initialise with the core's k-means, then
  run the jitted step; write the state back to checkpoint it through the core);
- :func:`step`, one memory iteration (merge repeated indices, momentum update, re-label,
  incremental sizes and sums, periodic resync and centroid refresh), equal to the core's
  :meth:`~clusterlearn.OnlineDeepClustering.step` up to its small-cluster handling, with
  static shapes so that it compiles once per batch size; :func:`loss_weights`; :func:`resync`;
- :func:`handle_small_clusters`, host-side (data-dependent shapes), delegating to the core's
  :class:`~clusterlearn.SmallClusterHandler`;
- :func:`make_sharded_step` (data parallelism with ``jax.shard_map``: every device applies
  the step to the all-gathered global batch, so all replicas stay identical) and
  :func:`make_gather`, the ``gather`` of :class:`~clusterlearn.SelfClassifierLoss` under
  ``shard_map``;
- :class:`SelfClassifierLoss` and :func:`self_classifier_loss`: the Self-Classifier loss with
  a closed-form backward (``jax.custom_vjp``), the same value as the core's.

A training loop (one device)::

    import clusterlearn as cl
    from clusterlearn.adapters import jax as clj

    odc = cl.OnlineDeepClustering(n, c, d, like=jnp.zeros(1))
    odc.initialize(all_features)                        # k-means + small-cluster handling
    config, state = clj.config_from_core(odc), clj.state_from_core(odc)
    for indices, images in loader:
        labels = state.labels[indices]                  # read before the step
        weights = clj.loss_weights(state, config)
        features = train_step(images, labels, weights)  # the model's (B, D) neck output
        state, stats = clj.step(state, indices, features, config)
        if not bool(stats["applied"]):
            raise FloatingPointError("non-finite features: batch refused, state unchanged")
        if int(state.iteration) % config.small_cluster_interval == 0:
            state, handled = clj.handle_small_clusters(state, config)
    clj.load_into_core(odc, state, config)              # then odc.state_dict() to save

This sequence makes the same decisions as ``odc.step`` on every batch. :func:`step` donates
its ``state`` (the N x D memory is updated in place): do not use the state passed in again.
Inside ``jit``, values cannot raise: a batch with indices outside [0, N), non-finite features
or an all-zero feature row leaves the state unchanged and reports ``stats["applied"]`` False
(the loop above should check it and stop).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clusterlearn import _backend as B
from clusterlearn._validation import check_int, check_real
from clusterlearn.assignment import METRICS, Metric, nearest_centroid
from clusterlearn.centroid_memory import CentroidMemory
from clusterlearn.odc import OnlineDeepClustering
from clusterlearn.reweighting import LossReweighter, size_weights
from clusterlearn.sample_memory import SampleMemory, l2_normalize, merge_sorted_duplicates, momentum_update
from clusterlearn.small_clusters import SmallClusterHandler, SmallClusterStats

from ._jax_self_classifier import SelfClassifierLoss, self_classifier_loss

__all__ = [
    "ODCConfig",
    "ODCState",
    "config_from_core",
    "state_from_core",
    "load_into_core",
    "step",
    "loss_weights",
    "resync",
    "handle_small_clusters",
    "make_sharded_step",
    "make_gather",
    "SelfClassifierLoss",
    "self_classifier_loss",
]

#: Resync interval of float32 sums when :attr:`ODCConfig.resync_interval` is None (the core's).
DEFAULT_FLOAT32_RESYNC = 1000


class ODCState(NamedTuple):
    """The ODC memories as a pytree of arrays (one replica per device under data parallelism).

    Attributes
    ----------
    features : (N, D) floating (float32 by default), unit-norm memory feature of every sample
    labels : (N,) int32 (int64 with ``jax_enable_x64``), pseudo-label of every sample in [0, C)
    centroids : (C, D) dtype of ``features``, members' means as of the last refresh
    sizes : (C,) dtype of ``labels``, always ``bincount(labels, C)``
    sums : (C, D) float64 with ``jax_enable_x64``, else float32: members' current feature sums
    iteration : () dtype of ``labels``, number of steps taken
    """

    features: jax.Array
    labels: jax.Array
    centroids: jax.Array
    sizes: jax.Array
    sums: jax.Array
    iteration: jax.Array


@dataclasses.dataclass(frozen=True)
class ODCConfig:
    """Static settings of the ODC step; field names and meanings as in :class:`~clusterlearn.OnlineDeepClustering`.

    ``resync_interval`` None means the core's default, decided by the state's sums dtype:
    never for float64 sums, every :data:`DEFAULT_FLOAT32_RESYNC` steps for float32 sums.
    Frozen and hashable: pass it as a static argument of ``jax.jit``.
    """

    num_samples: int
    num_clusters: int
    feat_dim: int
    momentum: float = 0.5
    min_cluster_size: int = 20
    centroid_update_interval: int = 10
    small_cluster_interval: int = 1
    reweight_power: float = 0.5
    assign: Metric = "l2"
    seed: int = 0
    resync_interval: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_samples", "num_clusters", "feat_dim", "centroid_update_interval", "small_cluster_interval"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.min_cluster_size, "min_cluster_size", minimum=0)
        check_int(self.seed, "seed", minimum=0)
        check_real(self.momentum, "momentum", low=0.0, high=1.0)
        LossReweighter(self.reweight_power)  # finite, >= 0
        if self.resync_interval is not None:
            check_int(self.resync_interval, "resync_interval", minimum=1)
        if self.assign not in METRICS:
            raise ValueError(f"assign must be one of {METRICS}, got {self.assign!r}")
        if self.num_clusters * max(self.min_cluster_size, 1) > self.num_samples:
            raise ValueError(
                f"num_clusters * max(min_cluster_size, 1) ({self.num_clusters} * {max(self.min_cluster_size, 1)}) "
                f"exceeds num_samples ({self.num_samples})"
            )

    def resync_every(self, sums_dtype: Any) -> int:
        """Steps between exact resyncs of the sums for ``sums_dtype`` (0: never)."""
        if self.resync_interval is not None:
            return self.resync_interval
        return 0 if sums_dtype == jnp.float64 else DEFAULT_FLOAT32_RESYNC


# ---------------------------------------------------------------------------- conversions
def _check_core(odc: Any) -> None:
    if not isinstance(odc, OnlineDeepClustering):
        raise TypeError(f"odc must be a clusterlearn.OnlineDeepClustering, got {type(odc).__name__}")


def config_from_core(odc: OnlineDeepClustering) -> ODCConfig:
    """The settings of a core :class:`~clusterlearn.OnlineDeepClustering` as an :class:`ODCConfig`.

    A core whose resync interval is its float64 default (never) gives ``resync_interval=None``,
    so the JAX state applies the same rule to its own sums dtype (float32 without x64).
    """
    _check_core(odc)
    return ODCConfig(
        num_samples=odc.num_samples,
        num_clusters=odc.num_clusters,
        feat_dim=odc.feat_dim,
        momentum=odc.momentum,
        min_cluster_size=odc.min_cluster_size,
        centroid_update_interval=odc.centroid_update_interval,
        small_cluster_interval=odc.small_cluster_interval,
        reweight_power=odc.reweight_power,
        assign=odc.assign,
        seed=odc.seed,
        resync_interval=odc.resync_interval or None,
    )


def state_from_core(odc: OnlineDeepClustering) -> ODCState:
    """A JAX copy of an initialised core object's memories (any core backend).

    Features and centroids keep the core's floating dtype, labels, sizes and the iteration take
    JAX's default integer dtype, and the sums its accumulator dtype (float64 with x64).
    Raises :class:`~clusterlearn.NotInitializedError` before ``odc.initialize``.
    """
    _check_core(odc)
    s = odc.state_dict()
    index, acc = B.index_dtype(jnp), B.accumulator_dtype(jnp)
    return ODCState(
        features=B.convert(s["features"], jnp),
        labels=B.convert(s["labels"], jnp).astype(index),
        centroids=B.convert(s["centroids"], jnp),
        sizes=B.convert(s["sizes"], jnp).astype(index),
        sums=B.convert(s["sums"], jnp).astype(acc),
        iteration=jnp.asarray(s["iteration"], dtype=index),
    )


def load_into_core(odc: OnlineDeepClustering, state: ODCState, config: ODCConfig) -> None:
    """Write ``state`` into the core object ``odc`` (``odc.load_state_dict``, which checks it).

    ``config`` must match ``odc``'s settings (checked; a ``resync_interval`` of None matches
    any), so that ``odc.step`` continues the run exactly.
    """
    _check_core(odc)
    _check_state(state, config)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    odc.load_state_dict({**state._asdict(), **settings, "iteration": int(state.iteration)})


def _check_state(state: Any, config: Any) -> None:
    """Static checks (types, shapes, dtypes) of a state against a config; safe under ``jit``."""
    if not isinstance(config, ODCConfig):
        raise TypeError(f"config must be an ODCConfig, got {type(config).__name__}")
    if not isinstance(state, ODCState):
        raise TypeError(f"state must be an ODCState, got {type(state).__name__}")
    n, c, d = config.num_samples, config.num_clusters, config.feat_dim
    want = {"features": (n, d), "labels": (n,), "centroids": (c, d), "sizes": (c,), "sums": (c, d), "iteration": ()}
    for name, shape in want.items():
        x = getattr(state, name)
        if tuple(jnp.shape(x)) != shape:
            raise ValueError(f"state.{name} must have shape {shape} for this config, got {tuple(jnp.shape(x))}")
        kind = "real floating" if name in ("features", "centroids", "sums") else "integral"
        if not jnp.isdtype(jnp.result_type(x), kind):
            raise TypeError(f"state.{name} must have a {kind} dtype, got {jnp.result_type(x)}")


def _check_batch(indices: Any, features: Any, config: ODCConfig) -> None:
    """Static checks of a batch: (B,) integer indices and (B, D) floating features."""
    for name, x in (("indices", indices), ("features", features)):
        # jax.Array covers tracers; NumPy subclasses (masked arrays) and lists are refused by name
        if not isinstance(x, jax.Array) and type(x) not in (np.ndarray, np.memmap):
            raise TypeError(f"{name} must be a jax.Array or a numpy.ndarray, got {type(x).__module__}.{type(x).__name__}")
    if jnp.ndim(indices) != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(jnp.shape(indices))}")
    if not jnp.isdtype(jnp.result_type(indices), "integral"):
        raise TypeError(f"indices must have an integer dtype, got {jnp.result_type(indices)}")
    if not jnp.isdtype(jnp.result_type(features), "real floating"):
        raise TypeError(f"features must have a real floating dtype, got {jnp.result_type(features)}")
    want = (jnp.shape(indices)[0], config.feat_dim)
    if want[0] == 0:
        raise ValueError("indices must not be empty")
    if tuple(jnp.shape(features)) != want:
        raise ValueError(f"features must have shape {want} (len(indices), feat_dim), got {tuple(jnp.shape(features))}")


# ---------------------------------------------------------------------------- the jitted step
def _batch_is_valid(indices: jax.Array, features: jax.Array, config: ODCConfig) -> jax.Array:
    """() bool: indices in [0, N) and features (in the memory's dtype) finite with no zero row.

    What the core's :meth:`~clusterlearn.OnlineDeepClustering.step` raises for; under ``jit``
    values cannot raise, so :func:`step` refuses such a batch instead.
    """
    in_range = jnp.all((indices >= 0) & (indices < config.num_samples))
    finite = jnp.all(jnp.isfinite(features))
    nonzero = jnp.all(jnp.any(features != 0, axis=1))
    return in_range & finite & nonzero


def _merge_duplicates(indices: jax.Array, features: jax.Array) -> tuple[jax.Array, ...]:
    """:func:`clusterlearn.merge_duplicates` with static shapes.

    Returns (B,) sorted indices, (B, D) merged rows (the normalised mean of the normalised
    features of all copies, the normalised row itself for an index seen once, bit for bit
    independent of the batch order, as the core), (B,) bool ``first`` (first copy of each
    index) and (B,) ``lead`` (position of each row's first copy).
    """
    order = jnp.argsort(indices, stable=True)
    idx = indices[order]
    unit = l2_normalize(features)[order]
    lead = jnp.searchsorted(idx, idx, side="left")
    first = lead == jnp.arange(idx.shape[0], dtype=lead.dtype)
    # The order-independent merge sorts every column: only worth its cost when an index repeats
    # (DistributedSampler padding, in the last batch), so it runs under a cond, as the core skips it.
    merged = jax.lax.cond(jnp.all(first), lambda: unit,
                          lambda: merge_sorted_duplicates(idx, unit, B.accumulator_dtype(jnp))[0])
    return idx, merged, first, lead


def _refresh(centroids: jax.Array, sizes: jax.Array, sums: jax.Array) -> jax.Array:
    """Every centroid set to ``sums / sizes``; empty clusters keep theirs (as the core)."""
    safe = jnp.maximum(sizes, 1).astype(centroids.dtype)
    means = sums.astype(centroids.dtype) / safe[:, None]
    return jnp.where((sizes > 0)[:, None], means, centroids)


def _exact_sums(state: ODCState) -> tuple[jax.Array, jax.Array]:
    """(C, D) sums and (C,) sizes recomputed from all samples (O(N D)), in ``state``'s dtypes."""
    features, labels = state.features, state.labels
    sums = jnp.zeros_like(state.sums).at[labels].add(features.astype(state.sums.dtype))
    return sums, jnp.bincount(labels, length=state.sizes.shape[0]).astype(state.sizes.dtype)


@jax.jit
def resync(state: ODCState) -> ODCState:
    """``state`` with sums and sizes recomputed exactly from the sample memory (O(N D))."""
    sums, sizes = _exact_sums(state)
    return state._replace(sums=sums, sizes=sizes)


def _step(state: ODCState, indices: jax.Array, features: jax.Array, config: ODCConfig) -> tuple[ODCState, dict[str, jax.Array]]:
    """:func:`step` without ``jit`` (traced inside :func:`step` and :func:`make_sharded_step`)."""
    _check_state(state, config)
    _check_batch(indices, features, config)
    features = features.astype(state.features.dtype)
    applied = _batch_is_valid(indices, features, config)
    idx, merged, first, lead = _merge_duplicates(indices.astype(state.labels.dtype), features)
    old = state.features[idx]
    old_labels = state.labels[idx]
    # A refused batch rewrites its rows' own values and adds zeros: the state keeps every bit.
    new = jnp.where(applied, momentum_update(old, merged, config.momentum), old)
    # copies of a repeated sample take the label of its first copy
    assigned = nearest_centroid(new, state.centroids, metric=config.assign).astype(old_labels.dtype)[lead]
    new_labels = jnp.where(applied, assigned, old_labels)
    counted = first & applied  # repeats count once; nothing counts in a refused batch
    count = counted.astype(state.sums.dtype)[:, None]
    moved_labels = jnp.concatenate([old_labels, new_labels])
    ones = counted.astype(state.sizes.dtype)
    sizes = state.sizes.at[moved_labels].add(jnp.concatenate([-ones, ones]))
    moved = jnp.concatenate([-old.astype(count.dtype) * count, new.astype(count.dtype) * count])
    state = state._replace(
        features=state.features.at[idx].set(new),
        labels=state.labels.at[idx].set(new_labels),
        sizes=sizes,
        sums=state.sums.at[moved_labels].add(moved),
        iteration=state.iteration + applied.astype(state.iteration.dtype),
    )
    every = config.resync_every(state.sums.dtype)
    if every:  # only the small arrays pass through the conditional: no copy of the (N, D) memory
        due = applied & (state.iteration % every == 0)
        sums, sizes = lax.cond(due, _exact_sums, lambda s: (s.sums, s.sizes), state)
        state = state._replace(sums=sums, sizes=sizes)
    refreshed = applied & (state.iteration % config.centroid_update_interval == 0)
    centroids = lax.cond(refreshed, _refresh, lambda c, *_: c, state.centroids, state.sizes, state.sums)
    changed = jnp.sum(first & (old_labels != new_labels))
    distinct = jnp.sum(first)
    stats = {
        "change_ratio": changed.astype(jnp.float32) / distinct.astype(jnp.float32),
        "num_changed": changed,
        "num_distinct": distinct,
        "centroids_refreshed": refreshed,
        "applied": applied,
    }
    return state._replace(centroids=centroids), stats


_jitted_step = jax.jit(_step, static_argnames=("config",), donate_argnames=("state",))


def step(state: ODCState, indices: jax.Array, features: jax.Array, config: ODCConfig) -> tuple[ODCState, dict[str, jax.Array]]:
    """One ODC memory iteration, jit-compiled (``config`` static, ``state`` donated).

    Equal to :meth:`clusterlearn.OnlineDeepClustering.step` without its small-cluster
    handling (call :func:`handle_small_clusters` after it for that): repeated indices merged
    as :func:`clusterlearn.merge_duplicates` does, ``F[idx] <- normalize(m normalize(f) + (1 -
    m) F[idx])``, re-labelling to the nearest centroid (``config.assign``), exact incremental
    sizes and sums, then every ``resync_every`` steps an exact resync of the sums and every
    ``centroid_update_interval`` steps a refresh of all centroids.

    Parameters
    ----------
    state : :class:`ODCState`; donated: its buffers are reused, do not use it afterwards
    indices : (B,) integer dataset indices in [0, N); repeats allowed (a repeated sample gets
        the mean of its normalised features, counts once)
    features : (B, D) real floating features of those samples (cast to the memory's dtype)

    Refused batches: values cannot raise inside ``jit``, so a batch the core's ``step`` would
    reject for its values (an index outside [0, N), a NaN or infinite feature, also after the
    cast to the memory's dtype, or an all-zero feature row) is not applied: the returned
    state equals ``state`` bit for bit (the iteration does not advance) and
    ``stats["applied"]`` is False. Check it on the host (``bool(stats["applied"])``) and stop
    or skip; a training loop that ignores it silently skips those batches.
    config : :class:`ODCConfig` (static: one compilation per config and batch shape)

    Returns
    -------
    state : the updated :class:`ODCState`
    stats : dict of 0-d arrays: ``change_ratio`` (float32, fraction of the batch's distinct
        samples whose label changed), ``num_changed`` and ``num_distinct`` (the integer counts
        behind it), ``centroids_refreshed`` (bool), ``applied`` (bool, False for a refused
        batch, see above)

    Raises
    ------
    TypeError, ValueError
        Before tracing, for a batch that is not an array (``None``, a list, a NumPy masked
        array) or a state or batch whose shapes or dtypes do not fit ``config``.
    """
    if isinstance(config, ODCConfig):  # else _step's own check names it
        _check_batch(indices, features, config)
    return _jitted_step(state, indices, features, config)


step._cache_size = _jitted_step._cache_size  # compilations so far (one per config and batch shape)


@functools.partial(jax.jit, static_argnames=("config",))
def loss_weights(state: ODCState, config: ODCConfig) -> jax.Array:
    """(C,) float32 class weights ``w_c ∝ n_c ** -p`` over non-empty clusters, summing to 1.

    Equal to :meth:`clusterlearn.OnlineDeepClustering.loss_weights` (:func:`clusterlearn.reweight`
    of ``state.sizes`` with ``p = config.reweight_power``), without its host-side checks.
    """
    return size_weights(state.sizes, config.reweight_power)


# ---------------------------------------------------------------------------- small clusters
def _host_memories(state: ODCState, config: ODCConfig) -> tuple[SampleMemory, CentroidMemory]:
    """The core's NumPy memories holding a host copy of ``state`` (features: a read-only view).

    Small-cluster handling reads features but never writes them, so they are not copied on
    CPU (``np.asarray`` of a CPU ``jax.Array`` is a view); labels, sizes, sums (in float64)
    and centroids are copied.
    """
    features = np.asarray(state.features)
    samples = SampleMemory(1, config.feat_dim, momentum=config.momentum, like=features)  # 1 row: no N x D zeros
    samples.num_samples, samples.initialized = config.num_samples, True
    samples.features = features
    samples.labels = np.asarray(state.labels).astype(samples.labels.dtype)
    centroids = CentroidMemory(config.num_clusters, config.feat_dim, xp=samples.xp, device=None, dtype=samples.dtype)
    centroids.sizes = np.asarray(state.sizes).astype(centroids.sizes.dtype)
    centroids.sums = np.asarray(state.sums).astype(centroids.acc_dtype)
    centroids.set_centroids(np.asarray(state.centroids))
    return samples, centroids


def handle_small_clusters(state: ODCState, config: ODCConfig, key: int | None = None) -> tuple[ODCState, SmallClusterStats]:
    """Small-cluster handling of the core (:class:`~clusterlearn.SmallClusterHandler`), on the host.

    Not jit-able (the numbers of members to move are data dependent). Dissolves clusters
    below ``config.min_cluster_size`` and re-seeds them by 2-means splits, exactly as
    :meth:`clusterlearn.OnlineDeepClustering.step` does after its update.

    The handler runs on NumPy copies of labels, sizes, sums and centroids and reads the
    features in place on CPU (one device-to-host copy of the (N, D) features on an
    accelerator, only when some cluster is small): eager JAX would compile every operation
    anew for each data-dependent shape, which costs seconds per call. The features are not
    changed; the other arrays return to the devices (and sharding) they came from.

    Parameters
    ----------
    state : :class:`ODCState` (not modified)
    config : :class:`ODCConfig` (``min_cluster_size``, ``assign`` and ``seed`` are used)
    key : varies the split seeds; the core uses the iteration, the default here
        (``int(state.iteration)``)

    Returns
    -------
    The new state (``state`` itself when no cluster is small) and what the handler did.
    """
    _check_state(state, config)
    key = int(state.iteration) if key is None else check_int(key, "key", minimum=0)
    if not bool(jnp.any(state.sizes < config.min_cluster_size)):
        return state, SmallClusterStats(0, 0, 0)
    samples, centroids = _host_memories(state, config)
    handler = SmallClusterHandler(config.min_cluster_size, metric=config.assign, seed=config.seed)
    stats = handler(samples, centroids, key=key)

    def back(host: np.ndarray, like: jax.Array) -> jax.Array:
        """``host`` as ``like`` is placed (committed or not: both key the jit cache)."""
        host = host.astype(like.dtype)
        return jax.device_put(host, like.sharding) if like.committed else jnp.asarray(host)

    new = state._replace(
        labels=back(samples.labels, state.labels),
        centroids=back(centroids.centroids, state.centroids),
        sizes=back(centroids.sizes, state.sizes),
        sums=back(centroids.sums, state.sums),
    )
    return new, stats


# ---------------------------------------------------------------------------- data parallelism
def make_sharded_step(mesh: Mesh, config: ODCConfig, axis_name: str = "data") -> Callable[..., tuple[ODCState, dict[str, jax.Array]]]:
    """Data-parallel :func:`step` over the ``axis_name`` axis of ``mesh`` (``jax.shard_map``).

    Returns ``sharded_step(state, indices, features) -> (state, stats)``, jit-compiled with
    ``state`` donated. ``indices`` (B,) and ``features`` (B, D) are the global batch, sharded
    along ``axis_name`` (each device holds its per-device batch of B / devices rows; other
    placements are resharded). Every device all-gathers the batch (tiled, in device order) and
    applies the same :func:`step` to its replica of the state, so the replicas stay identical
    and equal a single-device :func:`step` on the concatenated batch. The state comes back
    replicated over the mesh.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    if not isinstance(config, ODCConfig):
        raise TypeError(f"config must be an ODCConfig, got {type(config).__name__}")

    def replica_step(state: ODCState, indices: jax.Array, features: jax.Array) -> tuple[ODCState, dict[str, jax.Array]]:
        indices = lax.all_gather(indices, axis_name, tiled=True, to="invarying")
        features = lax.all_gather(features, axis_name, tiled=True, to="invarying")
        return _step(state, indices, features, config)

    specs = (P(), P(axis_name), P(axis_name, None))
    mapped = jax.shard_map(replica_step, mesh=mesh, in_specs=specs, out_specs=(P(), P()))

    jitted = jax.jit(mapped, donate_argnums=0)

    def sharded_step(state: ODCState, indices: jax.Array, features: jax.Array) -> tuple[ODCState, dict[str, jax.Array]]:
        _check_batch(indices, features, config)
        if indices.shape[0] % mesh.shape[axis_name]:
            raise ValueError(f"indices must split evenly over the {mesh.shape[axis_name]} devices of {axis_name!r}, got {indices.shape[0]} rows")
        # Placed outside jit: arrays committed to one device (a core memory on a jax device, a
        # loader's batch) would be rejected by a device_put to the mesh inside jit.
        args = (state, indices, features)
        return jitted(*(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)))

    return sharded_step


def make_gather(axis_name: str = "data") -> Callable[[jax.Array], tuple[jax.Array, slice]]:
    """``gather`` for :class:`~clusterlearn.SelfClassifierLoss` inside ``jax.shard_map``.

    ``gather(local_logits)`` takes this device's (n, C) logits and returns ``(global_logits,
    slice(0, n))``: the tiled ``lax.all_gather`` over ``axis_name`` (N_global = n x devices
    rows), rotated so that this device's rows come first. The core needs ``rows`` as a Python
    ``slice``, which cannot depend on the traced device index; the rotation keeps it static
    and changes no value, since the Self-Classifier loss only depends on the set of rows (its
    column softmax and sums run over all of them) and every view of a head is rotated alike.

    Gradient: the transpose of the all-gather is a ``psum_scatter``, so the backward sums the
    incoming gradient over devices and returns this device's rows, as the core requires.
    With equal per-device batches the global-batch loss is ``lax.pmean(local_loss,
    axis_name)``; differentiating that inside ``shard_map`` gives its exact gradient with
    respect to replicated parameters on every device (no further averaging).
    """

    def gather(local_logits: jax.Array) -> tuple[jax.Array, slice]:
        n = local_logits.shape[0]
        full = lax.all_gather(local_logits, axis_name, tiled=True)
        return jnp.roll(full, -lax.axis_index(axis_name) * n, axis=0), slice(0, n)

    return gather
