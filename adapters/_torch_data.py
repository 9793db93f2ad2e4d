"""Data side of the PyTorch adapter: a DDP-aware cluster-uniform sampler, feature extraction."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from clusterlearn.sampler import UniformLabelSampler

from . import _torch_distributed as D

__all__ = ["UniformClusterSampler", "extract_features"]


class UniformClusterSampler(Sampler[int]):
    """``torch.utils.data.Sampler`` drawing each epoch uniformly over clusters, sharded for DDP.

    Every rank builds the same epoch list (:class:`clusterlearn.UniformLabelSampler` with the
    same ``seed`` and epoch), pads it by repeating its start to a multiple of the world size and
    takes every ``num_replicas``-th entry from ``rank`` on, as ``DistributedSampler`` does: the
    shards are disjoint parts of one epoch and together cover it.

    Parameters
    ----------
    labels : (N,) integer cluster ids of the data set (any backend)
    num_samples : draws per epoch over all ranks (default N)
    seed : same on every rank
    num_replicas, rank : default from ``torch.distributed`` (1 and 0 without it)

    Notes
    -----
    Call :meth:`set_epoch` at the start of each epoch and :meth:`set_labels` after each
    re-clustering (DeepCluster).
    """

    def __init__(
        self,
        labels: Any,
        num_samples: int | None = None,
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.num_replicas = D.world_size() if num_replicas is None else int(num_replicas)
        self.rank = D.rank() if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={self.rank}, num_replicas={self.num_replicas}")
        self._num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.set_labels(labels)

    def set_labels(self, labels: Any) -> None:
        """Use new cluster ids (N,) from the next epoch on."""
        self.sampler = UniformLabelSampler(labels, self._num_samples, seed=self.seed)
        self.sampler.set_epoch(self.epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (same on every rank)."""
        self.sampler.set_epoch(epoch)
        self.epoch = self.sampler.epoch

    @property
    def total_size(self) -> int:
        """Length of the padded epoch list over all ranks."""
        return self.num_replicas * len(self)

    def shard(self, epoch: int | None = None) -> np.ndarray:
        """(len(self),) int64 dataset indices of this rank for ``epoch`` (default: the current one)."""
        full = self.sampler.epoch_indices(epoch)
        pad = self.total_size - full.shape[0]
        full = np.concatenate([full, np.resize(full, pad)]) if pad else full
        return full[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard().tolist())

    def __len__(self) -> int:
        return math.ceil(self.sampler.num_samples / self.num_replicas)


