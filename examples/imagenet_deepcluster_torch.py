"""DeepCluster (Caron et al., ECCV 2018) with a torchvision ResNet, one process or many.

ImageNet (the paper's settings are the defaults: k = 10,000, PCA-whitening to 256 + L2,
SGD lr 0.05, momentum 0.9, weight decay 1e-5, batch 256, 500 epochs; ResNet-50 here instead of
the paper's AlexNet, and no Sobel filter unless ``--sobel``)::

    torchrun --nproc_per_node=8 examples/imagenet_deepcluster_torch.py --data /path/to/imagenet/train

The demo (no --data): scikit-learn's 1797 digits upscaled to 16×16 RGB, a half-width ResNet-18
(32 channels in the first stage) with the small-image stem, no flips, 10 clusters, a few
epochs on the CPU::

    python examples/imagenet_deepcluster_torch.py

A small ImageFolder tree (at most 20,000 images: ``--preset small``, chosen by default) gets the
demo's settings behind the paper's fixed Sobel filter (``--sobel``: grey level, then its two
derivatives), 15 epochs; without the filter, k-means of the network's features groups images by
their grey levels (the background's brightness) rather than their shapes, and training reinforces that::

    python examples/imagenet_deepcluster_torch.py --data DIR --arch resnet18 --resolution 28 --width 32 --clusters 10 --workers 0 --flip --no-colour

Each epoch: features of the whole data set (no augmentation, eval mode, every rank extracts
its shard and gathers), PCA-whitening + L2 + k-means on rank 0 (broadcast), a re-initialised
top layer (fresh momentum), then one epoch of cross-entropy on the pseudo-labels with samples
drawn uniformly over the clusters. Every ``--eval-every`` epochs and at the end, the
backbone's pooled features are evaluated on a fixed held-out split (k-NN, linear probe,
k-means), next to the randomly initialised network and the raw pixels. Writes
``metrics.jsonl``, ``checkpoint.pt`` (every epoch), ``split.npz``, ``baselines.json``,
``assignments.csv`` (the last k-means labels) and ``summary.png`` to the run directory;
``--resume <dir>/checkpoint.pt`` continues a run, ``--eval-only <dir>/checkpoint.pt`` evaluates it.

``--shard-memory`` (under torchrun, or one process): no process holds all N features or all N
labels. Rank r of W extracts only the features of its block of the samples, rows
``[r * ceil(N / W), (r + 1) * ceil(N / W))`` (:class:`clusterlearn.shards.ShardLayout`), and
:class:`clusterlearn.deepcluster_shard.ShardedDeepClusterLabeler` fits the PCA-whitening and
runs k-means over all ranks with all-reduces (the array k-means, seeded from a bounded sample:
``--kmeans-backend faiss`` is refused); each rank keeps its rows' labels and trains on
``ceil(N / W)`` draws from its own rows, uniform over the clusters from the all-reduced
cluster sizes (:class:`clusterlearn.sampler.ShardedUniformLabelSampler`). The epoch's scores
(NMI, ARI, ACC against the classes) come from an all-reduced contingency table. Each epoch's
labels go to ``deepcluster-labels-<epoch>/`` (``torch.distributed.checkpoint``, each rank its
rows) next to the checkpoint, which names it (older ones are removed once it is written), so
that a run resumes on another number of processes (the PCA and the centroids are refitted every
epoch: the epoch count and these labels are the labeller's whole state). ``assignments.csv``:
each rank writes its rows to a part file and rank 0 concatenates the parts. Each rank prints
a fingerprint of its replicated state (PCA, centroids), equal on every rank. The frozen-feature
evaluation (``--eval-every`` and the end of the run) still gathers the features on every rank.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T

import common
import runs
from clusterlearn.adapters import torch as clt
from clusterlearn.backend import exact_bytes
from clusterlearn.deepcluster import DeepClusterLabeler
from clusterlearn.deepcluster_shard import ShardedDeepClusterLabeler
from clusterlearn.sampler import ShardedUniformLabelSampler
from clusterlearn.shards import ShardLayout

METHOD = "deepcluster"
PRESETS = {
    "imagenet": {"epochs": 500, "batch_size": 256, "arch": "resnet50", "resolution": 224, "workers": 8,
                 "width": 64, "flip": True, "colour": True, "clusters": 10_000, "pca_dim": 256, "lr": 0.05, "min_scale": 0.08,
                 "sobel": False},
    "demo": {"epochs": 15, "batch_size": 64, "arch": "resnet18", "resolution": 16, "workers": 0,
             "width": 32, "flip": False, "colour": False, "clusters": 10, "pca_dim": 32, "lr": 0.05, "min_scale": 0.5,
             "sobel": False},
    # the demo's values (with runs.SMALL_DATA) behind the paper's Sobel filter, without which k-means of a
    # fresh network's features groups grey levels, not shapes (see the README's DeepCluster notes)
    "small": {"sobel": True},
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, with the ImageNet or demo preset filled in."""
    parser = common.PresetParser(PRESETS, description=__doc__)
    common.add_common_arguments(parser)
    parser.add_preset("--clusters", type=common.positive_int, help="k of k-means")
    parser.add_preset("--pca-dim", type=common.positive_int, help="PCA-whitened dimension before k-means")
    parser.add_preset("--lr", type=common.positive_float, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--weight-decay", type=common.positive_float, default=1e-5, help="(default: 1e-5)")
    parser.add_argument("--kmeans-backend", choices=["auto", "faiss", "array"], default="auto",
                        help="k-means implementation (auto: faiss when installed; default: auto)")
    parser.add_argument("--kmeans-iters", type=common.positive_int, default=20, help="(default: 20)")
    parser.add_preset("--min-scale", type=common.unit_float, help="smallest area fraction of a random resized crop")
    parser.add_preset("--sobel", action=argparse.BooleanOptionalAction,
                      help="a fixed Sobel filter in front of the network (the paper's; removes colour and brightness)")
    parser.add_argument("--shard-memory", action="store_true",
                        help="each process extracts, clusters and keeps only its block of the samples "
                             "(ShardedDeepClusterLabeler: PCA and k-means over all processes, the labels stay "
                             "split) and trains on draws from its own rows; the labels are checkpointed with "
                             "torch.distributed.checkpoint into deepcluster-labels-<epoch>/ next to the checkpoint")
    args = parser.parse_args(argv)
    if args.shard_memory and args.kmeans_backend == "faiss":
        parser.error("--kmeans-backend faiss: --shard-memory runs the array k-means over the processes")
    return parser, args


def augmentation(resolution: int, min_scale: float, flip: bool = True) -> T.Compose:
    """DeepCluster's training augmentation: random resized crop and (unless ``flip=False``) horizontal flip."""
    return T.Compose([T.RandomResizedCrop(resolution, scale=(min_scale, 1.0)),
                      *([T.RandomHorizontalFlip()] if flip else []), common.normalize()])


class Sobel(nn.Module):
    """The paper's fixed input filter: grey level (the mean of the channels), then its horizontal and
    vertical Sobel derivatives, (B, 3, H, W) -> (B, 2, H, W). It removes colour and uniform
    brightness, which k-means of a fresh network's features would otherwise cluster on."""

    def __init__(self) -> None:
        super().__init__()
        dx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("weight", torch.stack([dx, dx.T])[:, None].repeat(1, 3, 1, 1) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), padding=1)


