"""DeepCluster (Caron et al., ECCV 2018) in JAX: a Flax NNX ResNet, optax SGD, all local devices.

ImageNet (the paper's settings are the defaults: k = 10,000, PCA-whitening to 256 + L2,
SGD lr 0.05, momentum 0.9, weight decay 1e-5, batch 256, 500 epochs; ResNet-50 here instead of
the paper's AlexNet, and no Sobel filter unless ``--sobel``)::

    python examples/imagenet_deepcluster_jax.py --data /path/to/imagenet/train

The demo (no --data): scikit-learn's 1797 digits upscaled to 16×16 RGB, a quarter-width
ResNet-18 (width 16, 3×3 stem), no flips and crops of area [0.5, 1] (as the torch demo),
PCA to 32 dimensions, 10 clusters, 40 epochs of batch 64 on the CPU (a few minutes)::

    python examples/imagenet_deepcluster_jax.py

A small ImageFolder tree (at most 20,000 images: ``--preset small``, chosen by default) gets the
demo's settings behind the paper's fixed Sobel filter (``--sobel``: grey level, then its two
derivatives), 15 epochs; without the filter, k-means of the network's features groups images by
their grey levels (the background's brightness) rather than their shapes, and training reinforces that::

    python examples/imagenet_deepcluster_jax.py --data DIR --arch resnet18 --resolution 28 --width 32 --clusters 10 --workers 0 --flip --no-colour

Each epoch: features of the whole data set (the backbone's pooled features of centre crops,
BatchNorm in inference mode, sharded over the mesh), ``clusterlearn.DeepClusterLabeler``
(PCA-whitening + L2 + k-means) on the host, a re-initialised top layer (normal, std 0.01,
zero bias, as the reference) with fresh momentum (cluster ids are permuted between
clusterings), then one epoch of cross-entropy on the pseudo-labels with samples drawn
uniformly over the clusters (``clusterlearn.UniformLabelSampler``). Each iteration is one
jitted step over a mesh of all local devices (batch sharded along "data", parameters
replicated): random resized crop (and flip) on the devices, forward, cross-entropy over the
global batch, an SGD step. Writes ``metrics.jsonl``, ``checkpoint.npz`` (every epoch) and
``summary.png`` to the run directory; ``--resume <dir>/checkpoint.npz`` continues a run
exactly.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jax_common as jc
import runs
import clusterlearn as cl

METHOD = "deepcluster"
TOP = "top"  # the top layer's name in the parameter and optimiser-state trees
TOP_STD = 0.01  # the reference initialises the top layer's weights with N(0, 0.01²), its bias with 0
PRESETS = {
    "imagenet": {"epochs": 500, "batch_size": 256, "arch": "resnet50", "width": 64, "resolution": 224, "workers": 8,
                 "flip": True, "colour": True, "clusters": 10_000, "pca_dim": 256, "lr": 0.05, "min_scale": 0.08,
                 "sobel": False},
    "demo": {"epochs": 40, "batch_size": 64, "arch": "resnet18", "width": 16, "resolution": 16, "workers": 0,
             "flip": False, "colour": False, "clusters": 10, "pca_dim": 32, "lr": 0.05, "min_scale": 0.5,
             "sobel": False},
    # as the torch example's: the demo's values behind the paper's Sobel filter, 15 epochs (a few minutes
    # on one thread for 2,000 images of 28 pixels)
    "small": {"epochs": 15, "sobel": True},
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, with the ImageNet or demo preset filled in."""
    parser = runs.PresetParser(PRESETS, description=__doc__)
    jc.add_arguments(parser)
    parser.add_preset("--clusters", type=runs.positive_int, help="k of k-means")
    parser.add_preset("--pca-dim", type=runs.positive_int, help="PCA-whitened dimension before k-means")
    parser.add_preset("--lr", type=runs.positive_float, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--weight-decay", type=runs.positive_float, default=1e-5, help="(default: 1e-5)")
    parser.add_argument("--kmeans-backend", choices=["auto", "faiss", "array"], default="auto",
                        help="k-means implementation (auto: faiss when installed; default: auto)")
    parser.add_argument("--kmeans-iters", type=runs.positive_int, default=20, help="(default: 20)")
    parser.add_preset("--min-scale", type=runs.unit_float, help="smallest area fraction of a random resized crop")
    parser.add_preset("--sobel", action=argparse.BooleanOptionalAction,
                      help="a fixed Sobel filter in front of the network (the paper's; removes colour and brightness)")
    return parser, parser.parse_args(argv)


# ---------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Crop:
    """DeepCluster's training view: random resized crop of area ``scale``, aspect [3/4, 4/3], optional
    horizontal flip (hashable: a static argument of ``jit``)."""

    size: int
    scale: tuple[float, float]
    flip: bool


def _weights(start: jax.Array, length: jax.Array, size: int, source: int) -> jax.Array:
    """(size, source) bilinear weights sampling [start, start + length) of ``source`` pixels at ``size``
    points, the filter widened by the shrink factor (antialiasing), rows normalised."""
    centre = start + (jnp.arange(size, dtype=jnp.float32) + 0.5) * length / size - 0.5
    support = jnp.maximum(length / size, 1.0)
    w = jnp.maximum(0.0, 1.0 - jnp.abs(centre[:, None] - jnp.arange(source, dtype=jnp.float32)[None, :]) / support)
    return w / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1e-12)