def _first(batch: Any) -> torch.Tensor:
    """The input tensor of a batch: the batch itself, or the first entry of a tuple/list/dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        "extract_features expects batches that are a tensor or a (inputs, ...) tuple; "
        f"got {type(batch).__name__} (pass inputs_of= to pick the inputs)"
    )


def _shuffles(sampler: Any) -> bool:
    return isinstance(sampler, RandomSampler) or (isinstance(sampler, DistributedSampler) and sampler.shuffle)


def _visit_order(loader: DataLoader) -> np.ndarray:
    """Dataset indices in the order this rank's loader visits them (needs a fixed order).

    Read from the loader's batch sampler (which wraps its sampler, or is the user's own), so
    ``DataLoader(batch_sampler=...)`` and ``drop_last`` are followed exactly.
    """
    batches = loader.batch_sampler
    if _shuffles(loader.sampler) or _shuffles(getattr(batches, "sampler", None)):
        raise ValueError("extract_features needs a loader that visits the data in a fixed order (shuffle=False)")
    if batches is None:  # batch_size=None: the sampler yields single samples
        return np.fromiter((int(i) for i in loader.sampler), dtype=np.int64)
    first, second = ([int(i) for b in batches for i in b] for _ in range(2))
    if first != second:
        raise ValueError("extract_features needs a loader that visits the data in a fixed order (its batch "
                         "sampler gave two different orders)")
    return np.asarray(first, dtype=np.int64)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: DataLoader,
    *,
    device: torch.device | str | None = None,
    out_device: torch.device | str = "cpu",
    inputs_of: Callable[[Any], torch.Tensor] = _first,
    progress: bool = True,
    local: bool = False,
) -> torch.Tensor:
    """Features of the whole data set, in dataset order, on every rank (or of this rank's part).

    Parameters
    ----------
    model : maps an input batch to (b, D) features (evaluated in ``eval()`` mode; the training
        mode is restored afterwards)
    loader : a ``DataLoader`` with a fixed order: sequential, or ``DistributedSampler(shuffle=False)``
        under DDP (each rank extracts its shard; padding repeats are fine)
    device : where the model runs (default: the device of its first parameter, else CPU)
    out_device : where the returned tensor lives
    inputs_of : picks the input tensor from a batch (default: the batch or its first entry)
    progress : a tqdm bar on rank 0 when tqdm is installed
    local : nothing is gathered: the features of this rank's ``loader.dataset`` only, every
        sample of it visited, in its order (for a sharded memory: a sequential loader over
        ``Subset(dataset, odc.shard_indices())``). A failure on one rank still raises on every
        rank under ``torch.distributed``.

    Returns
    -------
    (N, D) float32 tensor, N = ``len(loader.dataset)``; row i is sample i's feature, identical on
    every rank (with ``local``: this rank's dataset's features).

    Raises
    ------
    ValueError if the loader shuffles, or if, after gathering all ranks, some sample was never
    visited (e.g. ``drop_last=True``).
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    n = len(loader.dataset)
    mine, err = D.first_error(lambda: _extract(model, loader, device, inputs_of, progress))
    if local:
        if D.world_size() > 1:
            D.agree([], err, what="extract_features", names=[])
        elif err is not None:
            raise err
        feats, idx = mine
    else:
        feats, idx = _gather_padded(mine, err)
    seen = torch.zeros(n, dtype=torch.bool)
    seen[idx] = True
    if not bool(seen.all()):
        raise ValueError(f"extract_features: {int((~seen).sum())} of {n} samples were never visited (drop_last=True?)")
    out = torch.empty((n, feats.shape[1]), dtype=torch.float32)
    out[idx] = feats.cpu()  # padding repeats write the same sample's feature again
    return out.to(out_device)


def _extract(
    model: torch.nn.Module, loader: DataLoader, device: Any, inputs_of: Callable[[Any], torch.Tensor], progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (b, D) float32 features and their (b,) dataset indices."""
    order = _visit_order(loader)
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        for batch in _progress(loader, progress and D.rank() == 0):
            chunks.append(model(inputs_of(batch).to(device, non_blocking=True)).float())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("extract_features: the loader yielded no batch")
    local = torch.cat(chunks)
    if local.ndim != 2 or local.shape[0] != order.shape[0]:
        raise ValueError(f"model gave features of shape {tuple(local.shape)} for {order.shape[0]} samples; expected (b, D)")
    return local, torch.from_numpy(order)


def _gather_padded(
    local: tuple[torch.Tensor, torch.Tensor] | None, err: BaseException | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (features, indices), padded to the largest rank's count for the gather.

    A local error (``err``) is raised on every rank instead of leaving the others waiting.
    """
    if D.world_size() == 1:
        if err is not None:
            raise err
        return local
    local, order = local if err is None else (torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64))
    headers = D.agree([local.shape[1], local.shape[0]], err, what="extract_features", names=["feature dim"])
    counts = torch.tensor(headers)[:, 1]
    top = int(counts.max())
    dev = D.comm_device()
    feats = torch.zeros((top, local.shape[1]), dtype=local.dtype, device=dev)
    feats[: local.shape[0]] = local.to(dev)
    idx = torch.full((top,), -1, dtype=torch.int64, device=dev)
    idx[: local.shape[0]] = order.to(dev)
    all_feats = D.all_gather_cat(feats).cpu()
    all_idx = D.all_gather_cat(idx).cpu()
    keep = all_idx >= 0
    return all_feats[keep], all_idx[keep]


def _progress(iterable: Any, enabled: bool) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc="extract features", leave=False)
