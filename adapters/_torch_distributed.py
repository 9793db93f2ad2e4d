"""torch.distributed plumbing shared by the PyTorch adapter: world info, checked gathers.

Every collective here is preceded by a small header exchange (:func:`agree`: one fixed-size
all-gather per rank) that carries each rank's local error, if any, and the shapes, dtypes and
device types of what it is about to send. A rank whose local phase raised (any exception),
or whose tensors differ from rank 0's in shape or dtype, makes *every* rank raise a clear
error instead of leaving its peers waiting in a collective that never completes or filling
their buffers with bytes of another layout. A rank that does not call the collective at
all (or dies) cannot be detected this way; give the process group a ``timeout`` for that.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "world_size",
    "rank",
    "comm_device",
    "agree",
    "describe",
    "all_gather_cat",
    "psum",
    "all_gather_with_grad",
    "gather_agreed",
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


#: Bytes of the first, fixed-size header round: every rank sends exactly this many, so
#: one rank's header can never be mistaken for a collective of another size.
_HEADER_BYTES = 4096

#: What a peer's exception becomes on the other ranks: its bad input is a ``ValueError`` of
#: the collective there too; any other failure (``OSError``, ``RuntimeError``, ...) a
#: ``RuntimeError``.
_INPUT_ERRORS = (ValueError, TypeError)

#: How to repair a difference, by the kind of header entry (the end of its name; the first
#: matching key counts).
_HINTS = {
    "batch size": "every rank must pass the same size (pad the last batch, as DistributedSampler does, or drop it)",
    "shape": "every rank must pass the same shapes (pad the last batch, as DistributedSampler does, or drop it)",
    "memory dtype": "construct every rank's memory with the same dtype",
    "dtype": "every rank must pass the same dtype (cast before the call)",
    "device type": "keep the tensors on the same kind of device on every rank",
    "requires grad": "every rank must compute (or skip) the gradient alike: a backward on one rank only hangs",
    "iteration": "the replicas are out of step: call sync_from_rank0() (or resume every rank from one checkpoint)",
}


def _exchange_bytes(payload: bytes, group: Any) -> list[bytes]:
    """Every rank's ``payload``, in rank order (one all-gather; two for payloads over 4 KiB).

    The first round has a fixed size on every rank and carries each payload's length, so the
    second round (only when some payload does not fit) has agreed sizes too.
    """
    first = _HEADER_BYTES - 8
    head = len(payload).to_bytes(8, "little") + payload[:first].ljust(first, b"\0")
    dev = comm_device(group)
    local = torch.frombuffer(bytearray(head), dtype=torch.uint8).to(dev)
    table = torch.empty((world_size(group), _HEADER_BYTES), dtype=torch.uint8, device=dev)
    _all_gather_into(table.view(-1), local, group=group)
    rows = table.cpu().numpy()
    sizes = [int.from_bytes(row[:8].tobytes(), "little") for row in rows]
    rest = max(sizes) - first
    if rest <= 0:
        return [row[8 : 8 + n].tobytes() for row, n in zip(rows, sizes)]
    tail = torch.frombuffer(bytearray(payload[first:].ljust(rest, b"\0")), dtype=torch.uint8).to(dev)
    tails = torch.empty((world_size(group), rest), dtype=torch.uint8, device=dev)
    _all_gather_into(tails.view(-1), tail, group=group)
    return [(row[8:].tobytes() + t.tobytes())[:n] for row, t, n in zip(rows, tails.cpu().numpy(), sizes)]


def agree(
    header: Sequence[Any],
    error: BaseException | None,
    *,
    what: str,
    names: Sequence[str],
    group: Any = None,
) -> list[list[Any]]:
    """Exchange a small header and any local error; raise on every rank alike.

    Call it before every data collective, on every rank, with the error (if any) that this
    rank's local phase raised: it is the one collective whose size cannot differ across ranks
    (a fixed-size all-gather of a JSON encoding), so a rank with bad input, or with data of
    another shape or dtype, makes *every* rank raise instead of leaving its peers waiting in
    the data collective, or receiving bytes of another layout.

    Parameters
    ----------
    header : this rank's JSON-compatible values describing its input (ints, strings, lists)
    error : the exception this rank's local phase raised (any ``Exception``), or None
    what : the operation, for messages (``"OnlineDeepClustering.step"``)
    names : names of the first ``len(names)`` header entries, which must be equal on every
        rank (entries past them are exchanged, not compared). A name ending in ``batch size``,
        ``shape``, ``dtype``, ``device type``, ``requires grad`` or ``iteration`` adds a hint
        on how to repair a difference.

    Returns
    -------
    The headers of all ranks, in rank order.

    Raises
    ------
    The local ``error`` on the rank that had it. On the other ranks, an error naming the
    failing ranks and their exceptions: ``ValueError`` when all of those are
    ``ValueError``/``TypeError`` (bad input), ``RuntimeError`` otherwise. ``ValueError`` on
    every rank, naming the entry, its values and the ranks, if a compared entry differs.
    """
    if not _active(group):
        if error is not None:
            raise error
        return [list(header)]
    mine = {"fields": list(header)} if error is None else {
        "error": [type(error).__name__, _message(error), isinstance(error, _INPUT_ERRORS)]
    }
    # default=str: a value JSON cannot encode is compared as its text rather than raising
    # here, on one rank, between the local phase and the exchange.
    rows = [json.loads(raw) for raw in _exchange_bytes(json.dumps(mine, default=str).encode(), group)]
    if error is not None:
        raise error
    bad = [r for r, row in enumerate(rows) if "error" in row]
    if bad:
        detail = "; ".join(f"rank {r}: {rows[r]['error'][0]}: {rows[r]['error'][1]}" for r in bad)
        kind = ValueError if all(rows[r]["error"][2] for r in bad) else RuntimeError
        raise kind(f"{what}: rank(s) {bad} failed before the collective, so no rank ran it ({detail})")
    headers = [row["fields"] for row in rows]
    for j, name in enumerate(names):
        values = [h[j] if j < len(h) else None for h in headers]
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            r = differ[0]
            hint = next((h for key, h in _HINTS.items() if name.endswith(key)), "")
            raise ValueError(
                f"{what}: {name} differs across ranks ([{', '.join(map(str, values))}] in rank order: "
                f"{values[r]} on rank {r} but {values[0]} on rank 0)" + (f"; {hint}" if hint else "")
            )
    return headers


def _message(error: BaseException) -> str:
    """``str(error)``, shortened; never raises (a failing ``__str__`` must not keep this rank
    from joining the exchange)."""
    try:
        return str(error)[:1000]
    except Exception:  # noqa: BLE001
        return "(its message could not be formatted)"


def describe(name: str, x: torch.Tensor) -> tuple[list[Any], list[str]]:
    """Header entries and their names for the tensor ``x``: shape, dtype and device type.

    The entries every rank must agree on before ``x`` takes part in a collective: another
    shape makes the collective's sizes differ, another dtype or layout its bytes.
    """
    return (
        [list(x.shape), str(x.dtype), x.device.type],
        [f"{name} shape", f"{name} dtype", f"{name} device type"],
    )


def psum(group: Any = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The element-wise sum over the ranks of ``group`` as a function, the ``psum`` that the
    core's sharded functions take (:mod:`clusterlearn.odc_shard`,
    :func:`clusterlearn.kmeans_sharded.kmeans_sharded`,
    :class:`clusterlearn.deepcluster_shard.ShardedDeepClusterLabeler`).

    The returned function all-reduces a copy of its tensor on the group's communication
    device and returns it on the tensor's device; it is a collective (every rank calls it, in
    the same order, with tensors of one shape and dtype). Outside ``torch.distributed`` it
    returns its argument.
    """

    def reduce(x: torch.Tensor) -> torch.Tensor:
        if not _active(group):
            return x
        y = x.to(comm_device(group)).contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y.to(x.device)

    return reduce


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
    A plain ``all_gather`` (no gradient to the other ranks' rows) gives wrong gradients.

    Every rank must pass a tensor of the same shape, dtype and device type, and either all
    or none must record the gradient (a backward on some ranks only would wait forever): a
    difference raises ``ValueError`` on every rank before any data moves. Every rank that
    records the gradient must also run the backward.

    Parameters
    ----------
    x : (n, ...) tensor
    group : the process group (default: the world)

    Returns
    -------
    global : (world·n, ...) on ``x``'s device, rank-ordered
    rows : the slice of this rank's rows in ``global``
    """
    if not _active(group):
        return x, slice(0, x.shape[0])
    described, err = first_error(lambda: _describe_gathered(x))
    header, names = described if err is None else ([], [])
    agree(header, err, what="all_gather_with_grad", names=names, group=group)
    return gather_agreed(x, group)


def gather_agreed(x: torch.Tensor, group: Any = None) -> tuple[torch.Tensor, slice]:
    """:func:`all_gather_with_grad` without its header exchange, for callers that have already
    compared ``x``'s :func:`describe` entries and gradient recording with every rank."""
    if not _active(group):
        return x, slice(0, x.shape[0])
    out = _AllGatherWithGrad.apply(x, group).to(x.device)
    start = rank(group) * x.shape[0]
    return out, slice(start, start + x.shape[0])


def _describe_gathered(x: Any) -> tuple[list[Any], list[str]]:
    """The header of ``x`` for :func:`all_gather_with_grad`, after checking that it is a dense
    tensor with a batch dimension (TypeError/ValueError otherwise)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"x must be a dense (strided) tensor, got layout {x.layout}")
    if x.ndim == 0:
        raise ValueError("x must have a batch dimension, got a 0-d tensor")
    header, names = describe("x", x)
    return [*header, torch.is_grad_enabled() and x.requires_grad], [*names, "x requires grad"]


def broadcast_(x: torch.Tensor, src: int = 0, group: Any = None) -> torch.Tensor:
    """``x`` from rank ``src`` on every rank (returns a tensor on ``x``'s device)."""
    if not _active(group):
        return x
    buf = x.detach().to(comm_device(group)).contiguous()
    dist.broadcast(buf, src=src, group=group)
    return buf.to(x.device)


def first_error(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Run ``fn``; return its result and None, or None and the exception it raised.

    Any ``Exception`` (not only bad input: ``OSError`` reading data, ``NotImplementedError``
    of an unsupported dtype, ``RuntimeError``): pass it to :func:`agree`, which raises it
    here and a matching error on the other ranks. ``KeyboardInterrupt`` and ``SystemExit``
    are not caught.
    """
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 - shared with the peers by agree(), then raised
        return None, err