def _crop_one(key: jax.Array, image: jax.Array, spec: Crop) -> jax.Array:
    source = image.shape[0]
    k = jax.random.split(key, 5)
    area = source * source * jax.random.uniform(k[0], (), minval=spec.scale[0], maxval=spec.scale[1])
    log_ratio = jax.random.uniform(k[1], (), minval=np.log(3 / 4), maxval=np.log(4 / 3))
    w = jnp.clip(jnp.sqrt(area * jnp.exp(log_ratio)), 1.0, source)
    h = jnp.clip(jnp.sqrt(area / jnp.exp(log_ratio)), 1.0, source)
    rows = _weights(jax.random.uniform(k[2], ()) * (source - h), h, spec.size, source)
    cols = _weights(jax.random.uniform(k[3], ()) * (source - w), w, spec.size, source)
    if spec.flip:
        cols = jnp.where(jax.random.bernoulli(k[4]), cols[::-1], cols)
    x = jnp.einsum("ik,klc,jl->ijc", rows, image.astype(jnp.float32) / 255.0, cols)
    return (x - jnp.asarray(runs.IMAGENET_MEAN, jnp.float32)) / jnp.asarray(runs.IMAGENET_STD, jnp.float32)


def augment(key: jax.Array, images: jax.Array, spec: Crop) -> jax.Array:
    """(B, size, size, 3) normalised training views of (B, S, S, 3) uint8 base images, one key per image."""
    return jax.vmap(_crop_one, in_axes=(0, 0, None))(jax.random.split(key, images.shape[0]), images, spec)


# ---------------------------------------------------------------------------- model and optimiser
STEM_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming, as the ResNet's stem
#: The horizontal Sobel derivative (cross-correlation, as ``lax.conv``); its transpose is the vertical one.
SOBEL_X = np.asarray([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], np.float32)


