"""Online Deep Clustering (Zhan et al., CVPR 2020) with a torchvision ResNet, one process or many.

ImageNet (the paper's settings are the defaults: ResNet-50, 10,000 clusters, batch 512,
SGD lr 0.03, 400 epochs; 8 GPUs)::

    torchrun --nproc_per_node=8 examples/imagenet_odc_torch.py --data /path/to/imagenet/train

The demo (no --data): scikit-learn's 1797 digits upscaled to 16×16 RGB, a half-width ResNet-18
(32 channels in the first stage) with the small-image stem, no flips or hue/saturation
jitter, 10 clusters, 20 epochs on the CPU::

    python examples/imagenet_odc_torch.py

Training starts from k-means of the random network's features (eval mode, centre crops). For
``--label-warmup`` epochs (default 1) the network is trained on those labels while the
memory only collects its training-mode features of augmented views; then the centroids are
recomputed from them and re-labelling begins. Without the warm-up (``--label-warmup 0``, the
reference's schedule) the first epoch re-labels most samples against centroids of features
the training never produces (BatchNorm's statistics and the augmentation differ) and scrambles
the initial clustering (measured in docs/evaluation.md).

Each iteration: features ``f = neck(backbone(x))``, cross-entropy of ``head(f)`` against the
memory's labels (read before the update) weighted by ``w_c ∝ n_c^-1/2``, an optimiser step,
then ``odc.step(idx, f)`` (memory update, re-labelling, centroid refresh every 10 iterations,
small-cluster handling). Under torchrun every rank keeps an identical replica of the memories
(checked each epoch). Every ``--eval-every`` epochs and at the end, the backbone's pooled
features are evaluated on a fixed held-out split (k-NN, linear probe, k-means), next to the
randomly initialised network and the raw pixels. Writes ``metrics.jsonl``, ``checkpoint.pt``
(every epoch), ``split.npz``, ``baselines.json``, ``assignments.csv`` (the memory labels) and
``summary.png`` to the run directory; ``--resume <dir>/checkpoint.pt`` continues a run,
``--eval-only <dir>/checkpoint.pt`` evaluates it.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import transforms as T

import common
import runs
from clusterlearn.adapters import torch as clt

METHOD = "odc"
FEAT_DIM = 256
PRESETS = {
    "imagenet": {"epochs": 400, "batch_size": 512, "arch": "resnet50", "resolution": 224, "workers": 8,
                 "width": 64, "flip": True, "colour": True, "clusters": 10_000, "lr": 0.03, "lr_steps": [360], "min_scale": 0.08},
    "demo": {"epochs": 20, "batch_size": 64, "arch": "resnet18", "resolution": 16, "workers": 0,
             "width": 32, "flip": False, "colour": False, "clusters": 10, "lr": 0.03, "lr_steps": [16], "min_scale": 0.5},
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, with the ImageNet or demo preset filled in."""
    parser = common.PresetParser(PRESETS, description=__doc__)
    common.add_common_arguments(parser)
    parser.add_preset("--clusters", type=common.positive_int, help="number of clusters C")
    parser.add_preset("--lr", type=common.positive_float, help="SGD learning rate (momentum 0.9)")
    parser.add_preset("--lr-steps", type=common.positive_int_list, help="epochs after which the lr drops ×0.1")
    parser.add_argument("--weight-decay", type=common.positive_float, default=1e-4, help="(default: 1e-4)")
    parser.add_argument("--momentum-memory", type=common.unit_float, default=0.5,
                        help="weight of the fresh feature in the sample memory (default: 0.5)")
    parser.add_argument("--min-cluster-size", type=common.non_negative_int, default=20,
                        help="clusters below this are dissolved and re-seeded (default: 20)")
    parser.add_argument("--centroid-interval", type=common.positive_int, default=10,
                        help="refresh all centroids every this many iterations (default: 10)")
    parser.add_argument("--memory-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the sample memory's features and the centroids (the per-cluster sums "
                        "stay float64; default: float32)")
    parser.add_preset("--min-scale", type=common.unit_float, help="smallest area fraction of a random resized crop")
    parser.add_argument("--shard-memory", action="store_true",
                        help="each process holds 1/world of the sample memory's rows (ShardedOnlineDeepClustering; "
                             "labels and centroids stay replicated); the memory is checkpointed with "
                             "torch.distributed.checkpoint into odc-memory-<epoch>/ next to the checkpoint")
    parser.add_argument("--label-warmup", type=common.non_negative_int, default=1, metavar="EPOCHS",
                        help="epochs trained on the initial clustering without re-labelling, the memory's features "
                        "still updated; then the centroids are recomputed from them (default: 1; 0: ODC from the "
                        "first iteration, as the reference)")
    return parser, parser.parse_args(argv)


