"""Logits for the Self-Classifier tests: random heads, overflowing views, a fake gather."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def make_heads(seed: int, n: int, classes: list[int], views: int, scale: float = 1.0) -> list[list[np.ndarray]]:
    """float32-representable float64 logits ``heads[h][v]`` of shape ``(n, classes[h])``."""
    rng = np.random.default_rng(seed)
    return [
        [(scale * rng.standard_normal((n, c))).astype(np.float32).astype(np.float64) for _ in range(views)]
        for c in classes
    ]


def overflowing_views() -> list[np.ndarray]:
    """Three float32 (8, 5) views of ±1e38 logits (s/τ overflows, s − max(s) does not), the
    second with a class at −1e38 in every row (a line of −inf once divided, if the code divided
    before shifting)."""
    views = np.sign(np.random.default_rng(5).standard_normal((3, 8, 5))).astype(np.float32) * np.float32(1e38)
    views[1][:, 0] = np.float32(-1e38)
    return list(views)


def rank_gather(global_views: list[Any], local_views: list[Any], rows: slice) -> Callable[[Any], tuple[Any, slice]]:
    """A fake gather for one rank: maps each of its local views to the full batch of that view."""

    def gather(x):
        for local, full in zip(local_views, global_views):
            if x is local:
                return full, rows
        raise AssertionError("gather called on an unknown array")

    return gather


def ranks_mean(make_loss: Callable[..., Any], views: list[Any], world: int, n_local: int) -> Any:
    """The mean over ``world`` fake ranks of ``make_loss(gather=...)`` on each rank's rows of
    ``views`` (``n_local`` rows per rank): what DDP's gradient averaging computes."""
    total = 0.0
    for r in range(world):
        rows = slice(r * n_local, (r + 1) * n_local)
        local = [x[rows, :] for x in views]
        total = total + make_loss(gather=rank_gather(views, local, rows))(local)
    return total / world
