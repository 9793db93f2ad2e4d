"""A second small labelled image set, drawn procedurally: grey 28×28 shapes of 10 classes.

The digits are the only labelled data the project ships; a recipe tuned on them alone may not
hold elsewhere. This script draws ``--per-class`` images (default 200, so 2,000 in all) of
each of ten classes into an ImageFolder tree (``OUT/<class>/<index>.png``, 8-bit grey PNG)
that every example reads through ``--data``. Nothing is downloaded.

Classes: ``ring`` (circle outline), ``disk`` (filled circle), ``square`` (outline),
``triangle`` (equilateral, outline), ``plus`` (two crossing bars), ``bar`` (one bar),
``star`` (filled, five points), ``ellipse`` (outline, aspect 0.4-0.65), ``twobars``
(two parallel bars), ``dots`` (three discs at the corners of a triangle).

Every image varies: centre (up to ±4 px), size (a factor 0.55-1), rotation (uniform),
stroke width (1.3-3.2 px), background grey (0-0.3), foreground grey (0.6-1), additive
Gaussian noise (σ 0.03-0.15), all drawn from one seeded generator, so the same seed writes
the same files. Each shape is drawn as a signed distance field on a 4×-supersampled grid and
box-filtered down (anti-aliased edges). Random position, size and rotation are what make
raw pixels a weak representation here (k-means of the pixels does not recover the classes),
while the classes stay distinct to the eye.

Run: ``python benchmarks/make_shapes.py /tmp/shapes28 [--per-class 200 --seed 0]``; it prints
the raw pixels' scores under the examples' evaluation protocol (the fixed split; k-NN, linear
probe, k-means NMI/ACC).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 28
SUPER = 4  # supersampling factor of the anti-aliased rendering
#: The classes, in the order of their folders (sorted names are the ImageFolder class indices).
CLASSES = ("bar", "disk", "dots", "ellipse", "plus", "ring", "square", "star", "triangle", "twobars")

Sdf = Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray]], np.ndarray]


def _box(x: np.ndarray, y: np.ndarray, hx: np.ndarray, hy: np.ndarray) -> np.ndarray:
    """Signed distance to an axis-aligned box of half-sizes ``hx``, ``hy`` centred at 0."""
    qx, qy = np.abs(x) - hx, np.abs(y) - hy
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _circle(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.hypot(x, y) - r


def _triangle(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance to an equilateral triangle with circumradius ``r`` (a vertex pointing up)."""
    # The distance to the three edges' lines: the max over the edges' outward normals, minus the
    # inradius (r / 2). Exact inside and along the edges, which is where the outline is drawn.
    angles = np.pi / 2 + np.array([np.pi / 3, np.pi, 5 * np.pi / 3])  # normals point away from vertices
    d = np.stack([x * np.cos(a) + y * np.sin(a) for a in angles])
    return d.max(axis=0) - r / 2


def _star(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """A filled five-pointed star of outer radius ``r`` (radial distance, inner radius 0.45 r)."""
    theta = np.arctan2(y, x)
    wave = 0.5 + 0.5 * np.cos(5 * theta)  # 1 at the points, 0 between them
    return np.hypot(x, y) - r * (0.45 + 0.55 * wave**2)


def _stroke(d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """An outline of width ``w`` along the zero set of ``d``."""
    return np.abs(d) - w / 2


# Each shape: signed distance (< 0 inside the ink) of frame coordinates (x, y), in units of the
# image's half-size times its scale, with per-image parameters p (arrays broadcast against x).
SHAPES: dict[str, Sdf] = {
    "ring": lambda x, y, p: _stroke(_circle(x, y, 0.8), p["w"]),
    "disk": lambda x, y, p: _circle(x, y, 0.7),
    "square": lambda x, y, p: _stroke(_box(x, y, 0.65, 0.65), p["w"]),
    "triangle": lambda x, y, p: _stroke(_triangle(x, y, 0.9), p["w"]),
    "plus": lambda x, y, p: np.minimum(_box(x, y, 0.85, p["w"] / 2), _box(x, y, p["w"] / 2, 0.85)),
    "bar": lambda x, y, p: _box(x, y, 0.9, p["w"] / 2),
    "star": lambda x, y, p: _star(x, y, 0.95),
    "ellipse": lambda x, y, p: _stroke((np.hypot(x / 0.85, y / (0.85 * p["aspect"])) - 1) * 0.85 * p["aspect"], p["w"]),
    "twobars": lambda x, y, p: np.minimum(_box(x, y - 0.35, 0.85, p["w"] / 2), _box(x, y + 0.35, 0.85, p["w"] / 2)),
    "dots": lambda x, y, p: np.min(np.stack([_circle(x - 0.62 * np.cos(a), y - 0.62 * np.sin(a), 0.22)
                                             for a in np.pi / 2 + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])]), axis=0),
}


