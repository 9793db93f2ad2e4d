"""Parsing and checking the Self-Classifier loss's inputs: the adapter-facing API.

The core's loss (:mod:`clusterlearn.self_classifier`) and the adapters' losses
(``clusterlearn.adapters.torch`` / ``.jax``) accept the same call forms, run the same checks
and raise the same errors naming the argument; this public module is where they share them.
The loss's parameters are checked with :func:`check_positive`, a call's arguments are turned
into heads of views by :func:`call_argument` and :func:`parse_logits`, checked and gathered by
:func:`prepare_heads` (or, for one head, :func:`check_head`), and computed in
:func:`compute_dtype` (half precision in float32).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from types import ModuleType
from typing import Any

import array_api_compat as aac

from .backend import namespace, unsupported_torch_dtype
from .validation import all_finite, check_same_device

Array = Any
#: ``gather(logits) -> (global_logits, rows)``: the logits of every rank or device
#: concatenated, and the slice of them that are this rank's (the loss's ``gather`` argument).
Gather = Callable[[Array], "tuple[Array, slice]"]

__all__ = [
    "Gather", "call_argument", "check_finite_logits", "check_gather", "check_head", "check_logits",
    "check_positive", "compute_dtype", "parse_logits", "prepare_heads",
]


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite real number > 0, else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_gather(gather: Any, *, auto: bool = False) -> Any:
    """``gather`` if it is None or callable (or, with ``auto``, the string ``"auto"``), else TypeError."""
    if gather is None or callable(gather) or (auto and gather == "auto"):
        return gather
    choices = "'auto', None or a callable" if auto else "callable or None"
    raise TypeError(f"gather must be {choices}, got {type(gather).__name__} {gather!r}")


def check_logits(name: str, x: Array, xp: ModuleType, *, min_rows: int = 2) -> None:
    """Shape and dtype checks (static: safe under ``jax.jit``)."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N samples, C classes) array, got shape {tuple(x.shape)}")
    if not xp.isdtype(x.dtype, "real floating") or unsupported_torch_dtype(x):
        raise TypeError(f"{name} must have a real floating dtype (float16 or wider), got {x.dtype}")
    n, c = x.shape
    if n is None or c is None:
        raise ValueError(f"{name} must have a known shape, got {tuple(x.shape)}")
    if n < min_rows:
        raise ValueError(
            f"{name} must have at least {min_rows} rows (samples), got N={n}: the column softmax "
            "over the samples needs a batch"
        )
    if c < 2:
        raise ValueError(f"{name} must have at least 2 columns (classes), got C={c}")


def check_finite_logits(name: str, x: Array, xp: ModuleType) -> None:
    """Raise ValueError on NaN/inf; skipped for traced JAX arrays (inside ``jit``), whose values
    are unknown at trace time."""
    try:
        ok = all_finite(x, xp)
    except TypeError:  # jax.errors.ConcretizationTypeError is a TypeError
        if aac.is_jax_array(x):
            return
        raise
    if not ok:
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def compute_dtype(x: Array, xp: ModuleType) -> Array:
    """``x`` in the dtype the loss computes in: half precision in float32 (``s / τ`` overflows float16)."""
    if xp.finfo(x.dtype).bits < 32:
        return xp.astype(x, xp.float32)
    return x


def _is_seq(x: Any) -> bool:
    return isinstance(x, (list, tuple))


def parse_logits(logits: Any) -> tuple[list[list[Array]], list[list[str]]]:
    """Normalise a sequence of views or a sequence of heads to ``heads[h][v]`` plus names."""
    if aac.is_array_api_obj(logits):
        raise ValueError("need at least 2 views, got a single logits array")
    if not _is_seq(logits):
        raise TypeError(f"logits must be a list/tuple of views or of heads, got {type(logits).__name__}")
    items = list(logits)
    if not items:
        raise ValueError("logits is empty: pass at least two views")
    if all(_is_seq(h) for h in items):
        heads = [list(h) for h in items]
        names = [[f"logits[{h}][{v}]" for v in range(len(views))] for h, views in enumerate(heads)]
    elif not any(_is_seq(h) for h in items):
        heads = [items]
        names = [[f"logits[{v}]" for v in range(len(items))]]
    else:
        raise TypeError(
            "logits mixes arrays and lists: pass either a list of views (arrays) for one head, "
            "or a list of heads, each a list of views"
        )
    for h, views in enumerate(heads):
        for v, x in enumerate(views):
            if not aac.is_array_api_obj(x):
                raise TypeError(f"{names[h][v]} must be an array, got {type(x).__name__}")
        if len(views) < 2:
            where = "" if len(heads) == 1 else f" (head {h})"
            raise ValueError(f"need at least 2 views per head{where}, got {len(views)}")
    counts = {len(views) for views in heads}
    if len(counts) > 1:
        raise ValueError(
            f"every head must have the same number of views, got {[len(v) for v in heads]}"
        )
    return heads, names


