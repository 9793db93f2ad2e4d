"""Shared parts of the JAX training examples (ODC, Self-Classifier): mesh, data, augmentations, checkpoints.

- :func:`make_mesh`: a 1-D ``jax.sharding.Mesh`` over all local devices, axis ``"data"``;
  batches are sharded along it (:func:`shard_batch`), parameters and memories replicated
  (:func:`replicate`). Under ``jit`` the global batch is one array: BatchNorm statistics and
  the losses see the whole global batch, whatever the number of devices.
- :class:`Images`: fixed-size square uint8 *base* images on the host (the short side resized
  to 8/7 of the resolution, centre-cropped; the demo data is prepared once, ImageFolder files
  are decoded by ``--workers`` threads, one batch ahead).
- :class:`ViewSpec` and :func:`augment`: the augmentations, in JAX on the devices, fused into
  the training step: random resized crop (separable antialiased bilinear resampling as two
  small matrix products) with a horizontal flip, a small random rotation (nearest neighbour,
  as torchvision's ``RandomRotation``), colour jitter (brightness, contrast, saturation, and
  hue as a rotation in YIQ space, a cheap stand-in for torchvision's HSV shift; fixed order),
  random grey, Gaussian blur (separable), solarisation.
  :func:`center_crop` is the evaluation view (torchvision's resize to 8/7 + centre crop).
- :func:`init_model`: an NNX model, initialised in one compiled program, as train/eval ``GraphDef``\\ s (static, hashable, equal for
  equal architectures, so ``jit`` caches hit across runs in one process) and plain nested
  dicts of parameters and BatchNorm statistics.
- :class:`Evaluation`: the frozen backbone's pooled features on centre crops (BatchNorm in
  inference mode), scored by :class:`runs.Evaluator`, and the random-network / raw-pixel baselines.
- Checkpoints: one ``.npz`` of plain arrays (flattened pytrees under ``/``-joined key paths,
  the run's settings as a JSON string), written atomically (temporary file + ``os.replace``)
  and read back with ``allow_pickle=False``.

Single process only (no ``jax.distributed``); the devices of that process form the mesh.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

import flax_resnet
import runs

AXIS = "data"
ARCHS = ("resnet18", "resnet50")
WORKERS_HELP = "threads decoding ImageFolder images (the demo data is prepared once in memory)"


# ---------------------------------------------------------------------------- command line
def add_arguments(parser: runs.PresetParser) -> None:
    """The options every JAX example shares: :func:`runs.add_common_arguments` (with this module's
    architectures), the network's ``--width`` and the augmentations' ``--flip`` / ``--colour``."""
    runs.add_common_arguments(parser, ARCHS, workers_help=WORKERS_HELP)
    parser.add_preset("--width", type=runs.positive_int, help="channels of the ResNet's first stage")
    parser.add_preset("--flip", action=argparse.BooleanOptionalAction,
                      help="random horizontal flips (off for digits: a flip changes what they show)")
    parser.add_preset("--colour", action=argparse.BooleanOptionalAction,
                      help="saturation/hue jitter and random greyscale of ODC and Self-Classifier (DeepCluster has none; "
                      "no-ops on grey images)")


# ---------------------------------------------------------------------------- devices
def make_mesh() -> Mesh:
    """A 1-D mesh of all local devices along :data:`AXIS` (data parallelism)."""
    return Mesh(np.asarray(jax.local_devices()), (AXIS,))


def describe(mesh: Mesh) -> str:
    """``"2 device(s) (cpu)"``."""
    return f"{mesh.size} device(s) ({mesh.devices.flat[0].platform})"


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree``'s arrays placed, whole, on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host batch split along its first axis over the devices (each gets B / devices rows)."""
    return jax.device_put(x, NamedSharding(mesh, P(AXIS)))


# ---------------------------------------------------------------------------- model
def backbone(arch: str, width: int, small_input: bool, rngs: nnx.Rngs) -> flax_resnet.ResNet:
    """A randomly initialised ResNet of ``examples/flax_resnet.py`` returning pooled features."""
    make = {"resnet18": flax_resnet.resnet18, "resnet50": flax_resnet.resnet50}[arch]
    return make(rngs=rngs, num_classes=None, width=width, small_input=small_input)