def sobel_backbone(arch: str, small_input: bool, width: int) -> tuple[nn.Module, int]:
    """:func:`common.backbone` behind :class:`Sobel`, its first convolution taking the 2 derivatives."""
    net, features = common.backbone(arch, small_input, width)
    first = net.conv1
    net.conv1 = nn.Conv2d(2, first.out_channels, first.kernel_size, first.stride, first.padding, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(Sobel(), net), features


class DeepClusterNet(nn.Module):
    """Backbone (pooled features, what k-means clusters; behind a fixed Sobel filter with ``sobel``)
    and the k-way top layer."""

    def __init__(self, arch: str, num_clusters: int, small_input: bool = False, base_width: int = 64,
                 sobel: bool = False) -> None:
        super().__init__()
        build = sobel_backbone if sobel else common.backbone
        self.backbone, width = build(arch, small_input, base_width)
        self.top = nn.Linear(width, num_clusters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.backbone(x))


def recluster(net: DeepClusterNet, labeler: DeepClusterLabeler, loader: Any, n: int,
              ctx: common.DistContext, show: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """This epoch's pseudo-labels (N,) on every rank (k-means on rank 0) and the labeller's report."""
    common.broadcast_module(net, ctx)  # every rank extracts with rank 0's BatchNorm statistics
    started = time.perf_counter()
    feats = clt.extract_features(net.backbone, loader, device=ctx.device, progress=show)
    labels = torch.zeros(n, dtype=torch.int64)
    report: dict[str, Any] = {}
    if ctx.main:
        result = labeler(feats)
        labels = torch.as_tensor(result.labels, dtype=torch.int64).cpu()
        report = {"nmi_previous": result.nmi_previous, "empty_clusters_fixed": result.n_empty_fixed,
                  "kmeans_inertia": result.inertia}
    labels = common.broadcast_tensor(labels, ctx)
    report["cluster_seconds"] = time.perf_counter() - started
    return labels, report


def recluster_sharded(net: DeepClusterNet, labeler: ShardedDeepClusterLabeler, loader: Any,
                      ctx: common.DistContext, show: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """``--shard-memory``: this rank's (n_r,) pseudo-labels of its rows (``loader``'s samples) and
    the labeller's report (global: NMI to the previous epoch, inertia); a collective."""
    common.broadcast_module(net, ctx)  # every rank extracts with rank 0's BatchNorm statistics
    started = time.perf_counter()
    result = labeler(clt.extract_features(net.backbone, loader, device=ctx.device, progress=show, local=True))
    report = {"nmi_previous": result.nmi_previous, "empty_clusters_fixed": result.n_empty_fixed,
              "kmeans_inertia": result.inertia, "cluster_seconds": time.perf_counter() - started}
    return torch.as_tensor(result.labels, dtype=torch.int64).cpu(), report


class RankDraws(torch.utils.data.Sampler[int]):
    """``--shard-memory``'s training sampler: the draws of this rank's current
    :class:`~clusterlearn.sampler.ShardedUniformLabelSampler` (global indices of its own rows),
    ``num_samples`` per epoch on every rank (so DDP's steps stay in lock-step)."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.sampler: ShardedUniformLabelSampler | None = None

    def set(self, sampler: ShardedUniformLabelSampler, epoch: int) -> None:
        """Draw from ``sampler`` (this epoch's labels) at ``epoch`` from now on."""
        sampler.set_epoch(epoch)
        self.sampler = sampler

    def __iter__(self) -> Any:
        return iter(self.sampler.epoch_indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


def sharded_scores(labels: torch.Tensor, targets: np.ndarray, first: int, sizes: torch.Tensor,
                   num_clusters: int) -> dict[str, Any]:
    """``--shard-memory``: the epoch's NMI, ARI and ACC against the classes ``targets`` (N,) and
    the cluster size statistics, from this rank's ``labels`` of the samples ``first, first + 1, ...``
    (one all-reduce of the (classes, clusters) contingency table; a collective) and the global
    ``sizes`` (C,)."""
    classes = int(targets.max()) + 1
    mine = targets[first : first + labels.shape[0]].astype(np.int64)
    table = np.bincount(mine * num_clusters + labels.numpy(), minlength=classes * num_clusters)
    table = clt.psum()(torch.from_numpy(table.reshape(classes, num_clusters)))
    return runs.contingency_scores(table) | runs.sizes_record(sizes)


def replicated_fingerprint(labeler: DeepClusterLabeler) -> str:
    """SHA-256 of what every rank holds alike after a sharded clustering: the epoch count, the
    PCA's mean and projection and the k-means centroids (their exact bytes)."""
    digest = hashlib.sha256(str(labeler.epoch).encode())
    for x in (labeler.pca_.mean_, labeler.pca_.projection_, labeler.centroids_):
        name, shape, data = exact_bytes(x)
        digest.update(f"{name}{shape}".encode())
        digest.update(data)
    return digest.hexdigest()


#: Prefix of the directories of the sharded labels' checkpoints (``torch.distributed.checkpoint``).
LABELS_DIR = "deepcluster-labels"


def save_sharded_labels(labeler: ShardedDeepClusterLabeler, out: Path, epoch: int) -> dict[str, Any]:
    """Every process writes its rows' labels of the last clustering to ``out/deepcluster-labels-<epoch>/``
    (a collective; ``.metadata`` is written last, so a crash mid-write leaves a directory no checkpoint
    names); the checkpoint's ``labeler`` entry: the epoch count, N and that directory."""
    import torch.distributed.checkpoint as dcp

    directory = out / f"{LABELS_DIR}-{epoch}"
    labels = torch.from_numpy(labeler.state_dict()["previous_labels"])
    dcp.save({"labels": clt.row_sharded(labels, labeler.num_samples)}, checkpoint_id=str(directory),
             no_dist=labeler.num_shards == 1)
    return {"epoch": labeler.epoch, "num_samples": labeler.num_samples, "directory": str(directory.resolve())}


def load_sharded_labels(labeler: ShardedDeepClusterLabeler, entry: dict[str, Any], rows: int) -> None:
    """Restore the labeller from a checkpoint's ``labeler`` entry of :func:`save_sharded_labels`,
    this rank's ``rows`` labels read under any number of processes (a collective);
    :class:`runs.CheckpointError` if it does not fit."""
    import torch.distributed.checkpoint as dcp

    if not isinstance(entry.get("directory"), str):
        raise runs.CheckpointError("its labeler entry names no sharded labels directory (saved without --shard-memory?)")
    if entry.get("num_samples") != labeler.num_samples:
        raise runs.CheckpointError(f"its labels are of {entry.get('num_samples')} images, this run has {labeler.num_samples}")
    with runs.restoring("labeler"):
        target = {"labels": clt.row_sharded(torch.zeros(rows, dtype=torch.int64), labeler.num_samples)}
        dcp.load(target, checkpoint_id=entry["directory"], no_dist=labeler.num_shards == 1)
        labeler.load_state_dict({"epoch": entry["epoch"], "previous_labels": clt.local_rows(target["labels"])})


def reset_top_layer(net: DeepClusterNet, optimizer: torch.optim.Optimizer, ctx: common.DistContext) -> None:
    """Re-initialise the top layer (cluster ids are permuted between clusterings) and its momentum."""
    net.top.reset_parameters()
    for p in net.top.parameters():
        optimizer.state.pop(p, None)
    common.broadcast_module(net.top, ctx)


def train_epoch(model: nn.Module, labels: torch.Tensor, loader: Any, optimizer: torch.optim.Optimizer,
                ctx: common.DistContext, show: bool, desc: str, amp: bool = False, first: int = 0) -> dict[str, float]:
    """One epoch of cross-entropy on the pseudo-labels; the mean loss (over ranks) and throughput.

    ``labels[i]`` is the label of the sample ``first + i`` (``first`` > 0: a rank's block of
    the samples under ``--shard-memory``)."""
    model.train()
    loss_sum = torch.zeros((), device=ctx.device)
    steps, images = 0, 0
    start = time.perf_counter()
    for x, idx in common.progress(loader, show, desc):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.to(ctx.device, non_blocking=True))
        loss = F.cross_entropy(logits.float(), labels[idx - first].to(ctx.device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        steps += 1
        images += x.shape[0] * ctx.world_size
    seconds = time.perf_counter() - start
    (loss,) = common.mean_over_ranks([float(loss_sum) / steps], ctx)
    return {"loss": loss, "images_per_s": images / seconds, "train_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    common.launch(parser, args, args.clusters, run, ("model", "optimizer", "labeler"))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, data: common.ImageData,
        ckpt: dict[str, Any] | None, ctx: common.DistContext) -> None:
    """Train (or resume), log, checkpoint and plot."""
    common.seed_everything(args.seed, ctx)
    n = len(data)
    sharded = args.shard_memory
    layout = ShardLayout(n, ctx.world_size)  # --shard-memory: rank r's samples, rows [offset, offset + len(rows))
    offset = layout.start(ctx.rank)
    rows = range(offset, min(offset + layout.block, n))
    if sharded and layout.start(ctx.world_size - 1) >= n:
        parser.error(f"--shard-memory: {n} images in blocks of {layout.block} leave the last of the "
                     f"{ctx.world_size} processes none")
    if sharded:  # draws set each epoch, ceil(N / W) on every rank
        sampler: Any = RankDraws(layout.block)
    else:  # labels set each epoch
        sampler = clt.UniformClusterSampler(torch.zeros(n, dtype=torch.int64), n, seed=args.seed,
                                            num_replicas=ctx.world_size, rank=ctx.rank)
    train_loader, eval_loader = common.loaders(parser, args, data, augmentation(args.resolution, args.min_scale, args.flip), ctx, sampler)
    net = DeepClusterNet(args.arch, args.clusters, common.small_input(args.resolution), args.width, args.sobel).to(ctx.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    settings = {"pca_dim": args.pca_dim, "n_iter": args.kmeans_iters, "seed": args.seed}
    if sharded:
        labeler: DeepClusterLabeler = ShardedDeepClusterLabeler(
            args.clusters, offset=offset, num_samples=n, shard=ctx.rank, num_shards=ctx.world_size, psum=clt.psum(),
            **settings)
        own = DataLoader(Subset(eval_loader.dataset, rows), batch_size=eval_loader.batch_size,
                         num_workers=eval_loader.num_workers, pin_memory=eval_loader.pin_memory)
    else:
        labeler = DeepClusterLabeler(args.clusters, backend=args.kmeans_backend, **settings)
    training = args.eval_only is None
    random_init = copy.deepcopy(net.backbone) if ckpt is not None else net.backbone  # the random network baseline's weights
    start = 0
    if ckpt is not None:  # everything restored (and checked) before the run directory is touched
        common.restore(ckpt, {"model": net, "optimizer": optimizer, **({} if sharded else {"labeler": labeler})})
        if sharded:
            load_sharded_labels(labeler, ckpt["labeler"], len(rows))
        start = ckpt["epoch"]
    out = common.run_dir(args, METHOD)
    if sharded and ctx.world_size > 1:  # every rank writes into it: rank 0's (a timestamp may differ)
        names = [str(out)]
        torch.distributed.broadcast_object_list(names, 0)
        out = Path(names[0])
    log = common.metrics_log(args, out, ctx.main and training, resumed=ckpt is not None)
    show = args.progress and ctx.main
    evaluation = common.Evaluation(out, data, args, ctx, eval_loader, write=training)
    if ctx.main:
        print(f"DeepCluster: {data.name}, {n} images; {args.arch}, k = {args.clusters}, "
              f"{ctx.world_size} process(es) on {ctx.device}{', labels sharded' if sharded else ''}; "
              f"run directory {out}", flush=True)
    baselines = evaluation.baselines(random_init, fresh=ckpt is None)
    if ckpt is not None:
        common.resume_rng(ckpt, args.seed, ctx)
    if not training:
        record = {"epoch": start, **evaluation(net.backbone)}
        if sharded:
            final = torch.from_numpy(labeler.state_dict()["previous_labels"])
            record |= sharded_scores(final, data.targets, offset, labeler.cluster_sizes(final), args.clusters)
        elif ctx.main:
            record |= common.cluster_scores(data.targets, labeler.state_dict()["previous_labels"])
        if ctx.main:
            print(common.eval_only_lines("DeepCluster", "k-means labels", record, baselines), flush=True)
        return
    model = common.wrap_ddp(net, ctx)
    stop = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start, stop):
        started = time.perf_counter()
        if sharded:
            labels, report = recluster_sharded(net, labeler, own, ctx, show)
            sizes = labeler.cluster_sizes(labels)
            sampler.set(ShardedUniformLabelSampler(labels, sizes, offset=offset, num_samples=layout.block,
                                                   seed=args.seed, shard=ctx.rank), epoch)
        else:
            labels, report = recluster(net, labeler, eval_loader, n, ctx, show)
            sampler.set_labels(labels)
            sampler.set_epoch(epoch)
        reset_top_layer(net, optimizer, ctx)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **report}
        record |= train_epoch(model, labels, train_loader, optimizer, ctx, show, f"epoch {epoch + 1}/{args.epochs}",
                              args.amp, first=offset if sharded else 0)
        rng = common.all_rng_states(ctx)
        if common.eval_due(epoch + 1, stop, args.eval_every):
            evaluated = time.perf_counter()
            record |= evaluation(net.backbone) | {"eval_seconds": time.perf_counter() - evaluated}
        if sharded:  # collectives: the scores from all ranks' labels, every rank's labels saved
            record |= sharded_scores(labels, data.targets, offset, sizes, args.clusters)
            record["fingerprint"] = replicated_fingerprint(labeler)
            entry = save_sharded_labels(labeler, out, epoch + 1)
        if ctx.main:
            if not sharded:
                state = labeler.state_dict()
                entry = {"epoch": state["epoch"], "previous_labels": torch.from_numpy(state["previous_labels"])}
            common.save_checkpoint(out / common.CHECKPOINT, {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "rng": rng,
                "labeler": entry, "args": common.args_record(args),
            })
            if sharded:  # the checkpoint now names this epoch's labels: older ones can go
                for old in out.glob(f"{LABELS_DIR}-*"):
                    if old.name != Path(entry["directory"]).name:
                        shutil.rmtree(old, ignore_errors=True)
            else:
                record |= common.cluster_scores(data.targets, labels)
                record |= common.size_stats(labels, args.clusters)[1]
            record["seconds"] = time.perf_counter() - started
            log.write(record)
            print(common.epoch_line(record), flush=True)
    if sharded:  # each rank its rows of assignments.csv, and the global cluster sizes
        print(f"rank {ctx.rank}: DeepCluster replicated state fingerprint {replicated_fingerprint(labeler)}", flush=True)
        final = torch.from_numpy(labeler.state_dict()["previous_labels"])
        sizes = labeler.cluster_sizes(final).numpy()
        runs.write_assignment_part(out, data, final, offset, ctx.rank)
        if ctx.world_size > 1:
            torch.distributed.barrier()
    if ctx.main:
        records = log.read()
        if not sharded:
            final = labeler.state_dict()["previous_labels"]
            sizes = common.size_stats(final, args.clusters)[0]
        plot = common.plot_run(out, records, sizes, f"DeepCluster on {data.name}, {args.arch}, k = {args.clusters}",
                               baselines)
        assignments = runs.join_assignment_parts(out, ctx.world_size) if sharded else common.write_assignments(out, data, final)
        print(f"wrote {log.path}, {out / common.CHECKPOINT}, {plot}, {assignments}")
        print(common.summary_line("DeepCluster", "k-means labels", records[-1], baselines), flush=True)


if __name__ == "__main__":
    main()
