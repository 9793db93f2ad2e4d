"""The example scripts' presets (``--preset imagenet|small|demo``, chosen by the data when not
given) and the flags every script shares, PyTorch and JAX alike.

Only the command lines are parsed here (no training), so these tests are cheap.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from example_runs import script
from PIL import Image

TORCH_SCRIPTS = ("imagenet_odc_torch", "imagenet_deepcluster_torch", "imagenet_selfclassifier_torch")
JAX_SCRIPTS = ("imagenet_odc_jax", "imagenet_deepcluster_jax", "imagenet_selfclassifier_jax")
#: The command line the issue's judge runs every script with on a small ImageFolder set.
JUDGE = ["--arch", "resnet18", "--resolution", "28", "--width", "32", "--clusters", "10", "--workers", "0",
         "--flip", "--no-colour"]


def module(name: str):
    """The script, its framework imported (skipped where it is missing)."""
    if name.endswith("_jax"):
        pytest.importorskip("jax")
        pytest.importorskip("flax")
        pytest.importorskip("optax")
    else:
        pytest.importorskip("torch")
        pytest.importorskip("torchvision")
    return script(name)


def image_tree(root: Path, per_class: int, classes: int = 2) -> Path:
    """``classes`` folders of ``per_class`` tiny PNGs each."""
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((4, 4), 40 * c + i, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_auto_preset_follows_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = script("runs")
    monkeypatch.setattr(runs, "SMALL_DATA_MAX_IMAGES", 6)
    assert runs.auto_preset(None) == "demo"
    assert runs.auto_preset(image_tree(tmp_path / "three", 3)) == "small"  # 6 images: at the limit
    assert runs.auto_preset(image_tree(tmp_path / "four", 4)) == "imagenet"  # 8 images
    (tmp_path / "four" / "c0" / "notes.txt").write_text("not an image")
    assert runs.count_images(tmp_path / "four", 100) == 8
    assert runs.count_images(tmp_path / "four", 5) in (5, 6, 7, 8)  # stops early, at least at the limit
    assert runs.auto_preset(tmp_path / "missing") == "imagenet"  # the run then fails on it with its own message


@pytest.mark.parametrize("name", TORCH_SCRIPTS + JAX_SCRIPTS)
def test_the_judges_command_line_gets_the_small_preset(name: str, tmp_path: Path) -> None:
    mod = module(name)
    data = image_tree(tmp_path / "data", 3)
    _, args = mod.parse_args(["--data", str(data), *JUDGE])
    small = mod.parse_args(["--preset", "small"])[1]  # the same preset without --data
    assert args.preset == "small" == small.preset
    for key, value in vars(small).items():
        if key not in {"data", "preset", "arch", "resolution", "width", "clusters", "workers", "flip", "colour",
                       "classes"}:
            assert getattr(args, key) == value, key
    assert (args.arch, args.resolution, args.width, args.clusters, args.workers) == ("resnet18", 28, 32, 10, 0)
    assert args.flip is True and args.colour is False
    assert args.epochs < mod.parse_args(["--data", str(data), "--preset", "imagenet"])[1].epochs


@pytest.mark.parametrize("name", TORCH_SCRIPTS + JAX_SCRIPTS)
def test_every_preset_is_shown_in_help_and_selectable(name: str, capsys: pytest.CaptureFixture) -> None:
    mod = module(name)
    with pytest.raises(SystemExit):
        mod.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset {imagenet,small,demo}" in text
    assert "--flip, --no-flip" in text and "--colour, --no-colour" in text
    assert "(default by --preset: imagenet " in text and ", small " in text
    epochs = {p: mod.parse_args(["--preset", p])[1].epochs for p in ("imagenet", "small", "demo")}
    assert epochs["imagenet"] > epochs["small"] and mod.parse_args([])[1].preset == "demo"
    assert mod.parse_args(["--preset", "small", "--epochs", "3"])[1].epochs == 3  # a given option wins


def test_a_script_without_its_own_small_preset_gets_the_demo_values_for_generic_data() -> None:
    runs = script("runs")
    presets = {"imagenet": {"epochs": 100, "resolution": 224, "flip": True}, "demo": {"epochs": 20, "resolution": 16,
                                                                                         "flip": False}}
    parser = runs.PresetParser(presets)
    assert parser.presets["small"] == {"eval_every": 5, "epochs": 20, "resolution": 32, "flip": True}
    parser = runs.PresetParser({**presets, "small": {"epochs": 7}})
    assert parser.presets["small"]["epochs"] == 7 and parser.presets["small"]["resolution"] == 32


def test_a_resume_may_name_the_preset_differently() -> None:
    runs = script("runs")
    args = argparse.Namespace(preset="small", lr=0.05)
    assert runs.resume_mismatch({"lr": 0.05}, args) is None  # a checkpoint from before --preset existed
    assert runs.resume_mismatch({"lr": 0.05, "preset": "demo"}, args) is None  # the values decide
    assert "--lr 0.1" in runs.resume_mismatch({"lr": 0.1, "preset": "small"}, args)


@pytest.mark.parametrize("name", ["imagenet_selfclassifier_torch", "imagenet_selfclassifier_jax"])
def test_selfclassifier_clusters_sets_the_scored_head(name: str) -> None:
    mod = module(name)
    assert mod.parse_args(["--clusters", "7"])[1].classes == [7, 14, 28, 56]
    args = mod.parse_args(["--clusters", "7", "--classes", "5,9"])[1]
    assert args.classes == [5, 9] and args.clusters == 5


def test_jax_views_honour_flip_and_colour() -> None:
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    jc = script("jax_common")
    rng = np.random.default_rng(0)
    images = jax.numpy.asarray(rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    whole = jc.ViewSpec(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # the whole image: only the flip varies
    plain = np.asarray(jc.center_crop(images, 8))
    flipped = np.asarray(jc.augment(jax.random.key(0), images, jc.with_options(whole, flip=True, colour=True)))
    kept = np.asarray(jc.augment(jax.random.key(0), images, jc.with_options(whole, flip=False, colour=True)))
    np.testing.assert_allclose(kept, plain, atol=1e-5)
    mirrored = [np.allclose(f, p[:, ::-1], atol=1e-5) for f, p in zip(flipped, plain)]
    assert 0 < sum(mirrored) < len(mirrored)  # about half the views are mirrored
    odc = jc.ViewSpec(8, jitter=(0.4, 0.4, 1.0, 0.5), gray_p=0.2)
    grey = jc.with_options(odc, flip=True, colour=False)
    assert grey.jitter == (0.4, 0.4, 0.0, 0.0) and grey.gray_p == 0.0
    assert jc.with_options(odc, flip=False, colour=True) == jc.ViewSpec(8, flip=False, jitter=odc.jitter, gray_p=0.2)


def jax_views():
    """``jax_common`` (skipped without JAX and flax)."""
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    return script("jax_common")


@pytest.mark.parametrize("size", [7, 8])
def test_jax_rotation_by_right_angles_is_rot90(size: int) -> None:
    # Quarter turns about the centre map pixel centres onto pixel centres (odd sides: the centre
    # is a pixel's; even: a corner's), far from any nearest-neighbour tie: exact. Positive angles
    # turn counter-clockwise as seen (row 0 at the top), as torchvision's and np.rot90's.
    jc = jax_views()
    image = np.random.default_rng(size).random((size, size, 3), dtype=np.float32)
    for angle, quarter_turns in [(0.0, 0), (90.0, 1), (180.0, 2), (-90.0, -1), (270.0, 3)]:
        turned = np.asarray(jc._rotate(image, np.float32(angle)))
        np.testing.assert_array_equal(turned, np.rot90(image, quarter_turns), err_msg=f"{angle}°")


def near_a_pixel_edge(size: int, angle: float, delta: float) -> np.ndarray:
    """(size, size) mask of the output pixels whose exact source position (rotated back, float64)
    lies within ``delta`` of a pixel edge in either coordinate: where nearest neighbour may pick
    either side."""
    theta = np.deg2rad(angle)
    d = np.arange(size) + 0.5 - size / 2
    col = np.cos(theta) * d[None, :] - np.sin(theta) * d[:, None] + size / 2
    row = np.sin(theta) * d[None, :] + np.cos(theta) * d[:, None] + size / 2
    return (np.abs(col - np.round(col)) < delta) | (np.abs(row - np.round(row)) < delta)


@pytest.mark.parametrize("reference", ["tensor", "pil"])
@pytest.mark.parametrize("size", [15, 16, 64])
@pytest.mark.parametrize("angle", [2.0, -2.0, 10.0])
def test_jax_rotation_is_torchvisions(reference: str, size: int, angle: float) -> None:
    # Both sides rotate each output pixel centre back and take the pixel it falls in, 0 outside;
    # they can differ only where that position is within their rounding errors of a pixel edge.
    # Our float32 positions (and torchvision's on tensors, via grid_sample) are a few roundings of
    # terms up to ``size``: off by a few size * 2**-24 each, bounded here by size * 2**-19 for
    # both. PIL (the torch example's path: RandomRotation on PIL images) steps the position in
    # 16.16 fixed point, each coefficient rounded to 2**-17 and added once per column and row:
    # off by up to (1 + x + y) * 2**-17 <= size * 2**-16. Every pixel farther from an edge must
    # agree exactly, and such pixels must be at least 98 % of the image.
    jc = jax_views()
    tf = pytest.importorskip("torchvision.transforms.functional")
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(size).integers(1, 256, (size, size, 3), dtype=np.uint8)  # 0 only outside
    ours = np.asarray(jc._rotate(image.astype(np.float32), np.float32(angle)))
    nearest = tf.InterpolationMode.NEAREST
    if reference == "tensor":
        t = torch.from_numpy(image).permute(2, 0, 1).float()
        theirs = tf.rotate(t, angle, interpolation=nearest, fill=0).permute(1, 2, 0).numpy()
        delta = size * 2.0**-19
    else:
        theirs = np.asarray(tf.rotate(Image.fromarray(image), angle, interpolation=nearest, fill=0), np.float32)
        delta = size * (2.0**-16 + 2.0**-19)
    near = near_a_pixel_edge(size, angle, delta)
    differ = np.any(ours != theirs, axis=-1)
    assert not np.any(differ & ~near), f"{np.sum(differ & ~near)} pixels differ away from a pixel edge"
    assert np.mean(near) <= 0.02
    assert np.any(ours == 0) == (angle == 10.0 or size == 64)  # the corners that fall outside: black
    if abs(angle) <= 2 and size < 30:  # shifts of at most (size - 1) / 2 * (sin 2° + 1 - cos 2°) < 0.5 px
        np.testing.assert_array_equal(ours, image)  # the digits demo's 16 px: no pixel moves


def test_jax_rotation_draws_its_angle_from_its_own_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # The angle comes from fold_in(key, 10), apart from the ten keys of the crop, flip and colour
    # draws: views with a rotation are those without it, turned; and rotation=0 traces no rotation
    # at all, so the views of every other example are bit for bit those from before it existed.
    jc = jax_views()
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    key = jax.random.key(3)
    spec = jc.ViewSpec(8, jitter=(0.4, 0.4, 1.0, 0.5), gray_p=0.5, blur_p=0.5, solarize_p=0.5)

    def never(x, angle):
        raise AssertionError("rotated with rotation=0")

    monkeypatch.setattr(jc, "_rotate", never)
    plain = np.asarray(jc.augment(key, images, spec))
    monkeypatch.setattr(jc, "_rotate", lambda x, angle: x)
    np.testing.assert_array_equal(np.asarray(jc.augment(key, images, replace(spec, rotation=5.0))), plain)
    monkeypatch.setattr(jc, "_rotate", lambda x, angle: jnp.full_like(x, angle))
    views = np.asarray(jc.augment(key, images, jc.ViewSpec(8, rotation=5.0)))  # no colour: the angle comes out
    runs = script("runs")
    angles = views[:, 0, 0, 0] * runs.IMAGENET_STD[0] + runs.IMAGENET_MEAN[0]
    want = [jax.random.uniform(jax.random.fold_in(k, 10), (), minval=-5.0, maxval=5.0)
            for k in jax.random.split(key, len(images))]
    np.testing.assert_allclose(angles, want, atol=1e-5)
    assert np.all(np.abs(angles) <= 5.0) and angles.min() < -2.5 and angles.max() > 2.5


def test_jax_odc_views_rotate_by_two_degrees() -> None:
    jc = jax_views()
    odc = module("imagenet_odc_jax").view(16, 0.5)
    assert odc.rotation == 2.0 and jc.with_options(odc, flip=False, colour=False).rotation == 2.0
    assert jc.ViewSpec(16).rotation == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rotation"):
            jc.ViewSpec(16, rotation=bad)
