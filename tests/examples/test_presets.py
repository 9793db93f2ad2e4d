"""The example scripts' presets (``--preset imagenet|small|demo``, chosen by the data when not
given) and the flags every script shares, PyTorch and JAX alike.

Only the command lines are parsed here (no training), so these tests are cheap.
"""

from __future__ import annotations

import argparse
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
