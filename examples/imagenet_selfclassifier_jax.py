"""Self-Classifier (Amrani et al., ECCV 2022) in JAX: a Flax NNX ResNet, optax LARS, all local devices.

ImageNet (the paper's settings are the defaults: ResNet-50, projection MLP 2048 → 4096 (3
layers) → 128, four bias-free heads of 1,000 / 2,000 / 4,000 / 8,000 classes, τ_row 0.1,
τ_col 0.05, eps 1e-12, multi-crop 2×224 + 6×96 with BYOL-style augmentation, LARS with weight
decay 1e-6, batch 4096, lr 4.8 (0.3 per 256 images) with warm-up then cosine to lr/1000, 800
epochs; the paper's nearest-neighbour augmentation is not implemented)::

    python examples/imagenet_selfclassifier_jax.py --data /path/to/imagenet/train

The demo (no --data) is the torch example's: scikit-learn's 1797 digits upscaled to 16×16 RGB,
a quarter-width ResNet-18 (width 16, 3×3 stem), no flips or hue/saturation jitter (a
mirrored digit is another shape), heads of 10 / 20 / 40 / 80 classes, global crops of area
[0.5, 1] (``--min-scale``; 0.14 for ImageNet), no local crops, 24 epochs of batch 128 on the
CPU (about 9 minutes of CPU on one thread). Its LARS lr is 2.4 (base 4.8, 16× the paper's
per-256 rate): the trust ratio moves each weight by about lr × 0.001 of its norm per step, and
with few steps per epoch the paper's rate leaves the logits near uniform (the loss stays at
the mean log C of the heads and the argmax piles onto one class)::

    python examples/imagenet_selfclassifier_jax.py

One jitted step over a mesh of all local devices (batch sharded along "data", parameters
replicated) augments every view on the devices, runs the backbone once per crop size, and
takes the adapter's fast loss (closed-form ``custom_vjp``) of the *global* logits: under
``jit`` the sharded batch is one array, so the column softmax and the N/C normalisation run
over the global batch (XLA inserts the collectives), and the gradient is that of the
global-batch loss. Metrics use the argmax of the first head on centre crops. Every
``--eval-every`` epochs and at the end, the backbone's pooled features (before the projection)
are evaluated on a fixed held-out split (k-NN, linear probe, k-means), next to the randomly
initialised network and the raw pixels. Writes ``metrics.jsonl``, ``checkpoint.npz`` (every
epoch), ``split.npz``, ``baselines.json``, ``assignments.csv`` (the first head's argmax) and
``summary.png`` to the run directory; ``--resume <dir>/checkpoint.npz`` continues a run
exactly, ``--eval-only <dir>/checkpoint.npz`` evaluates it.
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flax_resnet
import jax_common as jc
import runs
from clusterlearn.adapters.jax import self_classifier_loss

METHOD = "selfclassifier"
#: Classes of the heads as multiples of the first's (``--clusters``), as the paper's 1,000 / 2,000 / 4,000 / 8,000.
HEAD_MULTIPLES = (1, 2, 4, 8)
PRESETS = {
    "imagenet": {"epochs": 800, "batch_size": 4096, "arch": "resnet50", "width": 64, "resolution": 224, "workers": 8,
                 "flip": True, "colour": True, "clusters": 1000, "hidden_dim": 4096, "proj_layers": 3, "local_crops": 6,
                 "base_lr": 0.3, "warmup_epochs": 10, "min_scale": 0.14},
    "demo": {"epochs": 24, "batch_size": 128, "arch": "resnet18", "width": 16, "resolution": 16, "workers": 0,
             "flip": False, "colour": False, "clusters": 10, "hidden_dim": 512, "proj_layers": 2, "local_crops": 0,
             "base_lr": 4.8, "warmup_epochs": 1, "min_scale": 0.5},
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, with the ImageNet or demo preset filled in."""
    parser = runs.PresetParser(PRESETS, description=__doc__)
    jc.add_arguments(parser)
    parser.add_preset("--clusters", type=runs.positive_int,
                      help="classes of the first head, the one scored; the other heads have 2, 4 and 8 times as many "
                      "(the paper's 1,000 to 8,000 on ImageNet)")
    parser.add_argument("--classes", type=runs.positive_int_list,
                        help="classes of each head, e.g. 10,20,40,80; the first is scored (default: --clusters × 1, 2, 4, 8; "
                        "given, it replaces them and --clusters becomes its first entry)")
    parser.add_preset("--hidden-dim", type=runs.positive_int, help="width of the projection MLP")
    parser.add_argument("--out-dim", type=runs.positive_int, default=128, help="projection output (default: 128)")
    parser.add_preset("--proj-layers", type=runs.positive_int, help="hidden layers of the projection MLP")
    parser.add_preset("--local-crops", type=runs.non_negative_int, help="local views (3/7 of the resolution) besides the 2 global ones")
    parser.add_preset("--base-lr", type=runs.positive_float, help="LARS lr per 256 images (lr = base × batch / 256)")
    parser.add_preset("--min-scale", type=runs.unit_float, help="smallest area fraction of a global crop")
    parser.add_preset("--warmup-epochs", type=runs.non_negative_int, help="linear warm-up before the cosine decay")
    parser.add_argument("--weight-decay", type=runs.positive_float, default=1e-6, help="(default: 1e-6)")
    parser.add_argument("--row-temperature", type=runs.positive_float, default=0.1, help="τ_row (default: 0.1)")
    parser.add_argument("--col-temperature", type=runs.positive_float, default=0.05, help="τ_col (default: 0.05)")
    args = parser.parse_args(argv)
    if args.classes is None:
        args.classes = [args.clusters * m for m in HEAD_MULTIPLES]
    args.clusters = args.classes[0]
    if any(c < 2 for c in args.classes):
        parser.error(f"--classes: every head needs at least 2 classes, got {runs.format_value(args.classes)}")
    return parser, args


