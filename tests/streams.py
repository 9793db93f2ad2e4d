"""Batch streams for the ODC tests: labels that really change, indices that repeat.

Features drift towards one of two attractors chosen by the parity of the sample index, so a
memory fed these batches re-labels samples at every step, its clusters shrink below a
``min_cluster_size`` and get re-seeded within a few dozen steps (``steps=36`` is enough at
N=240, C=6), and a swap of the momentum ``m`` with ``1 - m`` shows. Every batch repeats
indices the way DDP padding does (its tail repeats its head), so the merging of duplicates is
exercised on every step.

Imported by name (``from streams import drifting_stream``): ``tests/conftest.py`` puts
``tests/`` on ``sys.path`` for every test folder, and a script run from ``tests/`` (the DDP
scenarios) finds it next to itself.
"""

from __future__ import annotations

import numpy as np

#: The default stream's shape: N samples of dimension D in C clusters, batches of BATCH rows.
N, C, D, BATCH = 240, 6, 8, 32


def drifting_stream(
    seed: int,
    steps: int,
    *,
    num_samples: int = N,
    dim: int = D,
    batch: int = BATCH,
    repeats: int = 3,
    pull: float = 2.0,
    noise: float = 0.5,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Initial features and ``steps`` batches drifting to two attractors.

    Parameters
    ----------
    seed : int
        Seed of the generator; everything below is drawn from it in a fixed order (initial
        features, attractors, then per step the indices and the features).
    steps : int
        Number of batches (0 gives the initial features only).
    num_samples, dim : int
        ``N`` and ``D`` of the memory the stream is meant for.
    batch : int
        Rows per batch (``batch <= num_samples``).
    repeats : int
        The last ``repeats`` indices of every batch repeat its first ``repeats`` (DDP
        padding); 0 gives batches of distinct indices.
    pull, noise : float
        Scale of the two attractors and of the Gaussian noise around them.

    Returns
    -------
    x0 : (num_samples, dim) float32, standard normal (initial features, not unit norm)
    batches : list of ``(indices, features)``: (batch,) int64 in [0, num_samples) and
        (batch, dim) float32, ``features[i] = attractor[indices[i] % 2] + noise * normal``.
    """
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(num_samples, dim)).astype(np.float32)
    attract = rng.normal(size=(2, dim)) * pull
    batches = []
    for _ in range(steps):
        idx = rng.choice(num_samples, size=batch, replace=False)
        if repeats:
            idx[-repeats:] = idx[:repeats]
        f = attract[idx % 2] + noise * rng.normal(size=(batch, dim))
        batches.append((idx.astype(np.int64), f.astype(np.float32)))
    return x0, batches


def shard_stream(seed: int, steps: int, *, num_samples: int = 241) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`drifting_stream` for the sharded-memory tests: ``num_samples`` defaults to 241, no
    multiple of 2, 3 or 4 (the last shard is padded), and batch 5 (when there is one) holds a
    NaN, so a refused batch passes through every shard."""
    x0, batches = drifting_stream(seed, steps, num_samples=num_samples)
    if steps > 5:
        batches[5][1][2, 1] = np.nan
    return x0, batches
