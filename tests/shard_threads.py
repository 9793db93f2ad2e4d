"""S shards as S threads of one process, for tests of the sharded pure functions.

Each thread calls the functions with the ``psum`` of :class:`ThreadGroup`, which sums the
threads' arrays in shard order: the collective a process group or ``jax.lax.psum`` provides,
without a process group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class ThreadGroup:
    """``psum`` over S threads: each deposits its array, all wait, each reads the shard-order sum."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size)
        self.slots: list[Any] = [None] * size

    def psum(self, rank: int) -> Callable[[Any], Any]:
        def reduce(x: Any) -> Any:
            self.slots[rank] = x
            self.barrier.wait()
            total = self.slots[0]
            for other in self.slots[1:]:
                total = total + other
            self.barrier.wait()  # nobody overwrites a slot before everyone has read
            return total

        return reduce

    def run(self, fn: Callable[[int], Any]) -> list[Any]:
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results
