"""Online Deep Clustering (Zhan et al., CVPR 2020) in JAX: a Flax NNX ResNet, optax, all local devices.

ImageNet (the paper's settings are the defaults: ResNet-50, 10,000 clusters, batch 512,
SGD momentum 0.9, weight decay 1e-4, lr 0.03 with a ×0.1 step, 400 epochs)::

    python examples/imagenet_odc_jax.py --data /path/to/imagenet/train

The demo (no --data) is the torch example's: scikit-learn's 1797 digits upscaled to 16×16 RGB,
a half-width ResNet-18 (width 32, 3×3 stem), no flips or hue/saturation jitter (a mirrored
digit is another shape), 10 clusters, 20 epochs with the lr step after 16 on the CPU (about
12 minutes of CPU on one thread)::

    python examples/imagenet_odc_jax.py

Training starts from k-means of the random network's features (eval mode). For
``--label-warmup`` epochs (default 1) the labels stay fixed while the memory collects the
training-mode features of augmented views; then the centroids are recomputed from them and
re-labelling begins (``--label-warmup 0``: the reference's schedule, whose first epoch
re-labels against centroids of features the training never produces).

Each iteration is one jitted step over a mesh of all local devices (batch sharded along
"data", parameters replicated): augmentation on the devices, features ``f = neck(backbone(x))``
(neck width → width → 256 with BatchNorm/ReLU), cross-entropy of ``head(f)`` against the
memory's labels (read before the update) weighted by ``w_c ∝ n_c^-1/2`` (the adapter's
``loss_weights``), an SGD step; then the adapter's ``make_sharded_step`` updates the memory
(every device applies the same update to its replica from the all-gathered batch) and
``handle_small_clusters`` runs on the host. Every ``--eval-every`` epochs and at the end, the
backbone's pooled features are evaluated on a fixed held-out split (k-NN, linear probe,
k-means), next to the randomly initialised network and the raw pixels. Writes
``metrics.jsonl``, ``checkpoint.npz`` (every epoch), ``split.npz``, ``baselines.json``,
``assignments.csv`` (the memory labels) and ``summary.png`` to the run directory; ``--resume
<dir>/checkpoint.npz`` continues a run exactly, ``--eval-only <dir>/checkpoint.npz`` evaluates
it. The augmentation is the torch example's, rotation by ±2° included (nearest neighbour about
the centre, black outside, as torchvision's ``RandomRotation(2)``); the hue shift is a YIQ
rotation, not torchvision's HSV one (``jax_common``).

``--shard-memory``: the memory's (N, 256) features are cut along N over the mesh (the
adapter's ``shard_memory``, a ``NamedSharding``; labels, centroids, sizes and sums stay
replicated) and stepped by ``make_memory_sharded_step`` (the core's sharded step under
``shard_map``, each device writing only its rows); the label warm-up updates each device's own
rows, and the small-cluster handling gathers only the feature rows it reads (the small and the
split clusters' members). The initial k-means and the warm-up's re-fill run on the host over all N features, as
without the flag (the adapter shards a filled state), and so does each epoch's record's
fingerprint (the rows gathered: the digest a replicated memory with the same bytes has;
replicas are not compared, there are none). The memory is checkpointed with orbax
(``save_memory``) into ``odc-memory-<epoch>/`` next to ``checkpoint.npz``, which names it
once it is complete (older ones are then removed); ``--resume`` reads it onto a mesh of any
size (``load_memory``), so a run continues on another number of devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python examples/imagenet_odc_jax.py --shard-memory --epochs 3 --stop-after 2
    python examples/imagenet_odc_jax.py --shard-memory --epochs 3 --resume runs/odc-<timestamp>/checkpoint.npz
"""

from __future__ import annotations

import argparse
import functools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import flax_resnet
import jax_common as jc
import runs
import clusterlearn as cl
from clusterlearn.adapters import jax as clj
from clusterlearn.shards import ShardLayout

