"""ODC as pure functions over a state of arrays (the shape of an optax transformation).

:class:`ODCState` holds the memories, :class:`ODCConfig` the static settings, and
:func:`step` is one memory iteration: ``step(state, indices, features, config) -> (state,
stats)``. Written against the array API with static shapes and no data-dependent Python
control flow (the two periodic updates go through :func:`clusterlearn.backend.cond`), so
the same function runs eagerly on every backend and traces under ``jax.jit``.

:class:`~clusterlearn.OnlineDeepClustering` is the checked, stateful shell around it (input
validation, namespace conversion, the host-side small-cluster handling);
``clusterlearn.adapters.jax`` jit-compiles it, the torch adapter gathers the global batch
around it.

Arrays passed in as ``state`` are consumed: NumPy, PyTorch and CuPy update the (N, D) memory
in place, JAX returns new arrays (donate the state under ``jax.jit``). Use the returned state.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import array_api_compat as aac

from . import backend as B
from .validation import check_int, check_real
from .assignment import METRICS, Metric, nearest_centroid
from .centroid_memory import centroids_from_sums
from .reweighting import check_power
from .reweighting import loss_weights as _size_loss_weights
from .sample_memory import l2_normalize, merge_sorted_duplicates, momentum_update

Array = Any

__all__ = [
    "ODCConfig",
    "ODCState",
    "Batch",
    "DEFAULT_FLOAT32_RESYNC",
    "state_shapes",
    "STATE_KINDS",
    "check_state",
    "init",
    "step",
    "prepare_batch",
    "apply_batch",
    "refresh",
    "resync",
    "loss_weights",
    "small_clusters_due",
    "fingerprint_parts",
    "fingerprint",
    "check_replicas",
]

#: Resync interval of sums that are not float64 when :attr:`ODCConfig.resync_interval` is None.
DEFAULT_FLOAT32_RESYNC = 1000


class ODCState(NamedTuple):
    """The ODC memories (a pytree under JAX); also the array part of a checkpoint.

    Attributes
    ----------
    features : (N, D) floating, unit-norm memory feature of every sample
    labels : (N,) integer (the namespace's default), pseudo-label of every sample in [0, C)
    centroids : (C, D) dtype of ``features``, members' means as of the last refresh
    sizes : (C,) dtype of ``labels``, always ``bincount(labels, C)``
    sums : (C, D) float64 where the backend has it, else float32: members' current feature sums
    iteration : () dtype of ``labels``, number of steps taken
    """

    features: Array
    labels: Array
    centroids: Array
    sizes: Array
    sums: Array
    iteration: Array


@dataclasses.dataclass(frozen=True)
class ODCConfig:
    """Static settings of ODC, checked here; meanings as in :class:`~clusterlearn.OnlineDeepClustering`.

    ``resync_interval`` None means: decided by the sums dtype (:meth:`resync_every`). Frozen
    and hashable: pass it as a static argument of ``jax.jit``. ``assign=`` is the deprecated
    name of ``metric`` (see docs/glossary.md), accepted with a ``DeprecationWarning`` until the
    next release.

    Raises ``TypeError``/``ValueError`` naming the setting for a bad value, and for
    ``num_clusters * max(min_cluster_size, 1) > num_samples`` (no assignment can keep every
    cluster that large).
    """

    num_samples: int
    num_clusters: int
    feat_dim: int
    momentum: float = 0.5
    min_cluster_size: int = 20
    centroid_update_interval: int = 10
    small_cluster_interval: int = 1
    reweight_power: float = 0.5
    metric: Metric = "l2"
    seed: int = 0
    resync_interval: int | None = None

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        for name in ("num_samples", "num_clusters", "feat_dim", "centroid_update_interval", "small_cluster_interval"):
            put(name, check_int(getattr(self, name), name, minimum=1))
        if self.resync_interval is not None:
            put("resync_interval", check_int(self.resync_interval, "resync_interval", minimum=1))
        put("seed", check_int(self.seed, "seed", minimum=0))
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.num_clusters > self.num_samples:
            raise ValueError(f"num_clusters ({self.num_clusters}) must not exceed num_samples ({self.num_samples})")
        put("min_cluster_size", check_int(self.min_cluster_size, "min_cluster_size", minimum=0))
        if self.num_clusters * self.min_cluster_size > self.num_samples:
            raise ValueError(
                f"num_clusters * min_cluster_size ({self.num_clusters} * {self.min_cluster_size}) "
                f"exceeds num_samples ({self.num_samples}): no assignment can keep every cluster that large"
            )
        put("reweight_power", check_power(self.reweight_power))
        put("momentum", check_real(self.momentum, "momentum", low=0.0, high=1.0))

    def resync_every(self, sums_dtype: Any) -> int:
        """Steps between exact resyncs of the sums kept in ``sums_dtype`` (0: never).

        ``resync_interval`` when set; else never for float64 sums (their drift stays near
        1e-16 per update) and every :data:`DEFAULT_FLOAT32_RESYNC` steps otherwise.
        """
        if self.resync_interval is not None:
            return self.resync_interval
        return 0 if B.is_float64(sums_dtype) else DEFAULT_FLOAT32_RESYNC

    @property
    def assign(self) -> Metric:
        """Deprecated name of :attr:`metric`."""
        warnings.warn("ODCConfig.assign is deprecated, use ODCConfig.metric", DeprecationWarning, stacklevel=2)
        return self.metric


def _accept_deprecated_assign(init: Any) -> Any:
    """``ODCConfig(..., assign=m)``, the old spelling of ``metric=m``, with a DeprecationWarning."""

    @functools.wraps(init)
    def wrapper(self: ODCConfig, *args: Any, **kwargs: Any) -> None:
        if "assign" in kwargs:
            warnings.warn("ODCConfig(assign=...) is deprecated, use metric=...", DeprecationWarning, stacklevel=2)
            if "metric" in kwargs:
                raise TypeError("pass metric= only (assign= is its deprecated name)")
            kwargs["metric"] = kwargs.pop("assign")
        init(self, *args, **kwargs)

    return wrapper


ODCConfig.__init__ = _accept_deprecated_assign(ODCConfig.__init__)  # type: ignore[method-assign]


def state_shapes(config: ODCConfig) -> ODCState:
    """The shape of every :class:`ODCState` field under ``config``, as an ``ODCState`` of tuples."""
    n, c, d = config.num_samples, config.num_clusters, config.feat_dim
    return ODCState(features=(n, d), labels=(n,), centroids=(c, d), sizes=(c,), sums=(c, d), iteration=())


#: The dtype kind of every :class:`ODCState` field.
STATE_KINDS = ODCState(
    features="real floating", labels="integral", centroids="real floating", sizes="integral", sums="real floating",
    iteration="integral",
)


def check_state(state: Any, config: Any, *, feature_rows: int | None = None) -> None:
    """Static checks of a state against a config: types, shapes and dtype kinds (no values).

    Safe under ``jax.jit`` (reads only shapes and dtypes). Raises ``TypeError`` for a
    ``config`` that is not an :class:`ODCConfig`, a ``state`` that is not an
    :class:`ODCState`, or a field of the wrong dtype kind, and ``ValueError`` for a field of
    the wrong shape, naming the field. ``feature_rows`` (default N) is the number of rows the
    features must have: a memory sharded in equal blocks holds N rounded up to the blocks
    (:class:`~clusterlearn.shards.ShardLayout`).
    """
    if not isinstance(config, ODCConfig):
        raise TypeError(f"config must be an ODCConfig, got {type(config).__name__}")
    if not isinstance(state, ODCState):
        raise TypeError(f"state must be an ODCState, got {type(state).__name__}")
    shapes = state_shapes(config)
    if feature_rows is not None:
        shapes = shapes._replace(features=(feature_rows, config.feat_dim))
    for name, x, shape, kind in zip(ODCState._fields, state, shapes, STATE_KINDS):
        if tuple(getattr(x, "shape", (None,))) != shape:
            raise ValueError(f"state.{name} must have shape {shape} for this config, got {tuple(getattr(x, 'shape', ()))}")
        if not aac.array_namespace(x).isdtype(x.dtype, kind):
            raise TypeError(f"state.{name} must have a {kind} dtype, got {x.dtype}")


# ---------------------------------------------------------------------------- pure functions
def _exact_sums(features: Array, labels: Array, sums: Array) -> tuple[Array, Array]:
    """(C, D) sums (dtype of ``sums``) and (C,) sizes recomputed from all N samples, O(N D)."""
    xp = aac.array_namespace(features, labels, sums)
    zeros = xp.zeros(sums.shape, dtype=sums.dtype, device=aac.device(sums))
    return B.scatter_add_rows(zeros, labels, features), xp.astype(B.bincount(labels, sums.shape[0]), labels.dtype)


def init(features: Array, labels: Array, num_clusters: int) -> ODCState:
    """The state of unit-norm ``features`` (N, D) labelled ``labels`` (N,) in [0, C).

    Sums (float64 where available) and sizes exact, centroids the members' means (zero for an
    empty cluster), iteration 0. Inputs are not checked (see
    :meth:`~clusterlearn.OnlineDeepClustering.initialize`).
    """
    xp = aac.array_namespace(features, labels)
    device = aac.device(features)
    acc = B.accumulator_dtype(xp, device)
    labels = xp.astype(labels, B.index_dtype(xp, device))
    empty = xp.zeros((num_clusters, features.shape[1]), dtype=acc, device=device)
    sums, sizes = _exact_sums(features, labels, empty)
    centroids = centroids_from_sums(xp.zeros(sums.shape, dtype=features.dtype, device=device), sizes, sums)
    return ODCState(features, labels, centroids, sizes, sums, xp.asarray(0, dtype=labels.dtype, device=device))


def refresh(state: ODCState) -> ODCState:
    """``state`` with every centroid set to its members' mean ``sums / sizes`` (O(C D)).

    Empty clusters keep their previous centroid.
    """
    return state._replace(centroids=centroids_from_sums(state.centroids, state.sizes, state.sums))


def resync(state: ODCState) -> ODCState:
    """``state`` with sums and sizes recomputed exactly from the sample memory (O(N D))."""
    sums, sizes = _exact_sums(state.features, state.labels, state.sums)
    return state._replace(sums=sums, sizes=sizes)


def loss_weights(state: ODCState, config: ODCConfig) -> Array:
    """(C,) float32 class weights ``w_c ∝ n_c ** -p`` over non-empty clusters, summing to 1.

    :func:`clusterlearn.loss_weights` of ``state.sizes`` (unchecked: traceable),
    ``p = config.reweight_power``.
    """
    return _size_loss_weights(state.sizes, config.reweight_power, check=False)


def small_clusters_due(iteration: int, config: ODCConfig) -> bool:
    """Whether the host-side small-cluster handling runs after step number ``iteration``.

    The one schedule of :meth:`~clusterlearn.OnlineDeepClustering.step` and the JAX adapter's
    :func:`~clusterlearn.adapters.jax.small_cluster_step`: every
    ``config.small_cluster_interval``-th iteration.
    """
    return int(iteration) % config.small_cluster_interval == 0


def _batch_is_valid(indices: Array, features: Array, num_samples: int) -> Array:
    """() bool: indices in [0, N) and features finite with no all-zero row."""
    xp = aac.array_namespace(indices, features)
    in_range = xp.all((indices >= 0) & (indices < num_samples))
    finite = xp.all(xp.isfinite(features))
    nonzero = xp.all(xp.any(features != 0, axis=1))
    return in_range & finite & nonzero


def _merged_rows(unit: Array, sorted_indices: Array, acc_dtype: Any) -> Array:
    """(B, D) merged rows of a sorted batch; the rows themselves when no index repeats."""
    xp = aac.array_namespace(unit, sorted_indices)
    distinct = xp.all(sorted_indices[1:] != sorted_indices[:-1])
    merge = lambda u, s: merge_sorted_duplicates(s, u, acc_dtype)[0]  # noqa: E731
    return B.cond(distinct, lambda u, s: u, merge, unit, sorted_indices)


class Batch(NamedTuple):
    """A batch prepared for :func:`apply_batch` (replicated: every shard computes the same).

    Attributes
    ----------
    applied : () bool, the batch passed :func:`step`'s checks
    idx : (B,) dataset indices sorted (stable), dtype of the labels; zeros when refused
    lead : (B,) position in ``idx`` of each row's first copy
    first : (B,) bool, the row is its index's first copy
    merged : (B, D) dtype of the memory, the unit-norm (merged) fresh feature of each row
    """

    applied: Array
    idx: Array
    lead: Array
    first: Array
    merged: Array


def prepare_batch(state: ODCState, indices: Array, features: Array, config: ODCConfig) -> Batch:
    """Steps 1 of :func:`step`: check, sort by index, normalise and merge repeated indices.

    Reads only ``state``'s dtypes, so a sharded state gives the same :class:`Batch`.
    """
    xp = aac.array_namespace(state.labels, indices, features)
    index = state.labels.dtype
    features = xp.astype(features, state.features.dtype)
    applied = _batch_is_valid(indices, features, config.num_samples)
    # A refused batch reads and rewrites row 0 and adds zeros: no index can leave [0, N).
    indices = xp.where(applied, xp.astype(indices, index), xp.zeros_like(indices, dtype=index))
    order = xp.argsort(indices, stable=True)
    idx = xp.take(indices, order)
    unit = xp.take(l2_normalize(features), order, axis=0)
    lead = xp.searchsorted(idx, idx, side="left")  # position of each row's first copy
    first = lead == xp.arange(idx.shape[0], dtype=lead.dtype, device=aac.device(lead))
    return Batch(applied, idx, lead, first, _merged_rows(unit, idx, state.sums.dtype))


def apply_batch(
    state: ODCState,
    batch: Batch,
    old: Array,
    config: ODCConfig,
    *,
    write: Any = None,
    exact_sums: Any = None,
    half_sq_norms: Array | None = None,
) -> tuple[ODCState, dict[str, Array]]:
    """Steps 2-5 of :func:`step`, given ``old`` (B, D), the memory rows of ``batch.idx``.

    ``write(features, batch, new) -> features`` stores the updated rows (default: every row
    of ``batch.idx``) and ``exact_sums(features, labels, sums) -> (sums, sizes)`` recomputes
    the sums (default: from all rows of ``features``); a sharded memory passes its own.
    ``half_sq_norms`` as in :func:`step`.
    """
    xp = aac.array_namespace(state.labels, old)
    index = state.labels.dtype
    write = write or (lambda f, b, new: B.set_rows(f, b.idx, new))
    exact_sums = exact_sums or _exact_sums
    applied, idx = batch.applied, batch.idx
    old_labels = xp.take(state.labels, idx)
    new = xp.where(applied, momentum_update(old, batch.merged, config.momentum), old)
    nearest = nearest_centroid(new, state.centroids, metric=config.metric, half_sq_norms=half_sq_norms)
    assigned = xp.take(xp.astype(nearest, index), batch.lead)
    new_labels = xp.where(applied, assigned, old_labels)
    counted = batch.first & applied  # repeats count once; nothing counts in a refused batch
    moved_labels = xp.concat([old_labels, new_labels])
    ones = xp.astype(counted, state.sizes.dtype)
    acc = state.sums.dtype
    count = xp.astype(counted, acc)[:, None]
    moved = xp.concat([-xp.astype(old, acc) * count, xp.astype(new, acc) * count])
    state = ODCState(
        features=write(state.features, batch, new),
        labels=B.set_rows(state.labels, idx, new_labels),
        centroids=state.centroids,
        sizes=B.scatter_add(state.sizes, moved_labels, xp.concat([-ones, ones])),
        sums=B.scatter_add(state.sums, moved_labels, moved),
        iteration=state.iteration + xp.astype(applied, state.iteration.dtype),
    )
    every = config.resync_every(acc)
    if every:  # only the small arrays pass through the conditional: no copy of the (N, D) memory
        due = applied & (state.iteration % every == 0)
        exact = lambda f, y, s, n: exact_sums(f, y, s)  # noqa: E731
        sums, sizes = B.cond(due, exact, lambda f, y, s, n: (s, n), state.features, state.labels, state.sums, state.sizes)
        state = state._replace(sums=sums, sizes=sizes)
    refreshed = applied & (state.iteration % config.centroid_update_interval == 0)
    centroids = B.cond(refreshed, centroids_from_sums, lambda c, n, s: c, state.centroids, state.sizes, state.sums)
    changed = xp.sum(xp.astype(batch.first & (old_labels != new_labels), index))
    distinct = xp.sum(xp.astype(batch.first, index))
    stats = {
        "change_ratio": xp.astype(changed, xp.float32) / xp.astype(distinct, xp.float32),
        "num_changed": changed,
        "num_distinct": distinct,
        "centroids_refreshed": refreshed,
        "applied": applied,
    }
    return state._replace(centroids=centroids), stats


def step(
    state: ODCState, indices: Array, features: Array, config: ODCConfig, *, half_sq_norms: Array | None = None
) -> tuple[ODCState, dict[str, Array]]:
    """One ODC memory iteration; pure, static shapes, traceable by ``jax.jit`` (``config`` static).

    1. Sort the batch by index and merge repeated indices (the normalised mean of their
       normalised features, bit for bit independent of the batch order:
       :func:`~clusterlearn.sample_memory.merge_sorted_duplicates`);
    2. ``F[idx] <- normalize(m normalize(f) + (1 - m) F[idx])``;
    3. re-label the batch to the nearest centroid (``config.metric``); copies of a repeated
       index take the label of its first copy;
    4. sizes and sums updated incrementally, each distinct sample counted once;
    5. every :meth:`ODCConfig.resync_every` steps sums and sizes recomputed exactly, then
       every ``centroid_update_interval`` steps all centroids refreshed.

    Small-cluster handling is not part of it (host side, data-dependent shapes).

    Parameters
    ----------
    state : :class:`ODCState`, consumed (see the module docstring)
    indices : (B,) integer dataset indices, in the state's namespace
    features : (B, D) real floating features (cast to the memory's dtype)
    config : :class:`ODCConfig`
    half_sq_norms : (C,) optional, :func:`~clusterlearn.assignment.centroid_half_sq_norms` of
        ``state.centroids`` when the caller keeps it (it changes only with the centroids);
        computed here when omitted, with the same bits. Not checked against the centroids.
        ``clusterlearn.adapters.jax.step`` computes it in a program of its own and passes it.

    Notes
    -----
    A batch with an index outside [0, N), a non-finite feature (after the cast) or an
    all-zero row is refused, not raised on (values cannot raise under ``jit``): the state
    keeps every bit, the iteration does not advance, and ``stats["applied"]`` is False.

    Returns
    -------
    state : the new :class:`ODCState`
    stats : dict of 0-d arrays: ``change_ratio`` (float32, fraction of the batch's distinct
        samples whose label changed), ``num_changed`` and ``num_distinct`` (the counts behind
        it, dtype of the labels), ``centroids_refreshed`` and ``applied`` (bool)
    """
    batch = prepare_batch(state, indices, features, config)
    xp = aac.array_namespace(state.features)
    old = xp.take(state.features, batch.idx, axis=0)
    return apply_batch(state, batch, old, config, half_sq_norms=half_sq_norms)


# ---------------------------------------------------------------------------- replicas
def fingerprint_parts(state: ODCState, config: ODCConfig) -> dict[str, str]:
    """What :func:`fingerprint` digests, field by field, backend-independent.

    Per :class:`ODCState` field in field order, ``"<dtype name> <shape> <SHA-256>"`` of its
    exact little-endian bytes (:func:`clusterlearn.backend.exact_bytes`: the same state on
    NumPy, PyTorch, JAX or CuPy gives the same text; a 0-d field, the iteration, shows its
    value instead), and under ``"config"`` the settings as sorted JSON.
    """
    parts = {}
    for name, x in zip(ODCState._fields, state):
        dtype, shape, data = B.exact_bytes(x)
        value = B.to_numpy(x).item() if shape == () else hashlib.sha256(data).hexdigest()
        parts[name] = f"{dtype} {list(shape)} {value}"
    parts["config"] = json.dumps(dataclasses.asdict(config), sort_keys=True)
    return parts


def fingerprint(state: ODCState, config: ODCConfig) -> str:
    """SHA-256 hex digest of a state's exact bytes (dtypes and shapes included) and its config.

    Equal for equal states on every backend (see :func:`fingerprint_parts`): compare replicas
    across ranks or devices, or a resumed run with an uninterrupted one. Copies the state to
    the host.
    """
    return hashlib.sha256(json.dumps(fingerprint_parts(state, config)).encode()).hexdigest()


def check_replicas(parts: Mapping[str, Mapping[str, str]], repair: str = "") -> None:
    """Raise ``RuntimeError`` if the replicas' :func:`fingerprint_parts` are not all equal.

    Parameters
    ----------
    parts : replica name (e.g. ``"rank 1"``, ``"cpu:1"``) -> its fingerprint parts; the first
        replica is the reference
    repair : a sentence appended to the message (how to make them equal again)

    Notes
    -----
    The message names the replicas that differ from the first and the fields they differ in
    (with both values for the config and the iteration).
    """
    names = list(parts)
    if not names:
        return
    ref_name, ref = names[0], parts[names[0]]
    differ = [name for name in names[1:] if dict(parts[name]) != dict(ref)]
    if not differ:
        return
    first = parts[differ[0]]
    fields = [k for k in ref if first.get(k) != ref[k]]
    detail = "; ".join(f"{k}: {first.get(k)} on {differ[0]} but {ref[k]} on {ref_name}" for k in fields if k in ("config", "iteration"))
    raise RuntimeError(
        f"ODC memories of {', '.join(differ)} differ from {ref_name}'s ({differ[0]} in {', '.join(fields)}"
        + (f"; {detail}" if detail else "") + ")" + (f"; {repair}" if repair else "")
    )
