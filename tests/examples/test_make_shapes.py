"""``benchmarks/make_shapes.py``: the seeded procedural second data set (grey 28×28 shapes, ImageFolder)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def make_shapes():
    spec = importlib.util.spec_from_file_location("make_shapes", ROOT / "benchmarks" / "make_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_tree(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(Image.open(p)) for p in sorted(root.rglob("*.png"))}


def test_the_tree_is_seeded_grey_28px_and_in_imagefolder_layout(tmp_path: Path) -> None:
    shapes = make_shapes()
    shapes.write_tree(tmp_path / "a", 2, seed=0)
    shapes.write_tree(tmp_path / "b", 2, seed=0)
    shapes.write_tree(tmp_path / "c", 2, seed=1)
    a, b, c = (read_tree(tmp_path / name) for name in "abc")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(shapes.CLASSES) and len(shapes.CLASSES) == 10
    assert len(a) == 20 and all(im.shape == (28, 28) and im.dtype == np.uint8 for im in a.values())
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # the same seed, the same files
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    assert not list(tmp_path.glob(".*"))  # built aside and renamed: nothing left behind
    with pytest.raises(FileExistsError):
        shapes.write_tree(tmp_path / "a", 2, seed=0)


def test_classes_differ_in_what_they_draw() -> None:
    shapes = make_shapes()
    ink = {name: shapes.render(name, 64, np.random.default_rng(0)).astype(np.float64).mean() for name in ("ring", "disk")}
    assert ink["disk"] > ink["ring"]  # a filled circle covers more than its outline, at the same poses and greys