def _gathered(
    name: str, x: Array, gather: Gather, xp: ModuleType
) -> tuple[Array, slice]:
    out = gather(x)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"gather must return a tuple (global_logits, rows), got {type(out).__name__} for {name}"
        )
    g, rows = out
    if not aac.is_array_api_obj(g) or aac.array_namespace(g) is not xp:
        raise TypeError(f"gather must return an array of the logits' namespace for {name}, got {type(g).__name__}")
    if not isinstance(rows, slice):
        raise TypeError(f"gather must return a slice of this process's rows for {name}, got {type(rows).__name__}")
    check_logits(f"gather({name})", g, xp)
    if g.shape[1] != x.shape[1]:
        raise ValueError(f"gather({name}) has {g.shape[1]} columns, {name} has {x.shape[1]}")
    if len(range(*rows.indices(g.shape[0]))) != x.shape[0]:
        raise ValueError(
            f"gather({name}) returned rows={rows} selecting "
            f"{len(range(*rows.indices(g.shape[0])))} of {g.shape[0]} rows, expected {x.shape[0]} "
            f"(the rows of {name})"
        )
    return g, rows


def _check_views(views: Sequence[Array], labels: Sequence[str], xp: ModuleType, min_rows: int) -> None:
    """The checks of one head's views: each a valid logits array, all of one shape."""
    for x, name in zip(views, labels):
        check_logits(name, x, xp, min_rows=min_rows)
        if tuple(x.shape) != tuple(views[0].shape):
            raise ValueError(
                f"views of one head must have the same shape: {labels[0]} has {tuple(views[0].shape)}, "
                f"{name} has {tuple(x.shape)}"
            )


def check_head(views: Sequence[Array], rows: slice | None) -> ModuleType:
    """Check the K views of one head (a per-head loss's input); return their namespace.

    ``rows`` not None (a gathered global batch) allows a single row per process.
    """
    named = {f"logits[{v}]": x for v, x in enumerate(views)}
    xp = namespace(**named)
    check_same_device(**named)
    if len(views) < 2:
        raise ValueError(f"need at least 2 views, got {len(views)}")
    _check_views(views, list(named), xp, 1 if rows is not None else 2)
    if rows is not None:
        n = views[0].shape[0]
        if not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice, got {type(rows).__name__}")
        if len(range(*rows.indices(n))) == 0:
            raise ValueError(f"rows must select at least one of the {n} rows, got {rows}")
    return xp


def prepare_heads(
    heads: list[list[Array]],
    names: list[list[str]],
    gather: Gather | None,
    check_finite: bool,
) -> tuple[ModuleType, list[tuple[list[Array], slice | None]]]:
    """Check every head's views, gather them, and return ``(xp, [(views, rows), ...])``.

    ``views`` are the (gathered, finiteness-checked) logits of one head, in their own dtype;
    ``rows`` is the slice of this process's rows in them (None: all rows). Shared by the core
    and the adapters' losses, so that all raise the same errors.
    """
    named = {names[h][v]: x for h, views in enumerate(heads) for v, x in enumerate(views)}
    xp = namespace(**named)
    check_same_device(**named)

    for views, labels in zip(heads, names):
        _check_views(views, labels, xp, 1 if gather is not None else 2)

    prepared = []
    for views, labels in zip(heads, names):
        rows: slice | None = None
        full: list[Array] = []
        for x, name in zip(views, labels):
            if gather is not None:
                g, r = _gathered(name, x, gather, xp)
                n_g = g.shape[0]
                if rows is not None and rows.indices(n_g) != r.indices(n_g):
                    raise ValueError(
                        f"gather returned different rows for the views of one head: {rows} and "
                        f"{r} (for {name})"
                    )
                if full and tuple(g.shape) != tuple(full[0].shape):
                    raise ValueError(
                        f"gather returned different shapes for the views of one head: "
                        f"{tuple(full[0].shape)} and {tuple(g.shape)} (for {name})"
                    )
                rows = r
                x, name = g, f"gather({name})"
            if check_finite:
                check_finite_logits(name, x, xp)
            full.append(x)
        if rows is not None and rows.indices(full[0].shape[0]) == slice(None).indices(full[0].shape[0]):
            rows = None  # whole batch: skip the no-op slice
        prepared.append((full, rows))
    return xp, prepared


def call_argument(logits: tuple[Any, ...]) -> Any:
    """The ``logits`` argument from a loss object's positional arguments.

    ``criterion(v0, v1, ...)`` (two or more arrays) or ``criterion(views_or_heads)`` (one list).
    """
    if len(logits) == 1:
        return logits[0]
    if len(logits) >= 2:
        if not all(aac.is_array_api_obj(x) for x in logits):
            raise TypeError(
                "pass either two or more view arrays as positional arguments, or a single "
                "list of views / list of heads"
            )
        return list(logits)
    raise ValueError("need at least 2 views, got none")

