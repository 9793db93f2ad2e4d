"""torch.distributed plumbing shared by the PyTorch adapter: world info, checked gathers.

Every collective here is preceded by a small header exchange (one all-gather of a few
integers per rank) so that a rank with bad input, or with a batch of another size, makes
*every* rank raise the same clear error instead of leaving its peers waiting in a collective
that never completes. A rank that does not call the collective at all cannot be detected
this way; give the process group a ``timeout`` for that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "world_size",
    "rank",
    "comm_device",
    "agree",
    "all_gather_cat",
    "all_gather_with_grad",
    "broadcast_",
    "first_error",
]


#: ``all_gather_single`` (torch >= 2.14) replaces the deprecated ``all_gather_into_tensor``.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _active(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: Any = None) -> int:
    """Number of ranks (1 when torch.distributed is not initialised)."""
    return dist.get_world_size(group) if _active(group) else 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    return dist.get_rank(group) if _active(group) else 0


def comm_device(group: Any = None) -> torch.device:
    """Device collectives of ``group`` run on: the current CUDA device for NCCL, else CPU."""
    if _active(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(
    header: Sequence[int],
    error: BaseException | None,
    *,
    what: str,
    names: Sequence[str],
    group: Any = None,
) -> list[list[int]]:
    """Exchange a small integer header and any local error; raise on every rank alike.

    Parameters
    ----------
    header : this rank's integers describing its input (e.g. batch size, feature dim)
    error : the ``ValueError``/``TypeError`` this rank's input validation raised, or None
    what : the operation, for messages (``"OnlineDeepClustering.step"``)
    names : one name per header entry; ranks whose entries differ raise ``ValueError``

    Returns
    -------
    The headers of all ranks, in rank order.

    Raises
    ------
    The local ``error`` on the rank that had it; ``ValueError`` naming the failing ranks on
    the others; ``ValueError`` on every rank if the headers differ.
    """
    ok = [0 if error is not None else 1, *(int(v) for v in header)]
    if not _active(group):
        if error is not None:
            raise error
        return [ok[1:]]
    local = torch.tensor(ok, dtype=torch.int64, device=comm_device(group))
    table = torch.empty((world_size(group), local.numel()), dtype=torch.int64, device=local.device)
    _all_gather_into(table.view(-1), local, group=group)
    rows = table.cpu().tolist()
    bad = [r for r, row in enumerate(rows) if row[0] == 0]
    if error is not None:
        raise error
    if bad:
        raise ValueError(f"{what}: rank(s) {bad} passed invalid input (see the error on those ranks)")
    for j, name in enumerate(names, start=1):
        values = [row[j] for row in rows]
        if len(set(values)) > 1:
            raise ValueError(
                f"{what}: {name} differs across ranks ({values} in rank order); every rank must pass "
                "the same size (pad the last batch, as DistributedSampler does, or drop it)"
            )
    return [row[1:] for row in rows]


def all_gather_cat(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate equally shaped tensors from all ranks along dim 0, in rank order (no grad).

    ``x`` is moved to the group's communication device and the result stays there.
    """
    if not _active(group):
        return x
    x = x.detach().to(comm_device(group)).contiguous()
    out = torch.empty((world_size(group) * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_into(out, x, group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradient over ranks and keeps this rank's rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group, ctx.rows, ctx.device = group, x.shape[0], x.device
        return all_gather_cat(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = rank(ctx.group) * ctx.rows
        return grad[start : start + ctx.rows].to(ctx.device), None


def all_gather_with_grad(x: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, slice]:
    """Gather ``x`` (n, ...) from every rank into (world·n, ...) with a gradient to the local part.

    The backward all-reduces (sums) the incoming gradient and returns this rank's rows, so the
    local part receives the gradient of the *sum* of all ranks' losses; DDP's averaging over
    ranks then gives the gradient of their mean. With losses that average over this rank's
    rows of a global-batch softmax (the ``gather`` contract of
    :class:`clusterlearn.SelfClassifierLoss`) that mean is the loss of the whole global batch.
    A plain ``all_gather`` (no gradient to the other ranks' rows) gives wrong gradients. Every
    rank must pass the same ``n``; a mismatch raises on every rank.

    Returns
    -------
    global : (world·n, ...) on ``x``'s device, rank-ordered
    rows : the slice of this rank's rows in ``global``
    """
    if not _active(group):
        return x, slice(0, x.shape[0])
    names = ["batch size"] + [f"size of dim {d}" for d in range(1, x.ndim)]
    agree(list(x.shape), None, what="all_gather_with_grad", names=names, group=group)
    out = _AllGatherWithGrad.apply(x, group).to(x.device)
    start = rank(group) * x.shape[0]
    return out, slice(start, start + x.shape[0])


def broadcast_(x: torch.Tensor, src: int = 0, group: Any = None) -> torch.Tensor:
    """``x`` from rank ``src`` on every rank (returns a tensor on ``x``'s device)."""
    if not _active(group):
        return x
    buf = x.detach().to(comm_device(group)).contiguous()
    dist.broadcast(buf, src=src, group=group)
    return buf.to(x.device)


def first_error(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Run ``fn``; return its result and None, or None and the ``ValueError``/``TypeError`` it raised."""
    try:
        return fn(), None
    except (ValueError, TypeError) as err:
        return None, err