def small_input(resolution: int) -> bool:
    """Whether the 3×3 stride-1 stem (no max-pool) suits crops of ``resolution`` (≤ 32 pixels)."""
    return resolution <= 32


def init_model(cls: type[nnx.Module], args: tuple, key: jax.Array) -> tuple[nnx.GraphDef, nnx.GraphDef, dict, dict]:
    """Build ``cls(*args, rngs=nnx.Rngs(key))``: (train graphdef, eval graphdef, parameters, BatchNorm statistics).

    The initialisers run in one compiled program (eager NNX construction compiles every
    initialiser separately: tens of seconds for a ResNet on a CPU). The states are plain
    nested dicts of arrays (``nnx.to_pure_dict``); rebuild the module inside a traced function
    with ``nnx.merge(graphdef, params, stats)``. The graphdefs are hashable and equal for equal
    ``cls`` and ``args``: pass them to ``jit`` as static arguments.
    """
    abstract = nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0)))
    abstract.eval()
    eval_def = nnx.split(abstract, nnx.Param, ...)[0]
    abstract.train()
    train_def = nnx.split(abstract, nnx.Param, ...)[0]
    params, stats = _init(cls, args, key)
    return train_def, eval_def, params, stats


# Initialisers need no optimised code: unoptimised compilation is several times faster on a CPU.
@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options={"xla_backend_optimization_level": 0})
def _init(cls: type[nnx.Module], args: tuple, key: jax.Array) -> tuple[dict, dict]:
    _, params, stats = nnx.split(cls(*args, rngs=nnx.Rngs(key)), nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def merged_stats(model: nnx.Module) -> dict:
    """The non-parameter state of a model merged inside a traced function, as a plain dict."""
    return nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])


def count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------- data
def base_size(resolution: int) -> int:
    """Side of the host's base images: 8/7 of the crop (256 for 224), as the evaluation resize."""
    return round(resolution * 8 / 7)