def sobel(x: jax.Array) -> jax.Array:
    """The paper's fixed input filter, (B, H, W, C) -> (B, H, W, 2) float32: the grey level (the mean
    of the channels), then its horizontal and vertical Sobel derivatives (zero padding)."""
    grey = jnp.mean(x.astype(jnp.float32), axis=-1, keepdims=True)
    kernel = jnp.asarray(np.stack([SOBEL_X, SOBEL_X.T], axis=-1)[:, :, None, :])  # (3, 3, 1, 2), HWIO
    return jax.lax.conv_general_dilated(grey, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class SobelBackbone(nnx.Module):
    """A ResNet of :func:`jax_common.backbone` behind :func:`sobel`, its stem taking the 2 derivatives."""

    def __init__(self, arch: str, width: int, small_input: bool, rngs: nnx.Rngs) -> None:
        self.net = jc.backbone(arch, width, small_input, rngs)
        stem = self.net.stem
        self.net.stem = nnx.Conv(2, stem.out_features, stem.kernel_size, strides=stem.strides, padding=stem.padding,
                                 use_bias=False, kernel_init=STEM_INIT, rngs=rngs)
        self.num_features = self.net.num_features

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net(sobel(x))


class DeepClusterNet(nnx.Module):
    """Backbone (pooled features, what k-means clusters; behind a fixed Sobel filter with ``sobel``)
    and the k-way top layer."""

    def __init__(self, arch: str, width: int, resolution: int, num_clusters: int, sobel: bool = False, *,
                 rngs: nnx.Rngs) -> None:
        build = SobelBackbone if sobel else jc.backbone
        self.backbone = build(arch, width, jc.small_input(resolution), rngs)
        self.top = nnx.Linear(self.backbone.num_features, num_clusters,
                              kernel_init=nnx.initializers.normal(TOP_STD), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.top(self.backbone(x))


@dataclass(frozen=True)
class Optimizer:
    """SGD, momentum 0.9, weight decay on every parameter (as torch's SGD), constant lr (as the paper).

    Hashable (a static argument of ``jit``: equal settings reuse the compiled step)."""

    lr: float
    weight_decay: float

    def build(self) -> optax.GradientTransformation:
        return optax.chain(optax.add_decayed_weights(self.weight_decay), optax.sgd(self.lr, momentum=0.9))


def _is_top(path: tuple) -> bool:
    return any(getattr(entry, "key", None) == TOP for entry in path)


def reset_top(params: dict, opt_state: Any, key: jax.Array) -> tuple[dict, Any]:
    """``params`` with a fresh top layer (weights N(0, 0.01²), bias 0) and ``opt_state`` with the top
    layer's entries (its momentum) zeroed; everything else unchanged."""
    kernel = params[TOP]["kernel"]
    top = {"kernel": TOP_STD * jax.random.normal(key, kernel.shape, kernel.dtype),
           "bias": jnp.zeros_like(params[TOP]["bias"])}
    opt_state = jax.tree_util.tree_map_with_path(lambda p, x: jnp.zeros_like(x) if _is_top(p) else x, opt_state)
    return {**params, TOP: top}, opt_state


@functools.partial(jax.jit, static_argnames=("graphdef", "opt", "spec"), donate_argnames=("params", "stats", "opt_state"))
def train_step(params: dict, stats: dict, opt_state: Any, images: jax.Array, labels: jax.Array, key: jax.Array, *,
               graphdef: nnx.GraphDef, opt: Optimizer, spec: Crop) -> tuple[dict, dict, Any, jax.Array]:
    """Augment, forward, mean cross-entropy against the pseudo-labels over the global batch, SGD step."""
    x = augment(key, images, spec)

    def loss_fn(p: dict) -> tuple[jax.Array, dict]:
        model = nnx.merge(graphdef, p, stats)
        logits = model(x)
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
        return loss, jc.merged_stats(model)

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.build().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef", "resolution"))
def eval_features(params: dict, stats: dict, images: jax.Array, *, graphdef: nnx.GraphDef, resolution: int) -> jax.Array:
    """(B, D) backbone features of centre crops, BatchNorm in inference mode."""
    return nnx.merge(graphdef, params, stats).backbone(jc.center_crop(images, resolution))


# ---------------------------------------------------------------------------- run
def training_order(labels: np.ndarray, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(N // batch_size, batch_size) dataset indices of one epoch: N draws spread evenly over the clusters
    of ``labels`` (N,) (``clusterlearn.UniformLabelSampler``, seeded by ``seed`` and ``epoch``), the
    incomplete last batch dropped."""
    steps = len(labels) // batch_size
    return cl.UniformLabelSampler(labels, seed=seed).epoch_indices(epoch)[: steps * batch_size].reshape(steps, batch_size)


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    jc.launch(parser, args, args.clusters, run, ["labeler/epoch", "labeler/previous_labels"])


def run(args: argparse.Namespace, data: runs.ImageData, ckpt: dict[str, np.ndarray] | None, mesh: jax.sharding.Mesh) -> None:
    """Train (or resume), log, checkpoint and plot; a checkpoint whose arrays do not fit this run
    is refused (:class:`runs.CheckpointError`) before anything is written."""
    n = len(data)
    steps = n // args.batch_size
    opt = Optimizer(args.lr, args.weight_decay)
    spec = Crop(args.resolution, (args.min_scale, 1.0), args.flip)
    key = jax.random.key(args.seed) if ckpt is None else jc.key_from_data(ckpt["rng/key"])
    init_key, train_key, top_key = jax.random.split(key, 3)
    net_args = (args.arch, args.width, args.resolution, args.clusters, args.sobel)
    train_def, eval_def, params, stats = jc.init_model(DeepClusterNet, net_args, init_key)
    opt_state = opt.build().init(params)
    labeler = cl.DeepClusterLabeler(args.clusters, pca_dim=args.pca_dim, n_iter=args.kmeans_iters, seed=args.seed,
                                    backend=args.kmeans_backend)
    training = args.eval_only is None
    random_init = (params, stats)  # the random network baseline's weights (the restore below replaces them)
    start = 0
    if ckpt is not None:  # everything restored (and checked) before the run directory is touched
        params, stats, opt_state = jc.restore_training(ckpt, params, stats, opt_state)
        with runs.restoring("labeler"):
            labeler.load_state_dict({"epoch": int(ckpt["labeler/epoch"]), "previous_labels": ckpt["labeler/previous_labels"]})
        start = int(ckpt["epoch"])
    params, stats, opt_state = jc.replicate((params, stats, opt_state), mesh)
    out = runs.run_dir(args, METHOD)
    images = jc.Images(data, jc.base_size(args.resolution), args.workers)
    evaluation = jc.Evaluation(out, data, args, images, mesh, write=training)
    baselines = evaluation.baselines(eval_def, *random_init, fresh=ckpt is None)
    if not training:
        record = {"epoch": start, **evaluation(eval_def, params, stats),
                  **runs.cluster_scores(data.targets, labeler.state_dict()["previous_labels"])}
        images.close()
        print(runs.eval_only_lines("DeepCluster", "k-means labels", record, baselines), flush=True)
        return
    log = runs.MetricsLog(out, True, resumed=ckpt is not None)
    show = args.progress
    print(f"DeepCluster (JAX): {data.name}, {n} images; {args.arch} (width {args.width}, "
          f"{jc.count(params):,} parameters), k = {args.clusters}, {jc.describe(mesh)}; run directory {out}", flush=True)
    stop = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start, stop):
        started = time.perf_counter()
        feats = jc.extract(functools.partial(eval_features, params, stats, graphdef=eval_def, resolution=args.resolution),
                           images, args.batch_size, mesh, show, "features")
        result = labeler(feats)
        labels = np.asarray(result.labels, dtype=np.int32)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": args.lr, "nmi_previous": result.nmi_previous,
                                  "empty_clusters_fixed": result.n_empty_fixed, "kmeans_inertia": result.inertia,
                                  "cluster_seconds": time.perf_counter() - started}
        params, opt_state = jc.replicate(reset_top(params, opt_state, jax.random.fold_in(top_key, epoch)), mesh)
        order = training_order(labels, args.batch_size, args.seed, epoch)
        trained = time.perf_counter()
        losses = []
        for step, (idx, x) in enumerate(runs.progress(images.batches(order), show, f"epoch {epoch + 1}/{args.epochs}", steps)):
            params, stats, opt_state, loss = train_step(
                params, stats, opt_state, jc.shard_batch(x, mesh), jc.shard_batch(labels[idx], mesh),
                jc.step_key(train_key, epoch, step), graphdef=train_def, opt=opt, spec=spec)
            losses.append(loss)
        losses = jax.device_get(losses)  # waits for the last step (dispatch is asynchronous)
        seconds = time.perf_counter() - trained
        record |= {"loss": float(np.mean(losses)), "images_per_s": steps * args.batch_size / seconds,
                   "train_seconds": seconds}
        state = labeler.state_dict()
        arrays = {**jc.flatten("params", params), **jc.flatten("stats", stats), **jc.flatten("opt", opt_state),
                  "labeler/epoch": np.asarray(state["epoch"], np.int64),
                  "labeler/previous_labels": state["previous_labels"], "rng/key": jc.key_data(key)}
        jc.save_checkpoint(out / jc.CHECKPOINT, arrays, args, epoch + 1)
        if runs.eval_due(epoch + 1, stop, args.eval_every):
            evaluated = time.perf_counter()
            record |= evaluation(eval_def, params, stats) | {"eval_seconds": time.perf_counter() - evaluated}
        record |= runs.cluster_scores(data.targets, labels)
        record |= runs.size_stats(labels, args.clusters)[1]
        record["seconds"] = time.perf_counter() - started
        log.write(record)
        print(runs.epoch_line(record), flush=True)
    images.close()
    records = log.read()
    last = labeler.state_dict()["previous_labels"]  # the last epoch's k-means labels
    sizes = runs.size_stats(last, args.clusters)[0]
    plot = runs.plot_run(out, records, sizes, f"DeepCluster (JAX) on {data.name}, {args.arch}, k = {args.clusters}",
                         baselines)
    assignments = runs.write_assignments(out, data, last)
    print(f"wrote {log.path}, {out / jc.CHECKPOINT}, {plot}, {assignments}")
    print(runs.summary_line("DeepCluster", "k-means labels", records[-1], baselines), flush=True)


if __name__ == "__main__":
    main()
