"""JAX adapter: the ODC memory step as a pure, jit-compiled function over a pytree state.

The core objects accept and return ``jax.Array`` eagerly; this module gives JAX training loops
the same memories with JAX idioms:

- :class:`ODCState`, a ``NamedTuple`` pytree of the memory arrays, and :class:`ODCConfig`, the
  frozen, hashable static settings (a ``static_argnames`` argument of ``jax.jit``): the
  core's own (:mod:`clusterlearn.odc_state`);
- :func:`config_from_core`, :func:`state_from_core` and :func:`load_into_core` convert to and
  from :class:`clusterlearn.OnlineDeepClustering` (initialise with the core's k-means, then
  run the jitted step; write the state back to checkpoint it through the core);
- :func:`step`, one memory iteration: ``jax.jit`` of the core's pure
  :func:`clusterlearn.odc_state.step` (the function
  :meth:`~clusterlearn.OnlineDeepClustering.step` calls before its small-cluster handling),
  compiled once per config and batch size; :func:`loss_weights`; :func:`resync`;
- :func:`small_cluster_step`, the host-side part of a core step that follows the jitted one
  (small-cluster handling on the core's schedule), and :func:`handle_small_clusters`, that
  handling unconditionally; both delegate to the core's
  :func:`~clusterlearn.small_clusters.handle_small_clusters` (on a memory sharded along N,
  also over several processes, gathering only the feature rows it reads);
- :func:`fingerprint`, :func:`replica_fingerprints` and :func:`check_consistency`: the core's
  :func:`~clusterlearn.odc_state.fingerprint` (equal to the torch adapter's for an equal state)
  and a check that the replicas of a state on a mesh's devices are identical;
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
        state, handled = clj.small_cluster_step(state, config)
    clj.load_into_core(odc, state, config)              # then odc.state_dict() to save

This sequence makes the same decisions as ``odc.step`` on every batch. :func:`step` donates
its ``state`` (the N x D memory is updated in place): do not use the state passed in again.
Inside ``jit``, values cannot raise: a batch with indices outside [0, N), non-finite features
or an all-zero feature row leaves the state unchanged and reports ``stats["applied"]`` False
(the loop above should check it and stop).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clusterlearn import odc_state, small_clusters
from clusterlearn.assignment import centroid_half_sq_norms
from clusterlearn.backend import accumulator_dtype, convert, index_dtype, to_numpy
from clusterlearn.validation import check_int
from clusterlearn.odc import OnlineDeepClustering
from clusterlearn.shards import ShardLayout
from clusterlearn.odc_state import DEFAULT_FLOAT32_RESYNC, ODCConfig, ODCState, check_state  # noqa: F401 (re-exported)
from clusterlearn.small_clusters import SmallClusterStats

from ._jax_self_classifier import SelfClassifierLoss, self_classifier_loss
from ._jax_sharded_memory import (
    check_mesh, gather_memory, load_memory, make_memory_sharded_step, row_axis, row_reader, save_memory, shard_memory,
)

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
    "small_cluster_step",
    "fingerprint",
    "replica_fingerprints",
    "check_consistency",
    "make_sharded_step",
    "shard_memory",
    "save_memory",
    "load_memory",
    "gather_memory",
    "make_memory_sharded_step",
    "make_gather",
    "SelfClassifierLoss",
    "self_classifier_loss",
]

# ---------------------------------------------------------------------------- conversions
def _check_core(odc: Any) -> None:
    if not isinstance(odc, OnlineDeepClustering):
        raise TypeError(f"odc must be a clusterlearn.OnlineDeepClustering, got {type(odc).__name__}")


def config_from_core(odc: OnlineDeepClustering) -> ODCConfig:
    """The settings of a core :class:`~clusterlearn.OnlineDeepClustering`: its :class:`ODCConfig`.

    A core constructed without ``resync_interval`` gives ``resync_interval=None``, so the JAX
    state applies the core's rule to its own sums dtype (float32 without x64).
    """
    _check_core(odc)
    return odc.config


def state_from_core(odc: OnlineDeepClustering) -> ODCState:
    """A JAX copy of an initialised core object's memories (any core backend).

    Features and centroids keep the core's floating dtype, labels, sizes and the iteration take
    JAX's default integer dtype, and the sums its accumulator dtype (float64 with x64).
    Raises :class:`~clusterlearn.NotInitializedError` before ``odc.initialize``.
    """
    _check_core(odc)
    index, acc = index_dtype(jnp), accumulator_dtype(jnp)
    core = odc.state
    dtypes = core._replace(features=None, labels=index, centroids=None, sizes=index, sums=acc, iteration=index)
    # copies (jnp.array): the returned state is donated to the step
    return ODCState(*(jnp.array(convert(x, jnp), dtype=dtype) for x, dtype in zip(core, dtypes)))


def load_into_core(odc: OnlineDeepClustering, state: ODCState, config: ODCConfig) -> None:
    """Write ``state`` into the core object ``odc`` (``odc.load_state_dict``, which checks it).

    ``config`` must match ``odc``'s settings (checked; a ``resync_interval`` of None matches
    any), so that ``odc.step`` continues the run exactly.
    """
    _check_core(odc)
    check_state(state, config)
    settings = {k: v for k, v in vars(config).items() if v is not None}
    odc.load_state_dict({**state._asdict(), **settings, "iteration": int(state.iteration)})


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
resync = jax.jit(odc_state.resync)  # the core's docstring; jitted


def _step(
    state: ODCState, indices: jax.Array, features: jax.Array, config: ODCConfig, half_sq_norms: jax.Array | None = None
) -> tuple[ODCState, dict[str, jax.Array]]:
    """:func:`step` without ``jit``: the core's pure step after the static checks (traced
    inside :func:`step` and :func:`make_sharded_step`)."""
    check_state(state, config)
    _check_batch(indices, features, config)
    return odc_state.step(state, jnp.asarray(indices), jnp.asarray(features), config, half_sq_norms=half_sq_norms)


_jitted_step = jax.jit(_step, static_argnames=("config",), donate_argnames=("state",))
# Computed by a program of its own and passed in: inside the step's program XLA fuses the
# norms' (C, D) reduction into the elementwise pass over the (B, C) scores.
_jitted_half_sq_norms = jax.jit(centroid_half_sq_norms)


def step(state: ODCState, indices: jax.Array, features: jax.Array, config: ODCConfig) -> tuple[ODCState, dict[str, jax.Array]]:
    """One ODC memory iteration, jit-compiled (``config`` static, ``state`` donated).

    Equal to :meth:`clusterlearn.OnlineDeepClustering.step` without its small-cluster
    handling (call :func:`small_cluster_step` after it for that): repeated indices merged
    as :func:`clusterlearn.merge_duplicates` does, ``F[idx] <- normalize(m normalize(f) + (1 -
    m) F[idx])``, re-labelling to the nearest centroid (``config.metric``), exact incremental
    sizes and sums, then every ``resync_every`` steps an exact resync of the sums and every
    ``centroid_update_interval`` steps a refresh of all centroids.

    Parameters
    ----------
    state : :class:`ODCState`; donated: its buffers are reused, do not use it afterwards
    indices : (B,) integer dataset indices in [0, N); repeats allowed (a repeated sample gets
        the mean of its normalised features, counts once)
    features : (B, D) real floating features of those samples (cast to the memory's dtype)
    config : :class:`ODCConfig` (static: one compilation per config and batch shape)

    Notes
    -----
    Refused batches: values cannot raise inside ``jit``, so a batch the core's ``step`` would
    reject for its values (an index outside [0, N), a NaN or infinite feature, also after the
    cast to the memory's dtype, or an all-zero feature row) is not applied: the returned
    state equals ``state`` bit for bit (the iteration does not advance) and
    ``stats["applied"]`` is False. Check it on the host (``bool(stats["applied"])``) and stop
    or skip; a training loop that ignores it silently skips those batches.

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
    if not isinstance(config, ODCConfig):  # _step's own check names it
        return _jitted_step(state, indices, features, config)
    check_state(state, config)
    _check_batch(indices, features, config)
    norms = _jitted_half_sq_norms(state.centroids) if config.metric == "l2" else None
    return _jitted_step(state, indices, features, config, norms)


step._cache_size = _jitted_step._cache_size  # compilations so far (one per config and batch shape)


@functools.partial(jax.jit, static_argnames=("config",))
def loss_weights(state: ODCState, config: ODCConfig) -> jax.Array:
    """(C,) float32 class weights ``w_c ∝ n_c ** -p`` over non-empty clusters, summing to 1.

    Equal to :meth:`clusterlearn.OnlineDeepClustering.loss_weights` (:func:`clusterlearn.loss_weights`
    of ``state.sizes`` with ``p = config.reweight_power``), without its host-side checks.
    """
    return odc_state.loss_weights(state, config)


# ---------------------------------------------------------------------------- small clusters
def handle_small_clusters(state: ODCState, config: ODCConfig, key: int | None = None) -> tuple[ODCState, SmallClusterStats]:
    """Small-cluster handling of the core (:func:`clusterlearn.small_clusters.handle_small_clusters`), on the host.

    Not jit-able (the numbers of members to move are data dependent). Dissolves clusters
    below ``config.min_cluster_size`` and re-seeds them by 2-means splits, exactly as
    :meth:`clusterlearn.OnlineDeepClustering.step` does after its update. Runs whenever
    called; :func:`small_cluster_step` applies the core's schedule.

    The handler runs on NumPy copies of labels, sizes, sums and centroids (replicated, so
    readable on every process): eager JAX would compile every operation anew for each
    data-dependent shape, which costs seconds per call. How it reads the features:

    - features sharded along N (:func:`shard_memory`'s layout, over the devices of one
      process or of several): only the rows it asks for move, the members of the small
      clusters and of the clusters it splits (all N rows only in the core's fill step, which
      needs ``N < 2 * C * min_cluster_size``). Each read is one jitted all-reduce of those
      rows' bit patterns over the mesh axis, exact and replicated on every device
      (:func:`clusterlearn.shards.gather_rows`); the row counts are padded to powers of two,
      so at most ``ceil(log2(N)) + 1`` programs compile. A collective over several processes: every
      process calls this with the same replicated state and makes the same decisions.
    - other features (one device, or replicated): read in place on CPU; one device-to-host
      copy of the (N, D) features on an accelerator.

    Only when some cluster is small. The features are not changed (the returned state holds
    the same features array, with its sharding); the other arrays return to the devices (and
    sharding) they came from.

    Parameters
    ----------
    state : :class:`ODCState` (not modified)
    config : :class:`ODCConfig` (``min_cluster_size``, ``metric`` and ``seed`` are used)
    key : varies the split seeds; the core uses the iteration, the default here
        (``int(state.iteration)``)

    Returns
    -------
    The new state (``state`` itself when no cluster is small) and what the handler did.
    """
    _check_state_or_shards(state, config)
    key = int(state.iteration) if key is None else check_int(key, "key", minimum=0)
    if not bool(jnp.any(state.sizes < config.min_cluster_size)):
        return state, SmallClusterStats(0, 0, 0)
    # views of CPU arrays (bfloat16 widened to float32; the replicated ones are readable on every process); the handler copies what it changes
    host = ODCState(None, *(to_numpy(x) for x in state[1:]))
    axis = row_axis(state.features)
    if axis is None:
        host, rows = host._replace(features=to_numpy(state.features)), None
    else:  # the handler reads the rows it needs through `rows`; the placeholder stands for the shape
        host_dtype = to_numpy(jnp.zeros((), state.features.dtype)).dtype  # the rows' dtype: bfloat16 widened
        placeholder = np.broadcast_to(np.zeros((), dtype=host_dtype), (config.num_samples, config.feat_dim))
        host, rows = host._replace(features=placeholder), row_reader(state.features, axis, host.labels.dtype)
    handled, stats = small_clusters.handle_small_clusters(host, config, key=key, rows=rows)

    def back(new: np.ndarray, old: np.ndarray, like: jax.Array) -> jax.Array:
        """``new`` placed as ``like`` is (committed or not: both key the jit cache); ``like``
        itself when the handler left the array alone."""
        if new is old:
            return like
        new = new.astype(like.dtype)
        return jax.device_put(new, like.sharding) if like.committed else jnp.asarray(new)

    return ODCState(*(back(*arrays) for arrays in zip(handled, host, state))), stats


def _check_state_or_shards(state: ODCState, config: ODCConfig) -> None:
    """:func:`check_state`, also accepting features laid out by :func:`shard_memory` (N rows
    padded to equal blocks over the mesh axis that shards them)."""
    axis = row_axis(state.features) if isinstance(state, ODCState) else None
    if axis is not None:
        layout = ShardLayout(config.num_samples, state.features.sharding.mesh.shape[axis])
        check_state(state, config, feature_rows=layout.block * layout.num_shards)
    else:
        check_state(state, config)


def small_cluster_step(state: ODCState, config: ODCConfig) -> tuple[ODCState, SmallClusterStats]:
    """The host-side rest of :meth:`clusterlearn.OnlineDeepClustering.step`: call it after
    every :func:`step` (or sharded step).

    Runs :func:`handle_small_clusters` when the core's schedule says so
    (:func:`clusterlearn.odc_state.small_clusters_due`: every
    ``config.small_cluster_interval``-th iteration), so that :func:`step` followed by this
    makes the same decisions as the core's ``step``. Returns the state (``state`` itself
    when nothing ran) and what the handler did (all zero when it did not run). Reads the
    iteration on the host (a synchronisation). On a memory sharded over several processes,
    every process calls it after every step (the handling is a collective there).
    """
    _check_state_or_shards(state, config)
    if not odc_state.small_clusters_due(int(state.iteration), config):
        return state, SmallClusterStats(0, 0, 0)
    return handle_small_clusters(state, config)


# ---------------------------------------------------------------------------- replicas
def fingerprint(state: ODCState, config: ODCConfig) -> str:
    """:func:`clusterlearn.odc_state.fingerprint` of ``state`` (copied to the host) and ``config``.

    Equal to the torch adapter's ``OnlineDeepClustering.fingerprint()`` for an equal state
    (same dtypes, shapes and bytes) and config.
    """
    check_state(state, config)
    return odc_state.fingerprint(state, config)


def _replica_states(state: ODCState) -> dict[str, ODCState]:
    """Per addressable device (``"cpu:0"``, ...), its copy of every state array (replicated
    arrays: each device holds the whole array)."""
    per_device: dict[str, list[np.ndarray]] = {}
    for x in state:
        for shard in sorted(x.addressable_shards, key=lambda s: s.device.id):
            if tuple(shard.data.shape) != tuple(x.shape):
                raise ValueError(f"state must be replicated over its devices, got a shard of shape {tuple(shard.data.shape)}")
            per_device.setdefault(f"{shard.device.platform}:{shard.device.id}", []).append(np.asarray(shard.data))
    return {device: ODCState(*arrays) for device, arrays in per_device.items()}


def replica_fingerprints(state: ODCState, config: ODCConfig) -> dict[str, str]:
    """Per device (``"cpu:0"``, ...), the :func:`fingerprint` of its replica of ``state``.

    For a state replicated over a mesh (as :func:`make_sharded_step` returns it); all equal
    when the replicas are identical, and equal to ``fingerprint(state, config)``.
    """
    check_state(state, config)
    return {device: odc_state.fingerprint(replica, config) for device, replica in _replica_states(state).items()}


def check_consistency(state: ODCState, config: ODCConfig) -> None:
    """Raise ``RuntimeError`` if the devices' replicas of ``state`` differ (bytes, dtypes, shapes).

    The JAX counterpart of the torch adapter's ``OnlineDeepClustering.check_consistency``
    (the same comparison: :func:`clusterlearn.odc_state.check_replicas`), naming the devices
    and the fields that differ. Copies every replica to the host.
    """
    check_state(state, config)
    parts = {device: odc_state.fingerprint_parts(replica, config) for device, replica in _replica_states(state).items()}
    odc_state.check_replicas(parts, "re-replicate the state from one device")


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
    check_mesh(mesh, axis_name, config)

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