def views(resolution: int, local: int, min_scale: float = 0.14) -> tuple[jc.ViewSpec, ...]:
    """BYOL-style views: two global ones (area ``[min_scale, 1]``, blur p 1.0 / 0.1, solarise p 0 / 0.2),
    ``local`` small ones (area ``[0.05, 0.14]``, blur p 0.5).

    Each: random resized crop, flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grey p 0.2.
    """
    byol = {"jitter": (0.4, 0.4, 0.2, 0.1), "jitter_p": 0.8, "gray_p": 0.2}
    small = max(8, round(resolution * 96 / 224))
    return (
        jc.ViewSpec(resolution, scale=(min_scale, 1.0), blur_p=1.0, **byol),
        jc.ViewSpec(resolution, scale=(min_scale, 1.0), blur_p=0.1, solarize_p=0.2, **byol),
        *[jc.ViewSpec(small, scale=(0.05, 0.14), blur_p=0.5, **byol)] * local,
    )


class SelfClassifierNet(nnx.Module):
    """Backbone, projection MLP (Linear → BatchNorm → LeakyReLU, ``layers`` times; Linear → out_dim;
    L2 normalisation) and one bias-free linear head per entry of ``classes`` (linear layers
    initialised as torch's, :func:`flax_resnet.linear`)."""

    def __init__(self, arch: str, width: int, resolution: int, classes: tuple[int, ...], hidden_dim: int,
                 out_dim: int, layers: int, *, rngs: nnx.Rngs) -> None:
        self.backbone = jc.backbone(arch, width, jc.small_input(resolution), rngs)
        mlp: list[Any] = []
        for i in range(layers):
            mlp += [flax_resnet.linear(self.backbone.num_features if i == 0 else hidden_dim, hidden_dim, use_bias=False,
                                       rngs=rngs),
                    nnx.BatchNorm(hidden_dim, momentum=0.9, epsilon=1e-5, rngs=rngs), nnx.leaky_relu]
        self.projection = nnx.Sequential(*mlp, flax_resnet.linear(hidden_dim, out_dim, rngs=rngs))
        self.heads = nnx.List([flax_resnet.linear(out_dim, c, use_bias=False, rngs=rngs) for c in classes])

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        z = self.projection(self.backbone(x))
        z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        return [head(z) for head in self.heads]


