"""Rows of an (N, ...) array cut into contiguous blocks, one per shard (process or device).

The sharded memories (:mod:`clusterlearn.odc_shard`, :mod:`clusterlearn.kmeans_sharded`)
talk to each other only through ``psum``: the element-wise sum of an array over all shards,
returned on every shard (``torch.distributed.all_reduce``, ``jax.lax.psum`` inside
``shard_map``, or any equivalent). Rows move between shards as bit patterns
(:func:`clusterlearn.backend.to_bits`): the owner contributes a row, every other shard zeros,
so the sum is the row bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import array_api_compat as aac
import numpy as np

from . import backend as B
from .validation import check_int

Array = Any
#: The collective every sharded function takes: ``psum(x)`` is the sum of ``x`` over all shards.
Psum = Callable[[Array], Array]

__all__ = ["Psum", "ShardLayout", "shard_rows", "gather_rows"]


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """How the N samples are cut into ``num_shards`` blocks (static, hashable).

    Shard ``s`` owns the rows ``[s * block, min((s + 1) * block, N))`` with
    ``block = ceil(N / S)``, and holds ``block`` rows: the last shard's rows past N are zero
    padding that no index reaches. Equal blocks are what ``jax.sharding.NamedSharding``
    needs along N, and a checkpoint is re-cut for another number of shards by global row.
    """

    num_samples: int
    num_shards: int

    def __post_init__(self) -> None:
        check_int(self.num_shards, "num_shards", minimum=1)
        check_int(self.num_samples, "num_samples", minimum=1)

    @property
    def block(self) -> int:
        """Rows each shard holds."""
        return -(-self.num_samples // self.num_shards)

    def start(self, shard: int) -> int:
        """First global row of ``shard``."""
        shard = check_int(shard, "shard", minimum=0)
        if shard >= self.num_shards:
            raise ValueError(f"shard must be in [0, num_shards={self.num_shards}), got {shard}")
        return shard * self.block


def shard_rows(x: Array, layout: ShardLayout, shard: int) -> Array:
    """The ``layout.block`` rows of ``x`` (N, ...) that ``shard`` holds, zero-padded past N."""
    xp = aac.array_namespace(x)
    start = layout.start(shard)
    rows = x[start : min(start + layout.block, layout.num_samples), ...]
    missing = layout.block - rows.shape[0]
    if missing == 0:
        return rows
    pad = xp.zeros((missing, *rows.shape[1:]), dtype=x.dtype, device=aac.device(x))
    return xp.concat([rows, pad], axis=0)


def gather_rows(block: Array, rows: Any, offset: Any, psum: Psum) -> Array:
    """(R, ...) the global ``rows`` (R,) of an array cut into blocks, on every shard (a collective).

    ``block`` holds the global rows ``[offset, offset + len(block))`` of this shard; every
    shard passes the same ``rows``: host integers, or an integer array of ``block``'s
    namespace (any order, repeats allowed). ``offset`` is an int or a 0-d integer array
    (``jax.lax.axis_index(axis) * block`` inside ``shard_map``: traceable). One exact
    ``psum`` of R rows as bit patterns: O(R D) bytes, never the whole array.
    """
    xp = aac.array_namespace(block)
    dev = aac.device(block)
    if isinstance(rows, np.ndarray) or not aac.is_array_api_obj(rows):
        rows = xp.asarray(np.asarray(rows, dtype=np.int64), device=dev)
    local = rows - offset
    mine = (local >= 0) & (local < block.shape[0])
    taken = xp.take(block, xp.where(mine, local, xp.zeros_like(local)), axis=0)
    taken = xp.where(mine if taken.ndim == 1 else mine[:, None], taken, xp.zeros_like(taken))
    return B.from_bits(psum(B.to_bits(taken)), block.dtype)
