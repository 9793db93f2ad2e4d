"""ODC with the sample memory sharded over a JAX mesh axis (``NamedSharding`` along N).

The core's :func:`clusterlearn.odc_shard.step` inside ``jax.shard_map``: each device holds one
block of the (N, D) features (:class:`~clusterlearn.odc_shard.ShardLayout`, zero-padded to
equal blocks), labels, centroids, sizes and sums are replicated, and the collective is
``lax.psum`` over the axis. XLA places the collectives; no second implementation of the step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clusterlearn import odc_shard
from clusterlearn.shards import ShardLayout
from clusterlearn.odc_state import ODCConfig, ODCState

__all__ = ["shard_memory", "gather_memory", "make_memory_sharded_step"]


def _specs(axis_name: str) -> ODCState:
    return ODCState(P(axis_name, None), P(), P(), P(), P(), P())


def _check(mesh: Mesh, axis_name: str, config: ODCConfig) -> ShardLayout:
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
    layout = _check(mesh, axis_name, config)
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
    layout = _check(mesh, axis_name, config)

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
