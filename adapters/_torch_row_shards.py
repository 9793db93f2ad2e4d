"""Arrays cut into row blocks over ranks, as ``torch.distributed.checkpoint`` saves and loads them.

Rank ``r`` of W holds the rows ``[r * ceil(N / W), (r + 1) * ceil(N / W))`` of an (N, ...)
array (:class:`~clusterlearn.shards.ShardLayout`, which is ``torch.chunk``'s split of N
rows). :func:`row_sharded` presents that block as a ``DTensor`` sharded along dim 0, the
form in which ``torch.distributed.checkpoint`` writes each rank's rows once and reads them
back by global row under any other number of ranks; :func:`local_rows` is the block again.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _torch_distributed as D

__all__ = ["row_sharded", "local_rows"]


def row_sharded(block: torch.Tensor, num_samples: int, group: Any = None) -> torch.Tensor:
    """This rank's (n, ...) ``block`` of an (N, ...) array, for a ``torch.distributed.checkpoint`` state dict.

    Parameters
    ----------
    block : (n, ...) rows ``[r * ceil(N / W), ...)`` of rank r (the last rank's may be fewer),
        any dtype and device; to load, a tensor of the shape and dtype to fill
    num_samples : N, the rows of all ranks together
    group : the process group whose ranks hold the blocks (default: the world)

    Returns
    -------
    With several ranks, a ``DTensor`` of global shape (N, ...) sharded along dim 0 on a 1-D
    mesh of the world's ranks, whose local part is ``block`` itself (no copy), so a
    ``torch.distributed.checkpoint.load`` into it fills ``block``; with one process,
    ``block`` unchanged (save and load it with ``no_dist=True``).

    Examples
    --------
    >>> import torch.distributed.checkpoint as dcp                              # doctest: +SKIP
    >>> dcp.save({"labels": row_sharded(my_labels, N)}, checkpoint_id="ckpt/labels")  # doctest: +SKIP
    >>> target = {"labels": row_sharded(torch.zeros(my_rows, dtype=torch.int64), N)}  # doctest: +SKIP
    >>> dcp.load(target, checkpoint_id="ckpt/labels"); mine = local_rows(target["labels"])  # doctest: +SKIP
    """
    if D.world_size(group) == 1:
        return block
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh

    shape = (int(num_samples), *block.shape[1:])
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    mesh = init_device_mesh(D.comm_device(group).type, (D.world_size(group),))
    return DTensor.from_local(block, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape), stride=tuple(stride))


def local_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's block of what :func:`row_sharded` returned (the tensor itself with one process)."""
    return x.to_local() if hasattr(x, "to_local") else x