def augmentation(resolution: int, min_scale: float, flip: bool = True, colour: bool = True) -> T.Compose:
    """ODC's augmentation: random resized crop, flip, rotation ±2°, colour jitter, grey p = 0.2.

    ``flip=False`` drops the flip; ``colour=False`` keeps only brightness and contrast jitter.
    """
    return T.Compose([
        T.RandomResizedCrop(resolution, scale=(min_scale, 1.0)),
        *([T.RandomHorizontalFlip()] if flip else []),
        T.RandomRotation(2),
        T.ColorJitter(brightness=0.4, contrast=0.4, **({"saturation": 1.0, "hue": 0.5} if colour else {})),
        *([T.RandomGrayscale(p=0.2)] if colour else []),
        common.normalize(),
    ])


class ODCNet(nn.Module):
    """Backbone, ODC's non-linear neck (width → width → 256) and the C-way linear head."""

    def __init__(self, arch: str, num_clusters: int, small_input: bool = False, base_width: int = 64) -> None:
        super().__init__()
        self.backbone, width = common.backbone(arch, small_input, base_width)
        self.neck = clt.ODCNeck(width, width, FEAT_DIM)
        self.head = clt.ODCHead(FEAT_DIM, num_clusters)

    def features(self) -> nn.Module:
        """The module mapping images to the memory's features (shares this net's weights)."""
        return nn.Sequential(self.backbone, self.neck)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.neck(self.backbone(x))
        return f, self.head(f)


def gathered(x: torch.Tensor, ctx: common.DistContext) -> torch.Tensor:
    """``x`` of every rank concatenated in rank order (``x`` itself with one process)."""
    if ctx.world_size == 1:
        return x
    x = x.to(ctx.device)
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(parts, x)
    return torch.cat(parts)


def train_epoch(model: nn.Module, odc: clt.OnlineDeepClustering, loader: Any, optimizer: torch.optim.Optimizer,
                ctx: common.DistContext, show: bool, desc: str, amp: bool = False,
                relabel: bool = True, momentum: float = 0.5) -> dict[str, float]:
    """One epoch of ODC iterations; the mean loss (over ranks), change ratio and throughput.

    ``relabel=False`` (a label warm-up epoch): the loss is taken against the memory's labels as
    usual, but instead of ``odc.step`` only the features are updated, ``F[idx] ← normalise(m ·
    normalise(f) + (1 − m) · F[idx])`` with ``m = momentum`` on a float32 copy of the memory (the
    global batch under torchrun); at the end the memory is re-filled from that copy with the
    labels unchanged, so the centroids become the means of the training-mode features.
    """
    model.train()
    sharded = isinstance(odc, clt.ShardedOnlineDeepClustering)
    if not relabel:  # this process's rows (all N unless the memory is sharded)
        memory = (odc.local_features() if sharded else odc.features).to(torch.float32, copy=True)
        first = odc.offset if sharded else 0
    loss_sum = torch.zeros((), device=ctx.device)
    change_sum, small, steps, images = 0.0, 0, 0, 0
    start = time.perf_counter()
    for x, idx in common.progress(loader, show, desc):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            feats, logits = model(x.to(ctx.device, non_blocking=True))
        feats, logits = feats.float(), logits.float()  # loss and memory in float32 under --amp
        loss = clt.ODCHead.loss(logits, idx, odc)  # labels read before this iteration's update
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if relabel:
            stats = odc.step(idx, feats)
        else:
            i, f = gathered(idx, ctx).to(memory.device), gathered(feats.detach(), ctx).to(memory.device)
            own = (i >= first) & (i < first + memory.shape[0])
            i, f = i[own] - first, torch.nn.functional.normalize(f[own], dim=1)
            memory[i] = torch.nn.functional.normalize(momentum * f + (1 - momentum) * memory[i], dim=1)
            stats = {"change_ratio": 0.0, "num_small_clusters": 0}
        loss_sum += loss.detach()
        change_sum += stats["change_ratio"]
        small += stats["num_small_clusters"]
        steps += 1
        images += x.shape[0] * ctx.world_size
    if not relabel:
        odc.initialize(memory.to(odc.dtype if sharded else odc.features.dtype), odc.labels)
    seconds = time.perf_counter() - start
    (loss,) = common.mean_over_ranks([float(loss_sum) / steps], ctx)
    return {"loss": loss, "change_ratio": change_sum / steps, "small_clusters_dissolved": small,
            "images_per_s": images / seconds, "train_seconds": seconds}


