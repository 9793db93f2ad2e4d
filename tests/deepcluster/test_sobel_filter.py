"""DeepCluster's Sobel input filter in the torch and JAX examples (``--sobel``) and the presets that use it.

The filter is the paper's: grey level (the mean of the channels), then its horizontal and vertical
Sobel derivatives, in front of a network whose first convolution takes those 2 channels. The
tests build the networks only (no training), so they are cheap.
"""

from __future__ import annotations

import numpy as np
import pytest
from example_runs import script

#: A horizontal ramp of slope 1 (left to right), 3 channels of different offsets, (1, 3, H, W).
RAMP = (np.arange(7, dtype=np.float32)[None, None, None, :] + np.asarray([0.0, 2.0, -1.0], np.float32)[None, :, None, None]
        ) * np.ones((1, 3, 6, 7), np.float32)


def colour_and_grey(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(2, 3, 12, 12) random colour images and their grey versions (the channel mean in every channel)."""
    x = np.random.default_rng(seed).normal(size=(2, 3, 12, 12)).astype(np.float32)
    return x, np.repeat(x.mean(axis=1, keepdims=True), 3, axis=1)


def torch_sobel(x: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    return script("imagenet_deepcluster_torch").Sobel()(torch.from_numpy(x)).numpy()


def jax_sobel(x: np.ndarray) -> np.ndarray:
    """The JAX filter on NCHW input (it takes NHWC), its output as NCHW."""
    jnp = pytest.importorskip("jax.numpy")
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    return np.asarray(script("imagenet_deepcluster_jax").sobel(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("sobel", [torch_sobel, jax_sobel], ids=["torch", "jax"])
def test_sobel_is_the_derivative_of_the_grey_level(sobel) -> None:
    out = sobel(RAMP)
    assert out.shape == (1, 2, 6, 7)
    # cross-correlation with [[1, 0, -1], [2, 0, -2], [1, 0, -1]]: -(1 + 2 + 1) * 2 per unit slope, inside
    np.testing.assert_allclose(out[0, 0, 1:-1, 1:-1], -8.0, rtol=1e-6)
    np.testing.assert_allclose(out[0, 1, 1:-1, 1:-1], 0.0, atol=1e-5)  # no vertical change
    x, grey = colour_and_grey(1)
    np.testing.assert_allclose(sobel(x), sobel(grey), atol=1e-5)  # only the grey level counts
    np.testing.assert_allclose(sobel(x + 3.0)[..., 1:-1, 1:-1], sobel(x)[..., 1:-1, 1:-1], atol=1e-4)  # nor brightness


def test_torch_and_jax_filters_agree() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 9, 11)).astype(np.float32)
    expected = torch_sobel(x)
    np.testing.assert_allclose(jax_sobel(x), expected, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("sobel", [False, True])
def test_torch_network_behind_the_filter_sees_no_colour(sobel: bool) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    mod = script("imagenet_deepcluster_torch")
    torch.manual_seed(0)
    net = mod.DeepClusterNet("resnet18", 5, small_input=True, base_width=4, sobel=sobel).eval()
    x, grey = colour_and_grey(2)
    with torch.no_grad():
        a, b = net.backbone(torch.from_numpy(x)).numpy(), net.backbone(torch.from_numpy(grey)).numpy()
    assert a.shape == (2, 32)
    assert np.allclose(a, b, atol=1e-5 * np.abs(a).max()) == sobel  # without the filter colour changes the features


@pytest.mark.parametrize("sobel", [False, True])
def test_jax_network_behind_the_filter_sees_no_colour(sobel: bool) -> None:
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    from flax import nnx

    mod, jc = script("imagenet_deepcluster_jax"), script("jax_common")
    _, eval_def, params, stats = jc.init_model(mod.DeepClusterNet, ("resnet18", 4, 12, 5, sobel), jax.random.key(0))
    net = nnx.merge(eval_def, params, stats)
    x, grey = colour_and_grey(3)
    a = np.asarray(net.backbone(jax.numpy.asarray(x.transpose(0, 2, 3, 1))))
    b = np.asarray(net.backbone(jax.numpy.asarray(grey.transpose(0, 2, 3, 1))))
    assert a.shape == (2, 32)
    assert np.allclose(a, b, atol=1e-5 * np.abs(a).max()) == sobel


@pytest.mark.parametrize("name", ["imagenet_deepcluster_torch", "imagenet_deepcluster_jax"])
def test_the_small_preset_uses_the_filter_and_a_flag_turns_it_off(name: str) -> None:
    if name.endswith("_jax"):
        pytest.importorskip("flax")
        pytest.importorskip("optax")
    else:
        pytest.importorskip("torchvision")
    mod = script(name)
    assert mod.parse_args(["--preset", "small"])[1].sobel is True
    assert mod.parse_args(["--preset", "small", "--no-sobel"])[1].sobel is False
    assert mod.parse_args(["--preset", "imagenet"])[1].sobel is False  # the ImageNet preset keeps colour