def render(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 28, 28) uint8 grey images of ``shape`` with random pose, stroke, greys and noise."""
    s = SIZE * SUPER
    grid = (np.arange(s) + 0.5) / SUPER - SIZE / 2  # pixel centres, in pixels from the image centre
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    col = lambda v: v[:, None, None]  # noqa: E731  (one value per image, broadcast over the grid)
    cx, cy = col(rng.uniform(-4, 4, n)), col(rng.uniform(-4, 4, n))
    scale = col(rng.uniform(0.55, 1.0, n)) * (SIZE / 2 - 1)  # pixels per frame unit
    angle = col(rng.uniform(0, 2 * np.pi, n))
    width_px = col(rng.uniform(1.3, 3.2, n))
    params = {"w": width_px / scale, "aspect": col(rng.uniform(0.4, 0.65, n))}
    dx, dy = gx[None] - cx, gy[None] - cy
    x = (dx * np.cos(angle) + dy * np.sin(angle)) / scale
    y = (-dx * np.sin(angle) + dy * np.cos(angle)) / scale
    ink = (SHAPES[shape](x, y, params) < 0).astype(np.float64)
    coverage = ink.reshape(n, SIZE, SUPER, SIZE, SUPER).mean(axis=(2, 4))
    background, foreground = col(rng.uniform(0.0, 0.3, n)), col(rng.uniform(0.6, 1.0, n))
    image = background + (foreground - background) * coverage
    image = image + col(rng.uniform(0.03, 0.15, n)) * rng.standard_normal(image.shape)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def write_tree(out: Path, per_class: int, seed: int) -> None:
    """The ImageFolder tree of all classes under ``out``, built next to it and renamed into place."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for index, shape in enumerate(CLASSES):
            folder = tmp / shape
            folder.mkdir()
            images = render(shape, per_class, np.random.default_rng([seed, index]))
            for i, image in enumerate(images):
                Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pixel_scores(root: Path) -> dict[str, float | None]:
    """The raw pixels of a tree under the examples' evaluation protocol (``runs.Evaluator``)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import runs

    data = runs.image_folder(root)
    pixels = np.stack([np.asarray(data.image(i).convert("L"), dtype=np.float32).ravel() / 255 for i in range(len(data))])
    with tempfile.TemporaryDirectory() as tmp:
        return runs.Evaluator(Path(tmp), data.targets, seed=0, write=False).evaluate(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to create (must not exist)")
    parser.add_argument("--per-class", type=int, default=200, help="images per class (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    parser.add_argument("--no-score", dest="score", action="store_false", help="skip the raw-pixel scores")
    args = parser.parse_args()
    if args.per_class < 1:
        parser.error(f"--per-class must be a positive integer, got {args.per_class}")
    write_tree(args.out, args.per_class, args.seed)
    print(f"wrote {args.per_class * len(CLASSES)} images of {len(CLASSES)} classes to {args.out}")
    if args.score:
        scores = pixel_scores(args.out)
        print("raw pixels: " + "  ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