#: Prefix of the directories of a sharded memory's checkpoints (``torch.distributed.checkpoint``).
MEMORY_DIR = "odc-memory"


def save_sharded_memory(odc: clt.ShardedOnlineDeepClustering, out: Path, epoch: int) -> dict[str, str]:
    """Every process writes its rows to ``out/odc-memory-<epoch>/`` (a collective); the
    checkpoint's ``odc`` entry names that directory (``.metadata`` is written last, so a crash
    mid-write leaves a directory no checkpoint names)."""
    directory = out / f"{MEMORY_DIR}-{epoch}"
    odc.save(directory)
    return {"directory": str(directory.resolve())}


def sharded_memory_dir(ckpt: dict[str, Any]) -> Path:
    """The sharded memory's directory a checkpoint names (:class:`runs.CheckpointError` if none)."""
    entry = ckpt["odc"]
    if not isinstance(entry.get("directory"), str):
        raise runs.CheckpointError("its odc entry names no sharded memory directory (saved without --shard-memory?)")
    return Path(entry["directory"])


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    min_images = args.clusters * max(args.min_cluster_size, 1)
    common.launch(parser, args, min_images, run, ("model", "optimizer", "scheduler", "odc"))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, data: common.ImageData,
        ckpt: dict[str, Any] | None, ctx: common.DistContext) -> None:
    """Initialise (or resume), train, log, checkpoint and plot."""
    common.seed_everything(args.seed, ctx)
    train_loader, eval_loader = common.loaders(parser, args, data, augmentation(args.resolution, args.min_scale, args.flip, args.colour), ctx)
    net = ODCNet(args.arch, args.clusters, common.small_input(args.resolution), args.width).to(ctx.device)
    common.broadcast_module(net, ctx)  # ranks seed differently: extract the initial features with rank 0's net
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    steps = sorted(args.lr_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.1 ** sum(e >= s for s in steps))
    memory_class = clt.ShardedOnlineDeepClustering if args.shard_memory else clt.OnlineDeepClustering
    odc = memory_class(
        len(data), args.clusters, FEAT_DIM, device=ctx.device, dtype=getattr(torch, args.memory_dtype),
        momentum=args.momentum_memory,
        min_cluster_size=args.min_cluster_size, centroid_update_interval=args.centroid_interval, seed=args.seed,
    )
    training = args.eval_only is None
    random_init = copy.deepcopy(net.backbone) if ckpt is not None else net.backbone  # the random network baseline's weights
    start = 0
    if ckpt is not None:  # everything restored (and checked) before the run directory is touched
        common.restore(ckpt, {"model": net, "optimizer": optimizer, "scheduler": scheduler,
                              **({} if args.shard_memory else {"odc": odc})})
        if args.shard_memory:
            odc.load(sharded_memory_dir(ckpt))
        start = ckpt["epoch"]
    out = common.run_dir(args, METHOD)
    log = common.metrics_log(args, out, ctx.main and training, resumed=ckpt is not None)
    show = args.progress and ctx.main
    evaluation = common.Evaluation(out, data, args, ctx, eval_loader, write=training)
    if ctx.main:
        print(f"ODC: {data.name}, {len(data)} images; {args.arch}, {args.clusters} clusters, "
              f"{ctx.world_size} process(es) on {ctx.device}; run directory {out}", flush=True)
    baselines = evaluation.baselines(random_init, fresh=ckpt is None)
    if ckpt is None:
        if args.shard_memory:  # each process extracts its own rows only; k-means runs over all of them
            rows = torch.utils.data.Subset(eval_loader.dataset, odc.shard_indices().tolist())
            local = torch.utils.data.DataLoader(rows, batch_size=eval_loader.batch_size, num_workers=eval_loader.num_workers)
            odc.initialize(clt.extract_features(net.features(), local, device=ctx.device, progress=show, local=True))
        else:
            odc.initialize(clt.extract_features(net.features(), eval_loader, device=ctx.device, progress=show))
        if ctx.main:
            scores = common.cluster_scores(data.targets, odc.labels)
            print(f"initial k-means on the random network's features: NMI {scores['nmi']:.3f}  ACC {scores['acc']:.3f}", flush=True)
    else:
        common.resume_rng(ckpt, args.seed, ctx)
    if not training:
        record = {"epoch": start, **evaluation(net.backbone)}
        if ctx.main:
            record |= common.cluster_scores(data.targets, odc.labels)
            print(common.eval_only_lines("ODC", "memory labels", record, baselines), flush=True)
        return
    model = common.wrap_ddp(net, ctx)
    stop = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start, stop):
        train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        record |= train_epoch(model, odc, train_loader, optimizer, ctx, show, f"epoch {epoch + 1}/{args.epochs}", args.amp,
                              relabel=epoch >= args.label_warmup, momentum=args.momentum_memory)
        odc.check_consistency()  # raises if any rank's memories differ from rank 0's
        scheduler.step()
        rng = common.all_rng_states(ctx)
        if common.eval_due(epoch + 1, stop, args.eval_every):
            evaluated = time.perf_counter()
            record |= evaluation(net.backbone) | {"eval_seconds": time.perf_counter() - evaluated}
        memory = odc.state_dict() if not args.shard_memory else save_sharded_memory(odc, out, epoch + 1)
        if ctx.main:
            common.save_checkpoint(out / common.CHECKPOINT, {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "odc": memory, "epoch": epoch + 1, "rng": rng, "args": common.args_record(args),
            })
            if args.shard_memory:  # the checkpoint now names this epoch's memory: older ones can go
                for old in out.glob(f"{MEMORY_DIR}-*"):
                    if old.name != Path(memory["directory"]).name:
                        shutil.rmtree(old, ignore_errors=True)
            record |= common.cluster_scores(data.targets, odc.labels)
            record |= common.size_stats(odc.labels, args.clusters)[1]
            record |= {"fingerprint": odc.fingerprint(), "seconds": time.perf_counter() - started}
            log.write(record)
            print(common.epoch_line(record), flush=True)
    print(f"rank {ctx.rank}: ODC memory fingerprint {odc.fingerprint()}", flush=True)
    if ctx.main:
        records = log.read()
        sizes = odc.cluster_sizes.cpu().numpy()
        plot = common.plot_run(out, records, sizes, f"ODC on {data.name}, {args.arch}, C = {args.clusters}", baselines)
        assignments = common.write_assignments(out, data, odc.labels)
        print(f"wrote {log.path}, {out / common.CHECKPOINT}, {plot}, {assignments}")
        print(common.summary_line("ODC", "memory labels", records[-1], baselines), flush=True)


if __name__ == "__main__":
    main()
