"""ODC with the sample memory sharded over a JAX mesh axis (``NamedSharding`` along N).

The core's :func:`clusterlearn.odc_shard.step` inside ``jax.shard_map``: each device holds one
block of the (N, D) features (:class:`~clusterlearn.odc_shard.ShardLayout`, zero-padded to
equal blocks), labels, centroids, sizes and sums are replicated, and the collective is
``lax.psum`` over the axis. XLA places the collectives; no second implementation of the step.

Small-cluster handling reads the features through :func:`row_reader`: the rows it asks for
(the small clusters' and the split clusters' members) are gathered from their devices, in
any process, by one jitted ``psum`` of their bit patterns
(:func:`clusterlearn.shards.gather_rows`), and come back replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clusterlearn import odc_shard
from clusterlearn.backend import to_numpy
from clusterlearn.shards import ShardLayout, gather_rows
from clusterlearn.odc_state import ODCConfig, ODCState

__all__ = ["shard_memory", "gather_memory", "make_memory_sharded_step", "save_memory", "load_memory", "row_axis", "row_reader"]


def _specs(axis_name: str) -> ODCState:
    return ODCState(P(axis_name, None), P(), P(), P(), P(), P())


def check_mesh(mesh: Mesh, axis_name: str, config: ODCConfig) -> ShardLayout:
    """Check the arguments of a step over ``mesh``; return the layout of N rows over ``axis_name``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    if not isinstance(config, ODCConfig):
        raise TypeError(f"config must be an ODCConfig, got {type(config).__name__}")
    return ShardLayout(config.num_samples, mesh.shape[axis_name])


def shard_memory(state: ODCState, mesh: Mesh, config: ODCConfig, axis_name: str = "data") -> ODCState:
    """Place a full (replicated-layout) state on ``mesh``: features (N, D) cut along N into
    equal zero-padded blocks, one per device of ``axis_name``; every other array replicated."""
    layout = check_mesh(mesh, axis_name, config)
    features = jnp.asarray(state.features)
    if features.shape[0] != config.num_samples:
        raise ValueError(f"state.features must have num_samples={config.num_samples} rows, got {features.shape[0]}")
    pad = layout.block * layout.num_shards - config.num_samples
    features = jnp.concatenate([features, jnp.zeros((pad, features.shape[1]), features.dtype)]) if pad else features
    full = state._replace(features=features)
    return ODCState(*(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(full, _specs(axis_name))))


def gather_memory(state: ODCState, config: ODCConfig) -> ODCState:
    """The full state on the host (NumPy): features (N, D) by global row, padding dropped."""
    return ODCState(*(np.asarray(a) for a in state))._replace(features=np.asarray(state.features)[: config.num_samples])


def make_memory_sharded_step(
    mesh: Mesh, config: ODCConfig, axis_name: str = "data"
) -> Callable[[ODCState, jax.Array, jax.Array], tuple[ODCState, dict[str, jax.Array]]]:
    """``step(state, indices, features) -> (state, stats)`` on a memory sharded by :func:`shard_memory`.

    ``indices`` (B,) and ``features`` (B, D) are the global batch, split along ``axis_name``
    (B divisible by the number of devices). Every device all-gathers the batch and calls
    :func:`clusterlearn.odc_shard.step` with ``lax.psum``: the result equals the replicated
    :func:`clusterlearn.odc_state.step` on the concatenated batch (labels, sizes, sums bit for
    bit, features row for row). Jit-compiled, ``state`` donated.
    """
    layout = check_mesh(mesh, axis_name, config)

    def shard_step(state: ODCState, indices: jax.Array, features: jax.Array) -> tuple[ODCState, dict[str, jax.Array]]:
        indices = lax.all_gather(indices, axis_name, tiled=True, to="invarying")
        features = lax.all_gather(features, axis_name, tiled=True, to="invarying")
        psum = lambda x: lax.psum(x, axis_name)  # noqa: E731
        return odc_shard.step(state, indices, features, config, layout, lax.axis_index(axis_name), psum)

    specs = (_specs(axis_name), P(axis_name), P(axis_name, None))
    mapped = jax.shard_map(shard_step, mesh=mesh, in_specs=specs, out_specs=(_specs(axis_name), P()))
    jitted = jax.jit(mapped, donate_argnums=0)

    def step(state: ODCState, indices: jax.Array, features: jax.Array) -> tuple[ODCState, dict[str, jax.Array]]:
        if indices.shape[0] % layout.num_shards:
            raise ValueError(f"indices must split evenly over the {layout.num_shards} devices of {axis_name!r}, got {indices.shape[0]} rows")
        args = (indices, features)
        return jitted(state, *(jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs[1:])))

    return step