class Images:
    """Square uint8 base images of ``size``² by dataset index, for a data set.

    Array data (the demo) is prepared once; files are decoded on demand by ``workers``
    threads (PIL releases the GIL while decoding and resizing).
    """

    def __init__(self, data: runs.ImageData, size: int, workers: int) -> None:
        self.data, self.size = data, size
        self.cache = None
        if isinstance(data.images, np.ndarray):
            self.cache = np.stack([runs.square_image(Image.fromarray(im), size) for im in data.images])
        self.pool = ThreadPoolExecutor(workers) if workers > 0 and self.cache is None else None

    def __len__(self) -> int:
        return len(self.data)

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        """(B, size, size, 3) uint8 images at ``indices``."""
        if self.cache is not None:
            return self.cache[indices]
        load = lambda i: runs.square_image(self.data.image(int(i)), self.size)  # noqa: E731
        loaded = self.pool.map(load, indices) if self.pool is not None else map(load, indices)
        return np.stack(list(loaded))

    def batches(self, order: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(indices, images)`` for each row of ``order`` (steps, B), the next batch loading meanwhile."""
        with ThreadPoolExecutor(1) as ahead:
            pending: Future | None = ahead.submit(self, order[0]) if len(order) else None
            for step in range(len(order)):
                images = pending.result()
                pending = ahead.submit(self, order[step + 1]) if step + 1 < len(order) else None
                yield order[step], images

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def extract(fn: Callable[[jax.Array], jax.Array], images: Images, batch_size: int, mesh: Mesh,
            show: bool, desc: str) -> np.ndarray:
    """``fn`` over all images in dataset order, batch by batch (the last one padded), on the host."""
    n = len(images)
    order = np.arange(-(-n // batch_size) * batch_size).clip(max=n - 1).reshape(-1, batch_size)
    outs = [np.asarray(fn(shard_batch(x, mesh))) for _, x in runs.progress(images.batches(order), show, desc, len(order))]
    return np.concatenate(outs)[:n]


# ---------------------------------------------------------------------------- evaluation
@functools.partial(jax.jit, static_argnames=("graphdef", "resolution"))
def pooled_features(params: dict, stats: dict, images: jax.Array, *, graphdef: nnx.GraphDef, resolution: int) -> jax.Array:
    """(B, D) pooled backbone features of centre crops (the model's ``backbone`` attribute, before
    any neck or projection), BatchNorm in inference mode (``graphdef``: the eval one)."""
    return nnx.merge(graphdef, params, stats).backbone(center_crop(images, resolution))


@functools.partial(jax.jit, static_argnames=("resolution",))
def flat_pixels(images: jax.Array, *, resolution: int) -> jax.Array:
    """(B, 3·resolution²) flattened normalised centre crops: the raw-pixel baseline's features."""
    x = center_crop(images, resolution)
    return x.reshape(x.shape[0], -1)


class Evaluation:
    """The frozen-feature evaluation of a run (see :class:`runs.Evaluator`).

    Parameters
    ----------
    directory : the run directory
    data, args : the run's data and options (``--seed``, ``--resolution``, ``--batch-size``, ``--progress``)
    images : the run's :class:`Images`
    mesh : the device mesh (features are extracted with the batch sharded over it)
    write : whether ``split.npz`` and ``baselines.json`` are written (False for ``--eval-only``)
    """

    def __init__(self, directory: Path, data: runs.ImageData, args: argparse.Namespace, images: Images, mesh: Mesh,
                 write: bool) -> None:
        self.scorer = runs.Evaluator(directory, data.targets, args.seed, write)
        self.images, self.mesh, self.batch_size = images, mesh, args.batch_size
        self.resolution, self.show = args.resolution, args.progress
        self.pixels = runs.pixel_baseline_affordable(len(data), args.resolution)

    def _extract(self, fn: Callable[[jax.Array], jax.Array]) -> np.ndarray:
        return extract(fn, self.images, self.batch_size, self.mesh, self.show, "evaluation")

    def __call__(self, graphdef: nnx.GraphDef, params: dict, stats: dict) -> dict[str, Any]:
        """:meth:`runs.Evaluator.evaluate` of the backbone's pooled features (``graphdef``: eval mode)."""
        fn = functools.partial(pooled_features, params, stats, graphdef=graphdef, resolution=self.resolution)
        return self.scorer.evaluate(self._extract(fn))

    def baselines(self, graphdef: nnx.GraphDef, params: dict, stats: dict, fresh: bool) -> dict[str, Any]:
        """The run's baselines: read from the run directory unless ``fresh`` (a new run) or
        missing there, else computed from ``params``/``stats``, which must still be the random
        initialisation, and the flattened centre crops."""
        stored = None if fresh else self.scorer.load_baselines()
        if stored is not None:
            print(f"baselines read from {self.scorer.directory / runs.BASELINES_FILE}", flush=True)
            return stored
        params, stats = replicate((params, stats), self.mesh)
        random_net = self._extract(functools.partial(pooled_features, params, stats, graphdef=graphdef,
                                                     resolution=self.resolution))
        pixels = self._extract(functools.partial(flat_pixels, resolution=self.resolution)) if self.pixels else None
        return self.scorer.make_baselines(random_net, pixels)


# ---------------------------------------------------------------------------- augmentations
_MEAN = np.asarray(runs.IMAGENET_MEAN, np.float32)
_STD = np.asarray(runs.IMAGENET_STD, np.float32)
_RGB_TO_YIQ = np.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view (hashable: a static argument of ``jit``).

    size : output side in pixels; scale, ratio : area fraction and aspect range of the crop;
    flip : whether half the views are mirrored horizontally;
    rotation : the largest rotation in degrees (the angle uniform in ±rotation, 0: none);
    jitter : (brightness, contrast, saturation, hue) strengths, applied with ``jitter_p``;
    gray_p, blur_p, solarize_p : probabilities of grey, Gaussian blur (σ in [0.1, 2]) and
    solarisation (threshold 0.5).
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 0.0
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 1.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rotation) and self.rotation >= 0):
            raise ValueError(f"rotation must be a finite number of degrees >= 0, got {self.rotation!r}")


def _resample(start: jax.Array, length: jax.Array, size: int, source: int, flip: jax.Array) -> jax.Array:
    """(size, source) weights mapping ``source`` pixels to ``size`` samples of [start, start + length).

    Triangle (bilinear) filter widened by the shrink factor (antialiasing, as PIL), rows
    normalised; ``flip`` reverses the output order.
    """
    i = jnp.arange(size, dtype=jnp.float32)
    i = jnp.where(flip, size - 1 - i, i)
    centre = start + (i + 0.5) * length / size - 0.5
    support = jnp.maximum(length / size, 1.0)
    w = jnp.maximum(0.0, 1.0 - jnp.abs(centre[:, None] - jnp.arange(source, dtype=jnp.float32)[None, :]) / support)
    return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-12)


