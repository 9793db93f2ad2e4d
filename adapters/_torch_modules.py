"""``torch.nn`` modules of the methods: ODC's neck and weighted head, Self-Classifier's head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ODCNeck", "ODCHead", "SelfClassifierHead"]


def _pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature maps → (B, C) by global average pooling; (B, C) passes through."""
    if x.ndim == 4:
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    if x.ndim != 2:
        raise ValueError(f"expected (B, C, H, W) feature maps or (B, C) features, got shape {tuple(x.shape)}")
    return x


class ODCNeck(nn.Module):
    """ODC's non-linear neck: global average pool, then ``in_dim → hidden_dim → out_dim``.

    ``Linear → BatchNorm1d → ReLU → Linear``, as in the paper's ResNet-50 setting
    (2048 → 2048 → 256). Input (B, in_dim, H, W) or (B, in_dim); output (B, out_dim), the
    feature the sample memory stores (it normalises it).
    """

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 2048, out_dim: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(_pool(x))


class ODCHead(nn.Module):
    """Linear classifier over the C clusters with ODC's re-weighted cross-entropy.

    ``forward(f)`` gives (B, C) logits; :meth:`loss` takes the pseudo-labels and class weights
    from an :class:`~clusterlearn.adapters.torch.OnlineDeepClustering` memory each iteration
    (labels read *before* the memory's ``step``). Removed for downstream use.
    """

    def __init__(self, in_dim: int = 256, num_clusters: int = 10_000) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_clusters)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def reset_parameters(self) -> None:
        """Re-initialise the classifier (DeepCluster does this after every re-clustering)."""
        self.fc.reset_parameters()

    @staticmethod
    def loss(logits: torch.Tensor, indices: torch.Tensor, memory: Any) -> torch.Tensor:
        """Cross-entropy of ``logits`` (B, C) against ``memory.labels_of(indices)``.

        Class weights are ``memory.loss_weights()`` (``w_c ∝ n_c^-p``), as ``F.cross_entropy``'s
        ``weight`` (a weighted mean over the batch).
        """
        targets = memory.labels_of(indices).to(device=logits.device, dtype=torch.int64)
        return F.cross_entropy(logits, targets, weight=memory.loss_weights(like=logits))


class SelfClassifierHead(nn.Module):
    """Self-Classifier's projection MLP and bias-free linear classifier heads.

    ``Linear → BatchNorm1d → LeakyReLU`` ``num_layers`` times (``in_dim → hidden_dim``, then
    ``hidden_dim → hidden_dim``), a final ``Linear → out_dim``, L2 normalisation, and one
    bias-free ``Linear(out_dim, C)`` per entry of ``num_classes``. ``fixed_heads`` freezes the
    heads at their initialisation (the reference's ``--fixed-cls``).

    ``forward(x)`` with x (B, in_dim[, H, W]) returns a list of (B, C_h) logits, one per head,
    ready for :class:`~clusterlearn.adapters.torch.SelfClassifierLoss` as
    ``[[h(view) for view in views] for h in heads]``.
    """

    def __init__(
        self,
        in_dim: int = 2048,
        hidden_dim: int = 4096,
        out_dim: int = 128,
        num_classes: Sequence[int] = (1000, 2000, 4000, 8000),
        *,
        num_layers: int = 3,
        fixed_heads: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not num_classes or any(int(c) < 2 for c in num_classes):
            raise ValueError(f"num_classes must be a non-empty list of class counts >= 2, got {list(num_classes)}")
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [
                nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.LeakyReLU(inplace=True),
            ]
        self.projection = nn.Sequential(*layers, nn.Linear(hidden_dim, out_dim))
        self.heads = nn.ModuleList(nn.Linear(out_dim, int(c), bias=False) for c in num_classes)
        if fixed_heads:
            self.heads.requires_grad_(False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, out_dim) L2-normalised projection."""
        return F.normalize(self.projection(_pool(x)), dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.embed(x)
        return [head(z) for head in self.heads]