@dataclass(frozen=True)
class Optimizer:
    """LARS as the torch example's: SGD momentum 0.9; weights (≥ 2-D) get weight decay and the trust
    ratio 0.001·‖w‖/‖g + wd·w‖, biases and normalisation parameters neither; lr warm-up then
    cosine to lr/1000, by epoch."""

    lr: float
    weight_decay: float
    warmup: int
    epochs: int
    steps_per_epoch: int

    def lr_at(self, count: Any) -> Any:
        """Learning rate at optimiser step ``count`` (int or traced)."""
        epoch = count // self.steps_per_epoch
        t = (epoch - self.warmup) / max(self.epochs - self.warmup, 1)
        cosine = 1e-3 + (1 - 1e-3) * 0.5 * (1 + jnp.cos(math.pi * t))
        return self.lr * jnp.where(epoch < self.warmup, (epoch + 1) / max(self.warmup, 1), cosine)

    def build(self) -> optax.GradientTransformation:
        def weights(params: Any) -> Any:
            return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)

        return optax.chain(
            optax.add_decayed_weights(self.weight_decay, mask=weights),
            optax.masked(optax.scale_by_trust_ratio(trust_coefficient=0.001), weights),
            optax.trace(decay=0.9),
            optax.scale_by_learning_rate(self.lr_at),
        )


@dataclass(frozen=True)
class LossSpec:
    """Static settings of the loss and the views (a ``jit`` static argument)."""

    views: tuple[jc.ViewSpec, ...]
    row_temperature: float
    col_temperature: float


def _runs_of_sizes(specs: tuple[jc.ViewSpec, ...]) -> list[list[int]]:
    """Consecutive view indices of equal crop size (one backbone pass each)."""
    groups: list[list[int]] = []
    for i, spec in enumerate(specs):
        if groups and specs[groups[-1][0]].size == spec.size:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@functools.partial(jax.jit, static_argnames=("graphdef", "opt", "spec"), donate_argnames=("params", "stats", "opt_state"))
def train_step(params: dict, stats: dict, opt_state: Any, images: jax.Array, key: jax.Array, *,
               graphdef: nnx.GraphDef, opt: Optimizer, spec: LossSpec) -> tuple[dict, dict, Any, jax.Array]:
    """Augment every view, forward, global-batch Self-Classifier loss over all heads and views, LARS step."""
    keys = jax.random.split(key, len(spec.views))
    x = [jc.augment(keys[v], images, s) for v, s in enumerate(spec.views)]
    b = images.shape[0]

    def loss_fn(p: dict) -> tuple[jax.Array, dict]:
        model = nnx.merge(graphdef, p, stats)
        per_head: list[list[jax.Array]] = []
        for group in _runs_of_sizes(spec.views):
            # (B, V, ...) flattened sample-major: each device's rows stay on it under sharding
            stacked = jnp.stack([x[v] for v in group], axis=1).reshape(b * len(group), *x[group[0]].shape[1:])
            for h, logits in enumerate(model(stacked)):
                logits = logits.reshape(b, len(group), -1)
                if h == len(per_head):
                    per_head.append([])
                per_head[h].extend(logits[:, i] for i in range(len(group)))
        loss = self_classifier_loss(per_head, row_temperature=spec.row_temperature,
                                    col_temperature=spec.col_temperature, eps=1e-12, check_finite=False)
        return loss, jc.merged_stats(model)

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.build().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef", "resolution"))
def first_head_labels(params: dict, stats: dict, images: jax.Array, *, graphdef: nnx.GraphDef, resolution: int) -> jax.Array:
    """(B,) argmax of the first head on centre crops, BatchNorm in inference mode."""
    return jnp.argmax(nnx.merge(graphdef, params, stats)(jc.center_crop(images, resolution))[0], axis=1)


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    jc.launch(parser, args, args.classes[0], run)