def _rotate(x: jax.Array, angle: jax.Array) -> jax.Array:
    """(H, W, C) image ``x`` rotated by ``angle`` degrees counter-clockwise about its centre.

    torchvision's ``rotate`` of a PIL image (what ``RandomRotation`` does by default): each
    output pixel centre is rotated back into ``x`` and takes the pixel it falls in (nearest
    neighbour); those falling outside are 0. The output has the input's shape.
    """
    h, w = x.shape[:2]
    theta = jnp.deg2rad(angle)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    dy = (jnp.arange(h, dtype=jnp.float32) + 0.5 - h / 2)[:, None]
    dx = (jnp.arange(w, dtype=jnp.float32) + 0.5 - w / 2)[None, :]
    col = jnp.floor(cos * dx - sin * dy + w / 2).astype(jnp.int32)
    row = jnp.floor(sin * dx + cos * dy + h / 2).astype(jnp.int32)
    inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    pixels = x[jnp.clip(row, 0, h - 1), jnp.clip(col, 0, w - 1)]
    return jnp.where(inside[..., None], pixels, jnp.zeros((), x.dtype))


def _gray(x: jax.Array) -> jax.Array:
    return x @ jnp.asarray([0.299, 0.587, 0.114], x.dtype)


def _jitter(key: jax.Array, x: jax.Array, strengths: tuple[float, float, float, float]) -> jax.Array:
    """Brightness, contrast, saturation and hue (YIQ rotation) of an image in [0, 1]."""
    b, c, s, h = strengths
    kb, kc, ks, kh = jax.random.split(key, 4)
    u = lambda k, lo, hi: jax.random.uniform(k, (), minval=lo, maxval=hi)  # noqa: E731
    if b:
        x = jnp.clip(x * u(kb, max(0.0, 1 - b), 1 + b), 0, 1)
    if c:
        m = jnp.mean(_gray(x))
        x = jnp.clip((x - m) * u(kc, max(0.0, 1 - c), 1 + c) + m, 0, 1)
    if s:
        g = _gray(x)[..., None]
        x = jnp.clip((x - g) * u(ks, max(0.0, 1 - s), 1 + s) + g, 0, 1)
    if h:
        angle = 2 * jnp.pi * u(kh, -h, h)
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        rot = jnp.asarray([[1, 0, 0], [0, 1, 0], [0, 0, 1]], x.dtype)
        rot = rot.at[1, 1].set(cos).at[1, 2].set(-sin).at[2, 1].set(sin).at[2, 2].set(cos)
        m = jnp.asarray(_YIQ_TO_RGB) @ rot @ jnp.asarray(_RGB_TO_YIQ)
        x = jnp.clip(x @ m.T, 0, 1)
    return x


