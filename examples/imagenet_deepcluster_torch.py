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
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

import common
from clusterlearn.adapters import torch as clt
from clusterlearn.deepcluster import DeepClusterLabeler

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
    return parser, parser.parse_args(argv)


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


def reset_top_layer(net: DeepClusterNet, optimizer: torch.optim.Optimizer, ctx: common.DistContext) -> None:
    """Re-initialise the top layer (cluster ids are permuted between clusterings) and its momentum."""
    net.top.reset_parameters()
    for p in net.top.parameters():
        optimizer.state.pop(p, None)
    common.broadcast_module(net.top, ctx)


def train_epoch(model: nn.Module, labels: torch.Tensor, loader: Any, optimizer: torch.optim.Optimizer,
                ctx: common.DistContext, show: bool, desc: str, amp: bool = False) -> dict[str, float]:
    """One epoch of cross-entropy on the pseudo-labels; the mean loss (over ranks) and throughput."""
    model.train()
    loss_sum = torch.zeros((), device=ctx.device)
    steps, images = 0, 0
    start = time.perf_counter()
    for x, idx in common.progress(loader, show, desc):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x.to(ctx.device, non_blocking=True))
        loss = F.cross_entropy(logits.float(), labels[idx].to(ctx.device, non_blocking=True))
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
    sampler = clt.UniformClusterSampler(torch.zeros(n, dtype=torch.int64), n, seed=args.seed,
                                        num_replicas=ctx.world_size, rank=ctx.rank)  # labels set each epoch
    train_loader, eval_loader = common.loaders(parser, args, data, augmentation(args.resolution, args.min_scale, args.flip), ctx, sampler)
    net = DeepClusterNet(args.arch, args.clusters, common.small_input(args.resolution), args.width, args.sobel).to(ctx.device)
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    labeler = DeepClusterLabeler(args.clusters, pca_dim=args.pca_dim, n_iter=args.kmeans_iters, seed=args.seed,
                                 backend=args.kmeans_backend)
    training = args.eval_only is None
    random_init = copy.deepcopy(net.backbone) if ckpt is not None else net.backbone  # the random network baseline's weights
    start = 0
    if ckpt is not None:  # everything restored (and checked) before the run directory is touched
        common.restore(ckpt, {"model": net, "optimizer": optimizer, "labeler": labeler})
        start = ckpt["epoch"]
    out = common.run_dir(args, METHOD)
    log = common.metrics_log(args, out, ctx.main and training, resumed=ckpt is not None)
    show = args.progress and ctx.main
    evaluation = common.Evaluation(out, data, args, ctx, eval_loader, write=training)
    if ctx.main:
        print(f"DeepCluster: {data.name}, {n} images; {args.arch}, k = {args.clusters}, "
              f"{ctx.world_size} process(es) on {ctx.device}; run directory {out}", flush=True)
    baselines = evaluation.baselines(random_init, fresh=ckpt is None)
    if ckpt is not None:
        common.resume_rng(ckpt, args.seed, ctx)
    if not training:
        record = {"epoch": start, **evaluation(net.backbone)}
        if ctx.main:
            record |= common.cluster_scores(data.targets, labeler.state_dict()["previous_labels"])
            print(common.eval_only_lines("DeepCluster", "k-means labels", record, baselines), flush=True)
        return
    model = common.wrap_ddp(net, ctx)
    stop = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start, stop):
        started = time.perf_counter()
        labels, report = recluster(net, labeler, eval_loader, n, ctx, show)
        sampler.set_labels(labels)
        sampler.set_epoch(epoch)
        reset_top_layer(net, optimizer, ctx)
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **report}
        record |= train_epoch(model, labels, train_loader, optimizer, ctx, show, f"epoch {epoch + 1}/{args.epochs}", args.amp)
        rng = common.all_rng_states(ctx)
        if common.eval_due(epoch + 1, stop, args.eval_every):
            evaluated = time.perf_counter()
            record |= evaluation(net.backbone) | {"eval_seconds": time.perf_counter() - evaluated}
        if ctx.main:
            state = labeler.state_dict()
            common.save_checkpoint(out / common.CHECKPOINT, {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "rng": rng,
                "labeler": {"epoch": state["epoch"], "previous_labels": torch.from_numpy(state["previous_labels"])},
                "args": common.args_record(args),
            })
            record |= common.cluster_scores(data.targets, labels)
            record |= common.size_stats(labels, args.clusters)[1]
            record["seconds"] = time.perf_counter() - started
            log.write(record)
            print(common.epoch_line(record), flush=True)
    if ctx.main:
        records = log.read()
        final = labeler.state_dict()["previous_labels"]
        sizes = common.size_stats(final, args.clusters)[0]
        plot = common.plot_run(out, records, sizes, f"DeepCluster on {data.name}, {args.arch}, k = {args.clusters}",
                               baselines)
        assignments = common.write_assignments(out, data, final)
        print(f"wrote {log.path}, {out / common.CHECKPOINT}, {plot}, {assignments}")
        print(common.summary_line("DeepCluster", "k-means labels", records[-1], baselines), flush=True)


if __name__ == "__main__":
    main()