def row_axis(features: jax.Array) -> str | None:
    """The mesh axis that ``features`` (N', D) are cut along N over (as :func:`shard_memory`
    lays them out), or None for features not sharded along N (one device, replicated)."""
    sharding = getattr(features, "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.spec) and isinstance(sharding.spec[0], str):
        return sharding.spec[0]
    return None


@functools.lru_cache(maxsize=None)
def _rows_program(mesh: Mesh, axis_name: str, block: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Jitted ``(features, rows) -> (R, D)`` replicated: each device contributes the rows it
    holds, zeros elsewhere, summed as bit patterns over ``axis_name`` (one all-reduce of R rows)."""

    def local(features: jax.Array, rows: jax.Array) -> jax.Array:
        return gather_rows(features, rows, lax.axis_index(axis_name) * block, lambda x: lax.psum(x, axis_name))

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name, None), P()), out_specs=P()))


def row_reader(features: jax.Array, axis_name: str, index_dtype: np.dtype) -> Callable[[np.ndarray], np.ndarray]:
    """``rows(indices) -> (R, D)`` NumPy features of the global rows ``indices`` (R,) of
    ``features`` sharded along N over ``axis_name`` (:func:`shard_memory`'s layout), on every
    process (a collective: every process asks for the same rows in the same order); bfloat16
    rows come as float32, as :func:`clusterlearn.backend.to_numpy` gives them.

    Only those R rows move: one jitted all-reduce of their bit patterns (exact), its output
    replicated on every device. R is padded to a power of two (padding slots ask for row -1,
    which no device holds: zeros, dropped after), so a run compiles at most
    ``ceil(log2(N)) + 1`` programs per mesh. ``index_dtype``: the state's label dtype, which
    the row numbers are sent as.
    """
    mesh = features.sharding.mesh
    program = _rows_program(mesh, axis_name, features.shape[0] // mesh.shape[axis_name])
    replicated = NamedSharding(mesh, P())

    def rows(indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices)
        count = indices.shape[0]
        padded = np.full(1 << max(count - 1, 0).bit_length(), -1, dtype=index_dtype)
        padded[:count] = indices
        return to_numpy(program(features, jax.device_put(padded, replicated)))[:count]  # bfloat16 widened

    return rows


def _settings(config: ODCConfig) -> np.ndarray:
    """The settings as the UTF-8 bytes of their JSON (an array leaf a checkpoint can hold)."""
    return np.frombuffer(json.dumps(dataclasses.asdict(config), sort_keys=True).encode(), dtype=np.uint8).copy()


def _column_sharding(mesh: Mesh, axis_name: str, feat_dim: int) -> NamedSharding:
    n = mesh.shape[axis_name]
    if feat_dim % n:
        raise ValueError(
            f"saving or loading a sharded memory needs feat_dim ({feat_dim}) divisible by the {n} devices of {axis_name!r}"
        )
    return NamedSharding(mesh, P(None, axis_name))


def save_memory(path: str | os.PathLike, state: ODCState, mesh: Mesh, config: ODCConfig, axis_name: str = "data") -> None:
    """Write a memory sharded by :func:`shard_memory` to the directory ``path`` with orbax.

    The features are saved as one (N, D) array without the padding, so that
    :func:`load_memory` can read them onto a mesh of any size. orbax needs shards of equal
    size and N rarely divides by the device count, so the checkpoint holds them cut along D
    (``feat_dim`` must divide by the number of devices, at saving and at loading): the
    re-cut from rows to columns is an all-to-all placed by XLA; no device ever holds more
    than its (N / S, D) share. Labels, centroids, sizes, sums and the iteration are saved
    once; the settings are saved too and checked at loading. orbax writes the directory
    atomically (a temporary name, renamed when complete). A collective in multi-process JAX.
    """
    import orbax.checkpoint as ocp

    check_mesh(mesh, axis_name, config)
    columns = _column_sharding(mesh, axis_name, config.feat_dim)
    features = jax.jit(lambda f: f[: config.num_samples], out_shardings=columns)(state.features)
    tree = {"features": features, **{k: getattr(state, k) for k in ODCState._fields[1:]}, "settings": _settings(config)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), tree)
    checkpointer.wait_until_finished()


def load_memory(path: str | os.PathLike, mesh: Mesh, config: ODCConfig, axis_name: str = "data") -> ODCState:
    """Read a memory written by :func:`save_memory` (on any mesh size) onto ``mesh``.

    Returns the state as :func:`shard_memory` lays it out for this mesh (features in equal
    zero-padded row blocks, the rest replicated). ``ValueError`` if the checkpoint was written
    with other settings than ``config``. A collective in multi-process JAX.
    """
    import orbax.checkpoint as ocp

    layout = check_mesh(mesh, axis_name, config)
    columns = _column_sharding(mesh, axis_name, config.feat_dim)
    path = os.path.abspath(path)
    checkpointer = ocp.StandardCheckpointer()
    saved = checkpointer.metadata(path)
    tree = saved.item_metadata.tree if hasattr(saved, "item_metadata") else saved
    want = _settings(config)
    if tuple(tree["settings"].shape) != want.shape:
        raise ValueError(f"the checkpoint at {path!r} was written with other settings than {config}")
    replicated = NamedSharding(mesh, P())
    target = {k: jax.ShapeDtypeStruct(tree[k].shape, tree[k].dtype, sharding=replicated) for k in tree}
    target["features"] = jax.ShapeDtypeStruct(tree["features"].shape, tree["features"].dtype, sharding=columns)
    restored = checkpointer.restore(path, target)
    if not np.array_equal(np.asarray(restored["settings"]), want):
        raise ValueError(f"the checkpoint at {path!r} was written with other settings than {config}")
    pad = layout.block * layout.num_shards - config.num_samples
    rows = NamedSharding(mesh, P(axis_name, None))
    features = jax.jit(lambda f: jnp.concatenate([f, jnp.zeros((pad, f.shape[1]), f.dtype)]), out_shardings=rows)(restored["features"])
    return ODCState(features, *(restored[k] for k in ODCState._fields[1:]))