METHOD = "odc"
FEAT_DIM = 256
PRESETS = {
    "imagenet": {"epochs": 400, "batch_size": 512, "arch": "resnet50", "width": 64, "resolution": 224, "workers": 8,
                 "flip": True, "colour": True, "clusters": 10_000, "lr": 0.03, "lr_steps": [360], "min_scale": 0.08},
    "demo": {"epochs": 20, "batch_size": 64, "arch": "resnet18", "width": 32, "resolution": 16, "workers": 0,
             "flip": False, "colour": False, "clusters": 10, "lr": 0.03, "lr_steps": [16], "min_scale": 0.5},
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, with the ImageNet or demo preset filled in."""
    parser = runs.PresetParser(PRESETS, description=__doc__)
    jc.add_arguments(parser)
    parser.add_preset("--clusters", type=runs.positive_int, help="number of clusters C")
    parser.add_preset("--lr", type=runs.positive_float, help="SGD learning rate (momentum 0.9)")
    parser.add_preset("--lr-steps", type=runs.positive_int_list, help="epochs after which the lr drops ×0.1")
    parser.add_argument("--weight-decay", type=runs.positive_float, default=1e-4, help="(default: 1e-4)")
    parser.add_argument("--momentum-memory", type=runs.unit_float, default=0.5,
                        help="weight of the fresh feature in the sample memory (default: 0.5)")
    parser.add_argument("--min-cluster-size", type=runs.non_negative_int, default=20,
                        help="clusters below this are dissolved and re-seeded (default: 20)")
    parser.add_argument("--centroid-interval", type=runs.positive_int, default=10,
                        help="refresh all centroids every this many iterations (default: 10)")
    parser.add_preset("--min-scale", type=runs.unit_float, help="smallest area fraction of a random resized crop")
    parser.add_argument("--label-warmup", type=runs.non_negative_int, default=1, metavar="EPOCHS",
                        help="epochs trained on the initial clustering without re-labelling, the memory's features "
                        "still updated (see the torch example; default: 1)")
    parser.add_argument("--shard-memory", action="store_true",
                        help="each device holds 1/devices of the sample memory's rows (labels and centroids stay "
                             "replicated); the memory is checkpointed with orbax into odc-memory-<epoch>/ next to "
                             f"the checkpoint and resumes on any number of devices that divides its {FEAT_DIM} feature columns")
    return parser, parser.parse_args(argv)


def view(resolution: int, min_scale: float) -> jc.ViewSpec:
    """ODC's augmentation: random resized crop, flip, rotation ±2°, colour jitter (0.4, 0.4, 1.0, 0.5),
    grey p = 0.2."""
    return jc.ViewSpec(resolution, scale=(min_scale, 1.0), rotation=2.0, jitter=(0.4, 0.4, 1.0, 0.5), gray_p=0.2)


class ODCNet(nnx.Module):
    """Backbone, ODC's non-linear neck (width → width → 256) and the C-way linear head (linear
    layers initialised as torch's, :func:`flax_resnet.linear`)."""

    def __init__(self, arch: str, width: int, resolution: int, num_clusters: int, *, rngs: nnx.Rngs) -> None:
        self.backbone = jc.backbone(arch, width, jc.small_input(resolution), rngs)
        d = self.backbone.num_features
        self.neck = nnx.Sequential(
            flax_resnet.linear(d, d, use_bias=False, rngs=rngs),
            nnx.BatchNorm(d, momentum=0.9, epsilon=1e-5, rngs=rngs),
            nnx.relu,
            flax_resnet.linear(d, FEAT_DIM, rngs=rngs),
        )
        self.head = flax_resnet.linear(FEAT_DIM, num_clusters, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """(B, 256) features, what the sample memory stores."""
        return self.neck(self.backbone(x))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        f = self.features(x)
        return f, self.head(f)


@dataclass(frozen=True)
class Optimizer:
    """SGD (momentum 0.9, weight decay on every parameter, as torch's SGD) with ×0.1 steps per epoch."""

    lr: float
    lr_steps: tuple[int, ...]
    weight_decay: float
    steps_per_epoch: int

    def lr_at(self, count: Any) -> Any:
        """Learning rate at optimiser step ``count`` (int or traced)."""
        epoch = count // self.steps_per_epoch
        drops = sum((epoch >= s) * 1 for s in self.lr_steps)
        return self.lr * jnp.power(0.1, drops)

    def build(self) -> optax.GradientTransformation:
        return optax.chain(optax.add_decayed_weights(self.weight_decay), optax.sgd(self.lr_at, momentum=0.9))


@functools.partial(jax.jit, static_argnames=("graphdef", "opt", "spec", "config"),
                   donate_argnames=("params", "stats", "opt_state"))
def train_step(params: dict, stats: dict, opt_state: Any, memory: clj.ODCState, images: jax.Array,
               indices: jax.Array, key: jax.Array, *, graphdef: nnx.GraphDef, opt: Optimizer, spec: jc.ViewSpec,
               config: clj.ODCConfig) -> tuple[dict, dict, Any, jax.Array, jax.Array]:
    """Augment, forward, weighted cross-entropy against the memory's labels, SGD step.

    Returns the new parameters, BatchNorm statistics and optimiser state, the (B, 256)
    features (for the memory update) and the loss. With the batch sharded over the mesh, every
    reduction (BatchNorm statistics, the loss) runs over the global batch.
    """
    x = jc.augment(key, images, spec)
    labels = memory.labels[indices]  # read before this iteration's memory update
    weights = clj.loss_weights(memory, config)[labels]

    def loss_fn(p: dict) -> tuple[jax.Array, tuple[jax.Array, dict]]:
        model = nnx.merge(graphdef, p, stats)
        f, logits = model(x)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
        loss = jnp.sum(weights * nll) / jnp.sum(weights)  # F.cross_entropy(weight=w): a weighted mean
        return loss, (f, jc.merged_stats(model))

    (loss, (f, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.build().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, f, loss


@functools.partial(jax.jit, static_argnames=("graphdef", "resolution"))
def eval_features(params: dict, stats: dict, images: jax.Array, *, graphdef: nnx.GraphDef, resolution: int) -> jax.Array:
    """(B, 256) features of centre crops, BatchNorm in inference mode."""
    return nnx.merge(graphdef, params, stats).features(jc.center_crop(images, resolution))


@functools.lru_cache(maxsize=8)
def memory_step(mesh: jax.sharding.Mesh, config: clj.ODCConfig) -> Any:
    """The adapter's data-parallel memory step for ``mesh`` (cached: compiled once per process)."""
    return clj.make_sharded_step(mesh, config, jc.AXIS)


@functools.lru_cache(maxsize=8)
def sharded_memory_step(mesh: jax.sharding.Mesh, config: clj.ODCConfig) -> Any:
    """The adapter's step of a memory sharded along N over ``mesh`` (cached: compiled once per process)."""
    return clj.make_memory_sharded_step(mesh, config, jc.AXIS)


def mixed_rows(rows: jax.Array, f: jax.Array, momentum: float) -> jax.Array:
    """(B, D) ``normalise(m · normalise(f) + (1 − m) · rows)``: the label warm-up's new memory rows."""
    f = f / jnp.maximum(jnp.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    mixed = momentum * f + (1 - momentum) * rows
    return mixed / jnp.maximum(jnp.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)


@jax.jit
def warmup_update(features: jax.Array, indices: jax.Array, f: jax.Array, momentum: float) -> jax.Array:
    """The sample memory's feature update alone (no re-labelling): ``F[idx] ← normalise(m ·
    normalise(f) + (1 − m) · F[idx])`` on an (N, D) float32 copy of the memory's features."""
    return features.at[indices].set(mixed_rows(features[indices], f, momentum))


@functools.lru_cache(maxsize=8)
def sharded_warmup_update(mesh: jax.sharding.Mesh, num_samples: int) -> Any:
    """:func:`warmup_update` on features laid out by ``clj.shard_memory`` (padded row blocks along
    :data:`jc.AXIS`): every device all-gathers the batch and writes only the rows it holds, so
    no device holds more than its block. ``update(features, indices, f, momentum)``, jitted
    (cached: compiled once per process)."""
    block = ShardLayout(num_samples, mesh.shape[jc.AXIS]).block

    def local(features: jax.Array, indices: jax.Array, f: jax.Array, momentum: jax.Array) -> jax.Array:
        indices = lax.all_gather(indices, jc.AXIS, tiled=True, to="invarying")
        f = lax.all_gather(f, jc.AXIS, tiled=True, to="invarying")
        rows = indices - lax.axis_index(jc.AXIS) * block
        rows = jnp.where((rows >= 0) & (rows < block), rows, block)  # another device's row: out of range, dropped
        new = mixed_rows(features.at[rows].get(mode="clip"), f, momentum)
        return features.at[rows].set(new, mode="drop")

    specs = (P(jc.AXIS, None), P(jc.AXIS), P(jc.AXIS, None), P())
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=specs[0]))


#: Prefix of the directories of a sharded memory's checkpoints (orbax), and the checkpoint entry naming one.
MEMORY_DIR = "odc-memory"
MEMORY_ENTRY = "odc/memory_dir"


def memory_dir(ckpt: dict[str, np.ndarray], checkpoint: Path) -> Path:
    """The sharded memory's directory that a checkpoint names (it lies next to the checkpoint
    file); :class:`runs.CheckpointError` if the entry is not such a directory's name."""
    if MEMORY_ENTRY not in ckpt:
        raise runs.CheckpointError(f"it has no {MEMORY_ENTRY} entry")
    name = str(ckpt[MEMORY_ENTRY])
    if not name.startswith(f"{MEMORY_DIR}-") or Path(name).name != name:
        raise runs.CheckpointError(f"its {MEMORY_ENTRY} entry {name!r} is not the name of a memory directory")
    return checkpoint.parent / name


def save_sharded_memory(state: clj.ODCState, mesh: jax.sharding.Mesh, config: clj.ODCConfig, out: Path,
                        epoch: int) -> dict[str, np.ndarray]:
    """Write the memory to ``out/odc-memory-<epoch>/`` (orbax: complete or absent); the checkpoint entry naming it.

    A directory of that name left by a run that stopped before its checkpoint named it is
    replaced (no checkpoint names it).
    """
    name = f"{MEMORY_DIR}-{epoch}"
    shutil.rmtree(out / name, ignore_errors=True)
    clj.save_memory(out / name, state, mesh, config, jc.AXIS)
    return {MEMORY_ENTRY: np.asarray(name)}


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    if args.shard_memory and FEAT_DIM % jax.local_device_count():
        parser.error(f"--shard-memory: the memory's checkpoints need its {FEAT_DIM} feature columns to divide over "
                     f"the {jax.local_device_count()} devices")
    # a sharded memory's entry is checked after the settings: resuming a replicated run with the flag names the flag
    required = [] if args.shard_memory else [f"odc/{k}" for k in clj.ODCState._fields]
    jc.launch(parser, args, args.clusters * max(args.min_cluster_size, 1), run, required)


def run(args: argparse.Namespace, data: runs.ImageData, ckpt: dict[str, np.ndarray] | None, mesh: jax.sharding.Mesh) -> None:
    """Initialise (or resume), train, log, checkpoint and plot."""
    training = args.eval_only is None
    show = args.progress
    steps = len(data) // args.batch_size
    opt = Optimizer(args.lr, tuple(sorted(args.lr_steps)), args.weight_decay, steps)
    spec = jc.with_options(view(args.resolution, args.min_scale), flip=args.flip, colour=args.colour)
    key = jax.random.key(args.seed) if ckpt is None else jc.key_from_data(ckpt["rng/key"])
    init_key, train_key = jax.random.split(key)
    train_def, eval_def, params, stats = jc.init_model(ODCNet, (args.arch, args.width, args.resolution, args.clusters), init_key)
    opt_state = opt.build().init(params)
    odc = cl.OnlineDeepClustering(
        len(data), args.clusters, FEAT_DIM, momentum=args.momentum_memory, min_cluster_size=args.min_cluster_size,
        centroid_update_interval=args.centroid_interval, seed=args.seed,
    )
    config = clj.config_from_core(odc)
    random_init = (params, stats)  # the random network baseline's weights (the restore below replaces them)
    start, state = 0, None
    if ckpt is not None:  # everything restored (and checked) before the run directory is touched
        params, stats, opt_state = jc.restore_training(ckpt, params, stats, opt_state)
        with runs.restoring("odc"):
            if args.shard_memory:  # read onto this mesh, whatever the number of devices that wrote it
                state = clj.load_memory(memory_dir(ckpt, runs.checkpoint_path(args)), mesh, config, jc.AXIS)
            else:
                odc.load_state_dict({name: ckpt[f"odc/{name}"] for name in clj.ODCState._fields})
        start = int(ckpt["epoch"])
    out = runs.run_dir(args, METHOD)
    log = runs.MetricsLog(out, training, resumed=ckpt is not None)
    images = jc.Images(data, jc.base_size(args.resolution), args.workers)
    evaluation = jc.Evaluation(out, data, args, images, mesh, write=training)
    print(f"ODC (JAX): {data.name}, {len(data)} images; {args.arch} (width {args.width}, "
          f"{jc.count(params):,} parameters), {args.clusters} clusters, {jc.describe(mesh)}; run directory {out}", flush=True)
    baselines = evaluation.baselines(eval_def, *random_init, fresh=ckpt is None)
    if ckpt is None:
        params, stats = jc.replicate((params, stats), mesh)
        feats = jc.extract(functools.partial(eval_features, params, stats, graphdef=eval_def, resolution=args.resolution),
                           images, args.batch_size, mesh, show, "features")
        odc.initialize(feats)
        scores = runs.cluster_scores(data.targets, np.asarray(odc.labels))
        print(f"initial k-means on the random network's features: NMI {scores['nmi']:.3f}  ACC {scores['acc']:.3f}", flush=True)
    if state is None:
        state = place_memory(odc, mesh, config, args.shard_memory)
    params, stats, opt_state = jc.replicate((params, stats, opt_state), mesh)
    if not training:
        record = {"epoch": start, **evaluation(eval_def, params, stats),
                  **runs.cluster_scores(data.targets, np.asarray(state.labels))}
        images.close()
        print(runs.eval_only_lines("ODC", "memory labels", record, baselines), flush=True)
        return
    if args.shard_memory:
        sharded_step, warmup = sharded_memory_step(mesh, config), sharded_warmup_update(mesh, len(data))
    else:
        sharded_step, warmup = memory_step(mesh, config), warmup_update
    stop = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start, stop):
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": float(opt.lr_at(epoch * steps))}
        losses, changes, small = [], [], 0
        order = runs.epoch_order(len(data), args.batch_size, args.seed, epoch)
        batches = runs.progress(images.batches(order), show, f"epoch {epoch + 1}/{args.epochs}", len(order))
        relabel = epoch >= args.label_warmup
        # a float32 copy of the features, laid out as the memory's (replicated, or cut along N)
        warm = None if relabel else jax.device_put(state.features.astype(jnp.float32), state.features.sharding)
        for step, (idx, x) in enumerate(batches):
            idx_dev = jc.shard_batch(idx.astype(np.int32), mesh)
            params, stats, opt_state, f, loss = train_step(
                params, stats, opt_state, state, jc.shard_batch(x, mesh), idx_dev, jc.step_key(train_key, epoch, step),
                graphdef=train_def, opt=opt, spec=spec, config=config)
            if not relabel:  # the initial labels stay; the memory's features still follow the network
                warm = warmup(warm, idx_dev, f, args.momentum_memory)
                losses.append(loss)
                changes.append(0.0)
                continue
            state, st = sharded_step(state, idx_dev, f)
            if not bool(st["applied"]):  # the next line syncs with the device anyway
                raise FloatingPointError(
                    f"epoch {epoch + 1}, step {step}: the memory step refused the batch (non-finite or all-zero "
                    "features, or indices outside the data set); the memory is unchanged, stopping")
            state, handled = clj.small_cluster_step(state, config)
            small += handled.num_small_clusters
            losses.append(loss)
            changes.append(st["change_ratio"])
        if not relabel:  # centroids and sums of the updated features, the labels unchanged
            odc.initialize(np.asarray(warm)[: len(data)], np.asarray(state.labels))
            state = place_memory(odc, mesh, config, args.shard_memory)
        losses, changes = jax.device_get((losses, changes))  # waits for the last step (dispatch is asynchronous)
        seconds = time.perf_counter() - started
        record |= {"loss": float(np.mean(losses)), "change_ratio": float(np.mean(changes)),
                   "small_clusters_dissolved": small, "images_per_s": len(order) * args.batch_size / seconds,
                   "train_seconds": seconds}
        if args.shard_memory:  # orbax writes the memory; the checkpoint names it once it is complete
            memory = save_sharded_memory(state, mesh, config, out, epoch + 1)
        else:
            clj.check_consistency(state, config)
            memory = {f"odc/{k}": np.asarray(v) for k, v in state._asdict().items()}
        arrays = {**jc.flatten("params", params), **jc.flatten("stats", stats), **jc.flatten("opt", opt_state),
                  **memory, "rng/key": jc.key_data(key)}
        jc.save_checkpoint(out / jc.CHECKPOINT, arrays, args, epoch + 1)
        if args.shard_memory:  # the checkpoint now names this epoch's memory: older ones (and orbax's leftovers) can go
            for old in out.glob(f"{MEMORY_DIR}-*"):
                if old.name != str(memory[MEMORY_ENTRY]):
                    shutil.rmtree(old, ignore_errors=True)
        if runs.eval_due(epoch + 1, stop, args.eval_every):
            evaluated = time.perf_counter()
            record |= evaluation(eval_def, params, stats) | {"eval_seconds": time.perf_counter() - evaluated}
        labels = np.asarray(state.labels)
        record |= runs.cluster_scores(data.targets, labels)
        record |= runs.size_stats(labels, args.clusters)[1]
        record |= {"fingerprint": memory_fingerprint(state, config, args.shard_memory),
                   "seconds": time.perf_counter() - started}
        log.write(record)
        print(runs.epoch_line(record), flush=True)
    images.close()
    if args.shard_memory:
        print(f"sharded over {mesh.size} device(s): ODC memory fingerprint {memory_fingerprint(state, config, True)}",
              flush=True)
    else:
        for device, digest in clj.replica_fingerprints(state, config).items():
            print(f"device {device}: ODC memory fingerprint {digest}", flush=True)
    records = log.read()
    plot = runs.plot_run(out, records, np.asarray(state.sizes),
                         f"ODC (JAX) on {data.name}, {args.arch}, C = {args.clusters}", baselines)
    assignments = runs.write_assignments(out, data, np.asarray(state.labels))
    print(f"wrote {log.path}, {out / jc.CHECKPOINT}, {plot}, {assignments}")
    print(runs.summary_line("ODC", "memory labels", records[-1], baselines), flush=True)


def place_memory(odc: cl.OnlineDeepClustering, mesh: jax.sharding.Mesh, config: clj.ODCConfig, shard: bool) -> clj.ODCState:
    """The core's memory on the mesh: features cut along N (``shard``) or replicated, the rest replicated."""
    state = clj.state_from_core(odc)
    return clj.shard_memory(state, mesh, config, jc.AXIS) if shard else jc.replicate(state, mesh)


def memory_fingerprint(state: clj.ODCState, config: clj.ODCConfig, sharded: bool) -> str:
    """``clj.fingerprint`` of the memory; a sharded one's rows are gathered to the host first (the
    same digest as a replicated memory with the same bytes)."""
    return clj.fingerprint(clj.gather_memory(state, config) if sharded else state, config)


if __name__ == "__main__":
    main()