def _blur_matrix(sigma: jax.Array, size: int) -> jax.Array:
    """(size, size) Gaussian smoothing with a kernel of about a tenth of the image (odd, ≥ 3)."""
    radius = max(3, int(0.1 * size) // 2 * 2 + 1) // 2
    d = jnp.arange(size, dtype=jnp.float32)
    d = d[:, None] - d[None, :]
    w = jnp.where(jnp.abs(d) <= radius, jnp.exp(-0.5 * (d / sigma) ** 2), 0.0)
    return w / jnp.sum(w, axis=1, keepdims=True)


def _augment_one(key: jax.Array, image: jax.Array, spec: ViewSpec) -> jax.Array:
    """One view of one (S, S, 3) uint8 image: (size, size, 3) float32, ImageNet-normalised."""
    source = image.shape[0]
    k = jax.random.split(key, 10)
    area = source * source * jax.random.uniform(k[0], (), minval=spec.scale[0], maxval=spec.scale[1])
    log_ratio = jax.random.uniform(k[1], (), minval=np.log(spec.ratio[0]), maxval=np.log(spec.ratio[1]))
    w = jnp.clip(jnp.sqrt(area * jnp.exp(log_ratio)), 1.0, source)
    h = jnp.clip(jnp.sqrt(area / jnp.exp(log_ratio)), 1.0, source)
    x0 = jax.random.uniform(k[2], ()) * (source - w)
    y0 = jax.random.uniform(k[3], ()) * (source - h)
    flip = jax.random.bernoulli(k[4]) if spec.flip else jnp.asarray(False)
    rows = _resample(y0, h, spec.size, source, jnp.asarray(False))
    cols = _resample(x0, w, spec.size, source, flip)
    x = jnp.einsum("ik,klc,jl->ijc", rows, image.astype(jnp.float32) / 255.0, cols)
    if spec.rotation:
        angle = jax.random.uniform(jax.random.fold_in(key, 10), (), minval=-spec.rotation, maxval=spec.rotation)
        x = _rotate(x, angle)
    if any(spec.jitter) and spec.jitter_p > 0:
        x = jnp.where(jax.random.bernoulli(k[5], spec.jitter_p), _jitter(k[6], x, spec.jitter), x)
    if spec.gray_p > 0:
        x = jnp.where(jax.random.bernoulli(k[7], spec.gray_p), jnp.repeat(_gray(x)[..., None], 3, axis=-1), x)
    if spec.blur_p > 0:
        kb, ks = jax.random.split(k[8])
        g = _blur_matrix(jax.random.uniform(ks, (), minval=0.1, maxval=2.0), spec.size)
        x = jnp.where(jax.random.bernoulli(kb, spec.blur_p), jnp.einsum("ik,klc,jl->ijc", g, x, g), x)
    if spec.solarize_p > 0:
        x = jnp.where(jax.random.bernoulli(k[9], spec.solarize_p), jnp.where(x >= 0.5, 1.0 - x, x), x)
    return (x - _MEAN) / _STD


def with_options(spec: ViewSpec, *, flip: bool, colour: bool) -> ViewSpec:
    """``spec`` under ``--flip`` / ``--colour``: ``flip=False`` drops the flip, ``colour=False`` keeps
    only brightness and contrast jitter (no saturation, hue or grey), as the PyTorch examples."""
    if colour:
        return replace(spec, flip=flip)
    return replace(spec, flip=flip, jitter=(*spec.jitter[:2], 0.0, 0.0), gray_p=0.0)


def augment(key: jax.Array, images: jax.Array, spec: ViewSpec) -> jax.Array:
    """(B, size, size, 3) augmented views of (B, S, S, 3) uint8 images, one key per image."""
    return jax.vmap(_augment_one, in_axes=(0, 0, None))(jax.random.split(key, images.shape[0]), images, spec)


def center_crop(images: jax.Array, size: int) -> jax.Array:
    """(B, size, size, 3) normalised centre crops of (B, S, S, 3) uint8 base images."""
    top = (images.shape[1] - size) // 2
    left = (images.shape[2] - size) // 2
    x = images[:, top:top + size, left:left + size].astype(jnp.float32) / 255.0
    return (x - _MEAN) / _STD


def step_key(key: jax.Array, epoch: int, step: int) -> jax.Array:
    """The key of one training step: a function of the run's key, the epoch and the step only."""
    return jax.random.fold_in(jax.random.fold_in(key, epoch), step)


# ---------------------------------------------------------------------------- checkpoints
CHECKPOINT = "checkpoint.npz"


def _name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    """``{prefix/key/path: host array}`` for every leaf of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {f"{prefix}/{_name(path)}": np.asarray(leaf) for path, leaf in leaves}


def unflatten(prefix: str, template: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``template``'s structure with its leaves read from ``arrays`` (shapes and dtypes checked)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, leaf in leaves:
        name = f"{prefix}/{_name(path)}"
        if name not in arrays:
            raise runs.CheckpointError(f"it has no {name} entry")
        value = arrays[name]
        if value.shape != tuple(leaf.shape) or value.dtype != np.dtype(leaf.dtype):
            raise runs.CheckpointError(f"its {name} is {value.dtype}{list(value.shape)} in the checkpoint, {np.dtype(leaf.dtype)}"
                             f"{list(leaf.shape)} in this run")
        out.append(value)
    extra = [k for k in arrays if k.startswith(prefix + "/") and k not in {f"{prefix}/{_name(p)}" for p, _ in leaves}]
    if extra:
        raise runs.CheckpointError(f"it has entries this run does not know: {extra[:3]}")
    return jax.tree_util.tree_unflatten(treedef, out)


def save_checkpoint(path: Path, arrays: dict[str, np.ndarray], args: argparse.Namespace, epoch: int) -> None:
    """Write ``arrays`` with the run's settings and ``epoch`` to ``path`` (``np.savez``, atomically)."""
    extra = {"epoch": np.asarray(epoch, np.int64), "args": np.asarray(json.dumps(runs.args_record(args)))}
    runs.atomic_write(path, lambda f: np.savez(f, **arrays, **extra))


def launch(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    min_images: int,
    run: Callable[[argparse.Namespace, runs.ImageData, dict[str, np.ndarray] | None, Mesh], None],
    required: Sequence[str] = (),
) -> None:
    """Open the data, the device mesh and the ``--resume`` checkpoint (one-line errors for bad
    options, a batch that does not split over the devices), then ``run(args, data, ckpt, mesh)``.

    ``required``: checkpoint entries the script reads besides ``rng/key`` and those
    :func:`unflatten` checks. A checkpoint ``run`` cannot restore (:class:`runs.CheckpointError`)
    or an unreadable image file (:class:`runs.ImageError`) ends in one line and exit code 2.
    """
    runs.check_eval_only(parser, args)
    data = runs.open_data(parser, args, min_images)
    mesh = make_mesh()
    runs.check_batch_size(parser, args.batch_size, mesh.size, "devices", len(data))
    ckpt = load_checkpoint(parser, args, required)
    try:
        run(args, data, ckpt, mesh)
    except runs.CheckpointError as err:
        runs.fail(parser, f"{_checkpoint_flag(args)}: {runs.checkpoint_path(args)}: {err}")
    except runs.ImageError as err:
        runs.fail(parser, f"--data: {runs.image_error_line(err)}")


def _checkpoint_flag(args: argparse.Namespace) -> str:
    return "--eval-only" if args.eval_only is not None else "--resume"


def load_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    required: Sequence[str] = ()) -> dict[str, np.ndarray] | None:
    """The ``--resume`` (or ``--eval-only``) checkpoint's arrays (``epoch`` included), or None
    without either.

    :func:`runs.fail` (one line, exit code 2) if it is missing, unreadable, lacks ``epoch``,
    ``args``, ``rng/key`` or a ``required`` entry, has nothing left to train (``--resume``
    only), or was trained with other settings. Loads without unpickling (``allow_pickle=False``).
    """
    path, flag = runs.checkpoint_path(args), _checkpoint_flag(args)
    if path is None:
        return None
    if not path.is_file():
        runs.fail(parser, f"{flag}: no checkpoint file {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        saved = json.loads(str(arrays.pop("args"))) if "args" in arrays else None
    except Exception as err:  # zip, format and JSON errors have many types
        runs.fail(parser, f"{flag}: cannot load {path}: {runs.error_line(err)}")
    missing = [k for k in ("epoch", "rng/key", *required) if k not in arrays] + (["args"] if saved is None else [])
    if missing:
        runs.fail(parser, f"{flag}: {path}: it has no {', '.join(missing)} entr{'ies' if len(missing) > 1 else 'y'}")
    epoch = arrays["epoch"]
    epoch = epoch.item() if epoch.shape == () and epoch.dtype.kind in "iu" else epoch
    try:
        arrays["epoch"] = runs.check_resume(saved, epoch, args)
    except runs.CheckpointError as err:
        runs.fail(parser, f"{flag}: {path}: {err}")
    return arrays


def restore_training(ckpt: dict[str, np.ndarray], params: dict, stats: dict, opt_state: Any) -> tuple[dict, dict, Any]:
    """The model's parameters and BatchNorm statistics and the optimiser state from ``ckpt``, in the
    structure of the given (freshly initialised) ones; a ``runs.CheckpointError`` naming the entry
    (``params``, ``stats`` or ``opt``) that does not fit this run."""
    restored = []
    for prefix, tree in (("params", params), ("stats", stats), ("opt", opt_state)):
        with runs.restoring(prefix):
            restored.append(unflatten(prefix, tree, ckpt))
    return tuple(restored)


def key_data(key: jax.Array) -> np.ndarray:
    """The raw uint32 words of a typed PRNG key (for the checkpoint)."""
    return np.asarray(jax.random.key_data(key))


def key_from_data(data: np.ndarray) -> jax.Array:
    """The typed PRNG key of :func:`key_data`'s words."""
    return jax.random.wrap_key_data(jnp.asarray(data, dtype=jnp.uint32))
