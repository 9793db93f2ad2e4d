"""ODC with the sample memory sharded over S processes or devices: pure functions.

Each shard keeps the features of one contiguous block of the N samples
(:class:`~clusterlearn.shards.ShardLayout`); the labels, centroids, sizes and sums stay
replicated. Replicated labels cost one index integer per sample on every shard (8 bytes on
NumPy and PyTorch, 4 on JAX without x64: 8 GB at N = 10^9), and buy ``labels_of`` and the
small-cluster handling without a lookup collective; the features (4·D bytes per sample) are
what sharding must split. A sharded
state is an :class:`~clusterlearn.odc_state.ODCState` whose ``features`` holds only the
shard's rows.

:func:`step` takes the *global* batch (every shard's batch, concatenated in shard order, as
the replicated step does) and a ``psum`` collective (the element-wise sum over shards:
``torch.distributed.all_reduce``, ``jax.lax.psum`` inside ``shard_map``). One step moves
O(B D) bytes per shard: each owner contributes the memory rows of its samples in the batch
as bit patterns (:func:`clusterlearn.backend.to_bits`; the other shards contribute zeros),
so after one ``psum`` every shard holds the exact rows and applies the same update
(:func:`clusterlearn.odc_state.apply_batch`) to the replicated arrays, then writes back only
the rows it owns. Labels, sizes, sums and centroids therefore stay bit-identical on every
shard and equal to the replicated :func:`clusterlearn.odc_state.step`'s; the features are
identical row for row. The exception is an exact resync of float32 sums (every
:data:`~clusterlearn.odc_state.DEFAULT_FLOAT32_RESYNC` steps): its sum over shards rounds
in a different order than one pass over N rows (float64 sums never resync by default).
"""

from __future__ import annotations

from typing import Any

import array_api_compat as aac

from . import backend as B
from .centroid_memory import centroids_from_sums
from .odc_state import Batch, ODCConfig, ODCState, apply_batch, prepare_batch
from .shards import Psum, ShardLayout

Array = Any

__all__ = ["init", "step", "resync"]


def _positions(layout: ShardLayout, shard: Any, like: Array) -> tuple[Array, Array]:
    """(block,) global row of each held row (clipped to N - 1) and (block,) bool: a real row."""
    xp = aac.array_namespace(like)
    rows = xp.arange(layout.block, dtype=like.dtype, device=aac.device(like)) + shard * layout.block
    real = rows < layout.num_samples
    return xp.where(real, rows, xp.full_like(rows, layout.num_samples - 1)), real


def _local_sums(
    features: Array, labels: Array, sums: Array, layout: ShardLayout, shard: Any, psum: Psum
) -> tuple[Array, Array]:
    """(C, D) exact sums over all shards (dtype of ``sums``) and (C,) sizes from the labels."""
    xp = aac.array_namespace(features, labels, sums)
    rows, real = _positions(layout, shard, labels)
    zeros = xp.zeros(sums.shape, dtype=sums.dtype, device=aac.device(sums))
    # padding rows (past N) count for nothing: labelled C, one past the last cluster, into a
    # row of the accumulator that is dropped
    target = xp.where(real, xp.take(labels, rows), xp.full_like(rows, sums.shape[0]))
    extended = xp.concat([zeros, xp.zeros((1, sums.shape[1]), dtype=sums.dtype, device=aac.device(sums))])
    local = B.scatter_add_rows(extended, target, features)[: sums.shape[0], :]
    return psum(local), xp.astype(B.bincount(labels, sums.shape[0]), labels.dtype)


def init(features: Array, labels: Array, num_clusters: int, layout: ShardLayout, shard: Any, psum: Psum) -> ODCState:
    """The sharded state of this shard's unit-norm ``features`` (block, D) and all ``labels`` (N,).

    Like :func:`clusterlearn.odc_state.init`; a collective (one ``psum`` of the (C, D) sums).
    ``shard`` is this shard's number: an int, or a 0-d integer array such as
    ``jax.lax.axis_index`` inside ``shard_map``.
    """
    xp = aac.array_namespace(features, labels)
    device = aac.device(features)
    if features.shape[0] != layout.block or labels.shape[0] != layout.num_samples:
        raise ValueError(
            f"features must have the shard's {layout.block} rows and labels all {layout.num_samples}, "
            f"got {features.shape[0]} and {labels.shape[0]}"
        )
    labels = xp.astype(labels, B.index_dtype(xp, device))
    empty = xp.zeros((num_clusters, features.shape[1]), dtype=B.accumulator_dtype(xp, device), device=device)
    sums, sizes = _local_sums(features, labels, empty, layout, shard, psum)
    centroids = centroids_from_sums(xp.zeros(sums.shape, dtype=features.dtype, device=device), sizes, sums)
    return ODCState(features, labels, centroids, sizes, sums, xp.asarray(0, dtype=labels.dtype, device=device))


def resync(state: ODCState, layout: ShardLayout, shard: Any, psum: Psum) -> ODCState:
    """``state`` with sums and sizes recomputed exactly over all shards (a collective)."""
    sums, sizes = _local_sums(state.features, state.labels, state.sums, layout, shard, psum)
    return state._replace(sums=sums, sizes=sizes)


def _owned(batch: Batch, layout: ShardLayout, shard: Any) -> tuple[Array, Array]:
    """(B,) bool: this shard owns the row; (B,) its local position (0 where not owned)."""
    xp = aac.array_namespace(batch.idx)
    local = batch.idx - shard * layout.block
    own = (local >= 0) & (local < layout.block)
    return own, xp.where(own, local, xp.zeros_like(local))


def step(
    state: ODCState, indices: Array, features: Array, config: ODCConfig, layout: ShardLayout, shard: Any, psum: Psum
) -> tuple[ODCState, dict[str, Array]]:
    """One ODC memory iteration on a sharded state; a collective (every shard calls it).

    The same update as :func:`clusterlearn.odc_state.step` (same ``stats``); pure and static
    shapes (``config`` and ``layout`` static under ``jax.jit``).

    Parameters
    ----------
    state : sharded :class:`~clusterlearn.odc_state.ODCState` (``features`` (block, D)), consumed
    indices : (B,) integer dataset indices of the global batch, equal on every shard
    features : (B, D) the global batch's features, equal on every shard
    config : :class:`~clusterlearn.odc_state.ODCConfig` (``num_samples`` is the global N)
    layout : the :class:`ShardLayout`
    shard : this shard's number (int, or 0-d integer array: ``jax.lax.axis_index`` in ``shard_map``)
    psum : element-wise sum of an array over all shards, returning the sum on every shard
    """
    xp = aac.array_namespace(state.features, indices, features)
    batch = prepare_batch(state, indices, features, config)
    own, local = _owned(batch, layout, shard)
    mine = xp.take(state.features, local, axis=0)
    mine = xp.where(own[:, None], mine, xp.zeros_like(mine))
    old = B.from_bits(psum(B.to_bits(mine)), state.features.dtype)
    return apply_batch(
        state,
        batch,
        old,
        config,
        write=lambda f, b, new: B.set_rows_where(f, local, new, own),
        exact_sums=lambda f, y, s: _local_sums(f, y, s, layout, shard, psum),
    )
