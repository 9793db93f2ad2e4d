"""ResNet-18/50 in Flax NNX, laid out like torchvision's (ResNet v1.5: stride in the 3×3 conv).

No maintained Flax NNX ResNet package exists, so the JAX examples use this file. Inputs are
NHWC float arrays. ``ResNet(..., num_classes=1000)`` has exactly torchvision's parameter count
(25,557,032 for ResNet-50); ``num_classes=None`` returns the (B, 512·expansion) pooled
features that the methods' necks and heads take. ``width`` scales every stage (a small
network for the CPU demo) and ``small_input=True`` swaps the 7×7/2 stem and max-pool for a
3×3/1 stem (images of 32 pixels or fewer). :func:`linear` is an ``nnx.Linear`` initialised as
``torch.nn.Linear`` (the final layer here, and the JAX examples' necks, projections and heads).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ResNet", "resnet18", "resnet50", "linear", "count_params"]

_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming, as torchvision


def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=k // 2, use_bias=False,
                    kernel_init=_conv_init, rngs=rngs)


def linear(cin: int, cout: int, *, use_bias: bool = True, rngs: nnx.Rngs) -> nnx.Linear:
    """``nnx.Linear(cin, cout)`` (float32 kernel (cin, cout), bias (cout,)) initialised as
    ``torch.nn.Linear``: kernel and bias uniform in ±1/√cin (torch's kaiming-uniform with a = √5
    and its bias rule), not flax's lecun-normal kernel (√3 times torch's standard deviation) and
    zero bias."""
    bound = 1.0 / cin**0.5

    def uniform(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(cin, cout, use_bias=use_bias, kernel_init=uniform, bias_init=uniform, rngs=rngs)


def _bn(c: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)  # torch's momentum 0.1


class Block(nnx.Module):
    """Basic (two 3×3) or bottleneck (1×1, 3×3 with the stride, 1×1 ×4) residual block."""

    def __init__(self, cin: int, planes: int, stride: int, bottleneck: bool, rngs: nnx.Rngs) -> None:
        self.expansion = 4 if bottleneck else 1
        cout = planes * self.expansion
        if bottleneck:
            self.layers = nnx.List([
                _conv(cin, planes, 1, 1, rngs), _bn(planes, rngs),
                _conv(planes, planes, 3, stride, rngs), _bn(planes, rngs),
                _conv(planes, cout, 1, 1, rngs), _bn(cout, rngs),
            ])
        else:
            self.layers = nnx.List([
                _conv(cin, planes, 3, stride, rngs), _bn(planes, rngs),
                _conv(planes, cout, 3, 1, rngs), _bn(cout, rngs),
            ])
        self.shortcut = (
            nnx.Sequential(_conv(cin, cout, 1, stride, rngs), _bn(cout, rngs)) if stride != 1 or cin != cout else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        for i in range(0, len(self.layers), 2):
            y = self.layers[i + 1](self.layers[i](y))
            if i + 2 < len(self.layers):
                y = nnx.relu(y)
        return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
    """ResNet with ``blocks`` per stage; (B, H, W, 3) → (B, num_classes) or (B, features).

    Parameters
    ----------
    blocks : blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50
    bottleneck : bottleneck blocks (ResNet-50) or basic blocks (ResNet-18)
    num_classes : size of the final linear layer; None: return the pooled features
    width : channels of the first stage (64 in the papers); the stages double it
    small_input : 3×3 stride-1 stem without max-pool, for small images
    """

    def __init__(
        self,
        blocks: Sequence[int],
        *,
        bottleneck: bool,
        num_classes: int | None = 1000,
        width: int = 64,
        small_input: bool = False,
        rngs: nnx.Rngs,
    ) -> None:
        self.small_input = small_input
        self.stem = _conv(3, width, 3 if small_input else 7, 1 if small_input else 2, rngs)
        self.stem_bn = _bn(width, rngs)
        stages: list[Block] = []
        cin = width
        for s, n in enumerate(blocks):
            for b in range(n):
                block = Block(cin, width * 2**s, 2 if (b == 0 and s > 0) else 1, bottleneck, rngs)
                cin = width * 2**s * block.expansion
                stages.append(block)
        self.blocks = nnx.List(stages)
        self.num_features = cin
        self.fc = linear(cin, num_classes, rngs=rngs) if num_classes is not None else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x)))
        if not self.small_input:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        return x if self.fc is None else self.fc(x)


def resnet18(*, rngs: nnx.Rngs, **kwargs: object) -> ResNet:
    """ResNet-18 (11,689,512 parameters with a 1000-way head)."""
    return ResNet((2, 2, 2, 2), bottleneck=False, rngs=rngs, **kwargs)


def resnet50(*, rngs: nnx.Rngs, **kwargs: object) -> ResNet:
    """ResNet-50 (25,557,032 parameters with a 1000-way head)."""
    return ResNet((3, 4, 6, 3), bottleneck=True, rngs=rngs, **kwargs)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param``; BatchNorm running statistics excluded)."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