def run(args: argparse.Namespace, data: runs.ImageData, ckpt: dict[str, np.ndarray] | None, mesh: jax.sharding.Mesh) -> None:
    """Train (or resume), log, checkpoint and plot."""
    training = args.eval_only is None
    show = args.progress
    steps = len(data) // args.batch_size
    lr = args.base_lr * args.batch_size / 256
    opt = Optimizer(lr, args.weight_decay, args.warmup_epochs, args.epochs, steps)
    spec = LossSpec(tuple(jc.with_options(v, flip=args.flip, colour=args.colour)
                          for v in views(args.resolution, args.local_crops, args.min_scale)), args.row_temperature, args.col_temperature)
    key = jax.random.key(args.seed) if ckpt is None else jc.key_from_data(ckpt["rng/key"])
    init_key, train_key = jax.random.split(key)
    net_args = (args.arch, args.width, args.resolution, tuple(args.classes), args.hidden_dim, args.out_dim, args.proj_layers)
    train_def, eval_def, params, stats = jc.init_model(SelfClassifierNet, net_args, init_key)
    opt_state = opt.build().init(params)
    random_init = (params, stats)  # the random network baseline's weights (the restore below replaces them)
    start = 0
    if ckpt is not None:  # everything restored (and checked) before the run directory is touched
        params, stats, opt_state = jc.restore_training(ckpt, params, stats, opt_state)
        start = int(ckpt["epoch"])
    out = runs.run_dir(args, METHOD)
    log = runs.MetricsLog(out, training, resumed=ckpt is not None)
    images = jc.Images(data, jc.base_size(args.resolution), args.workers)
    scored = args.classes[0]
    evaluation = jc.Evaluation(out, data, args, images, mesh, write=training)
    print(f"Self-Classifier (JAX): {data.name}, {len(data)} images; {args.arch} (width {args.width}, "
          f"{jc.count(params):,} parameters), heads {runs.format_value(args.classes)}, lr {lr:g}, "
          f"{jc.describe(mesh)}; run directory {out}", flush=True)
    baselines = evaluation.baselines(eval_def, *random_init, fresh=ckpt is None)
    params, stats, opt_state = jc.replicate((params, stats, opt_state), mesh)
    labels_name = f"{scored}-class head argmax"
    if not training:
        predicted = jc.extract(functools.partial(first_head_labels, params, stats, graphdef=eval_def, resolution=args.resolution),
                               images, args.batch_size, mesh, show, "scoring")
        record = {"epoch": start, **evaluation(eval_def, params, stats), **runs.cluster_scores(data.targets, predicted)}
        images.close()
        print(runs.eval_only_lines("Self-Classifier", labels_name, record, baselines), flush=True)
        return
    stop = min(args.epochs, args.stop_after or args.epochs)
    sizes = None
    for epoch in range(start, stop):
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": float(opt.lr_at(epoch * steps))}
        losses = []
        order = runs.epoch_order(len(data), args.batch_size, args.seed, epoch)
        for step, (_, x) in enumerate(runs.progress(images.batches(order), show, f"epoch {epoch + 1}/{args.epochs}", len(order))):
            params, stats, opt_state, loss = train_step(
                params, stats, opt_state, jc.shard_batch(x, mesh), jc.step_key(train_key, epoch, step),
                graphdef=train_def, opt=opt, spec=spec)
            losses.append(loss)
        losses = jax.device_get(losses)  # waits for the last step (dispatch is asynchronous)
        seconds = time.perf_counter() - started
        record |= {"loss": float(np.mean(losses)), "images_per_s": len(order) * args.batch_size / seconds,
                   "train_seconds": seconds}
        arrays = {**jc.flatten("params", params), **jc.flatten("stats", stats), **jc.flatten("opt", opt_state),
                  "rng/key": jc.key_data(key)}
        jc.save_checkpoint(out / jc.CHECKPOINT, arrays, args, epoch + 1)
        predicted = jc.extract(functools.partial(first_head_labels, params, stats, graphdef=eval_def, resolution=args.resolution),
                               images, args.batch_size, mesh, show, "scoring")
        if runs.eval_due(epoch + 1, stop, args.eval_every):
            evaluated = time.perf_counter()
            record |= evaluation(eval_def, params, stats) | {"eval_seconds": time.perf_counter() - evaluated}
        record |= runs.cluster_scores(data.targets, predicted)
        sizes, size_record = runs.size_stats(predicted, scored)
        record |= size_record
        record["seconds"] = time.perf_counter() - started
        log.write(record)
        print(runs.epoch_line(record), flush=True)
    images.close()
    if sizes is not None:
        records = log.read()
        plot = runs.plot_run(out, records, sizes, f"Self-Classifier (JAX) on {data.name}, {args.arch}, first head C = {scored}",
                             baselines)
        assignments = runs.write_assignments(out, data, predicted)
        print(f"wrote {log.path}, {out / jc.CHECKPOINT}, {plot}, {assignments}")
        print(runs.summary_line("Self-Classifier", labels_name, records[-1], baselines), flush=True)


if __name__ == "__main__":
    main()
