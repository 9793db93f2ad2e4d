"""Self-Classifier (Amrani et al., ECCV 2022) with a torchvision ResNet, one process or many.

ImageNet (the paper's settings are the defaults: ResNet-50, projection MLP 2048 → 4096 (3
layers) → 128, four bias-free heads of 1,000 / 2,000 / 4,000 / 8,000 classes, τ_row 0.1,
τ_col 0.05, eps 1e-12, multi-crop 2×224 + 6×96 with BYOL-style augmentation, LARS with weight
decay 1e-6, batch 4096, lr 4.8 (0.3 per 256 images) with warm-up then cosine to lr/1000, 800
epochs; the paper's nearest-neighbour augmentation is not implemented)::

    torchrun --nproc_per_node=8 examples/imagenet_selfclassifier_torch.py --data /path/to/imagenet/train

The demo (no --data): scikit-learn's 1797 digits upscaled to 16×16 RGB, a quarter-width
ResNet-18 (16 channels in the first stage) with the small-image stem, no flips or
hue/saturation jitter, global crops of at least half the image (a 14 % crop of a 16 px
digit is a blob), heads of 10 / 20 / 40 / 80 classes, 24 epochs of batch 128 on the CPU
(about 5 minutes on one thread). Its LARS lr is 2.4 (base 4.8, 16× the paper's per-256 rate):
the trust ratio moves each weight by about lr × 0.001 of its norm per step, and with only
14 steps per epoch the paper's rate leaves the logits near uniform (the loss stays at the
mean log C of the heads)::

    python examples/imagenet_selfclassifier_torch.py

The loss sees the global batch under torchrun (the adapter's loss gathers the logits with a
gradient). Metrics use the argmax of the first head on un-augmented images (one extra
inference pass per epoch). Every ``--eval-every`` epochs and at the end, the backbone's
pooled features (before the projection) are evaluated on a fixed held-out split (k-NN, linear
probe, k-means), next to the randomly initialised network and the raw pixels. Writes
``metrics.jsonl``, ``checkpoint.pt`` (every epoch), ``split.npz``, ``baselines.json``,
``assignments.csv`` (the first head's argmax) and ``summary.png`` to the run directory;
``--resume <dir>/checkpoint.pt`` continues a run, ``--eval-only <dir>/checkpoint.pt`` evaluates it.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision import transforms as T

import common
from clusterlearn.adapters import torch as clt

METHOD = "selfclassifier"
#: Classes of the heads as multiples of the first's (``--clusters``), as the paper's 1,000 / 2,000 / 4,000 / 8,000.
HEAD_MULTIPLES = (1, 2, 4, 8)
PRESETS = {
    "imagenet": {"epochs": 800, "batch_size": 4096, "arch": "resnet50", "resolution": 224, "workers": 8,
                 "width": 64, "flip": True, "colour": True, "clusters": 1000, "hidden_dim": 4096, "proj_layers": 3, "local_crops": 6,
                 "base_lr": 0.3, "warmup_epochs": 10, "min_scale": 0.14},
    "demo": {"epochs": 24, "batch_size": 128, "arch": "resnet18", "resolution": 16, "workers": 0,
             "width": 16, "flip": False, "colour": False, "clusters": 10, "hidden_dim": 512, "proj_layers": 2, "local_crops": 0,
             "base_lr": 4.8, "warmup_epochs": 1, "min_scale": 0.5},
}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, with the ImageNet or demo preset filled in."""
    parser = common.PresetParser(PRESETS, description=__doc__)
    common.add_common_arguments(parser)
    parser.add_preset("--clusters", type=common.positive_int,
                      help="classes of the first head, the one scored; the other heads have 2, 4 and 8 times as many "
                      "(the paper's 1,000 to 8,000 on ImageNet)")
    parser.add_argument("--classes", type=common.positive_int_list,
                        help="classes of each head, e.g. 10,20,40,80; the first is scored (default: --clusters × 1, 2, 4, 8; "
                        "given, it replaces them and --clusters becomes its first entry)")
    parser.add_preset("--hidden-dim", type=common.positive_int, help="width of the projection MLP")
    parser.add_argument("--out-dim", type=common.positive_int, default=128, help="projection output (default: 128)")
    parser.add_preset("--proj-layers", type=common.positive_int, help="hidden layers of the projection MLP")
    parser.add_preset("--local-crops", type=common.non_negative_int, help="local views (3/7 of the resolution) besides the 2 global ones")
    parser.add_preset("--base-lr", type=common.positive_float, help="LARS lr per 256 images (lr = base × batch / 256)")
    parser.add_preset("--min-scale", type=common.unit_float, help="smallest area fraction of a global crop")
    parser.add_preset("--warmup-epochs", type=common.non_negative_int, help="linear warm-up before the cosine decay")
    parser.add_argument("--weight-decay", type=common.positive_float, default=1e-6, help="(default: 1e-6)")
    parser.add_argument("--row-temperature", type=common.positive_float, default=0.1, help="τ_row (default: 0.1)")
    parser.add_argument("--col-temperature", type=common.positive_float, default=0.05, help="τ_col (default: 0.05)")
    args = parser.parse_args(argv)
    if args.classes is None:
        args.classes = [args.clusters * m for m in HEAD_MULTIPLES]
    args.clusters = args.classes[0]
    if any(c < 2 for c in args.classes):
        parser.error(f"--classes: every head needs at least 2 classes, got {common.format_value(args.classes)}")
    return parser, args


def view_transform(size: int, scale: tuple[float, float], blur: float, solarize: float,
                   flip: bool = True, colour: bool = True) -> T.Compose:
    """One BYOL-style view: crop, flip, colour jitter (p 0.8), grey (p 0.2), blur, solarisation.

    ``flip=False`` drops the flip; ``colour=False`` keeps only brightness and contrast jitter.
    """
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, about a tenth of the crop (23 at 224)
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale),
        *([T.RandomHorizontalFlip()] if flip else []),
        T.RandomApply([T.ColorJitter(0.4, 0.4, *((0.2, 0.1) if colour else ()))], p=0.8),
        *([T.RandomGrayscale(p=0.2)] if colour else []),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur),
        T.RandomSolarize(128, p=solarize),
        common.normalize(),
    ])


class MultiCrop:
    """Two global views (area ``[min_scale, 1]``, blur p 1.0 / 0.1, solarise p 0 / 0.2) and
    ``local`` small views (area ``[0.05, 0.14]``, blur p 0.5)."""

    def __init__(self, resolution: int, local: int, flip: bool = True, colour: bool = True,
                 min_scale: float = 0.14) -> None:
        small = max(8, round(resolution * 96 / 224))
        self.views: list[Callable[[Image.Image], torch.Tensor]] = [
            view_transform(resolution, (min_scale, 1.0), 1.0, 0.0, flip, colour),
            view_transform(resolution, (min_scale, 1.0), 0.1, 0.2, flip, colour),
            *[view_transform(small, (0.05, 0.14), 0.5, 0.0, flip, colour)] * local,
        ]

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [view(image) for view in self.views]


class SelfClassifierNet(nn.Module):
    """Backbone and the adapter's projection + heads; ``forward(views)`` gives per-head lists of per-view logits."""

    def __init__(self, arch: str, classes: list[int], hidden_dim: int, out_dim: int, layers: int,
                 small_input: bool = False, base_width: int = 64) -> None:
        super().__init__()
        self.backbone, width = common.backbone(arch, small_input, base_width)
        self.head = clt.SelfClassifierHead(width, hidden_dim, out_dim, classes, num_layers=layers)

    def forward(self, views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        per_head: list[list[torch.Tensor]] = [[] for _ in self.head.heads]
        for group in _same_size_runs(views):  # one backbone pass per crop size
            logits = self.head(self.backbone(torch.cat(group)))
            for out, h in zip(per_head, logits):
                out.extend(h.chunk(len(group)))
        return per_head


def _same_size_runs(views: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """Consecutive views of equal shape, grouped."""
    run: list[torch.Tensor] = []
    for v in views:
        if run and v.shape != run[0].shape:
            yield run
            run = []
        run.append(v)
    yield run


class FirstHeadLogits(nn.Module):
    """Images → logits of the first head (what the metrics score)."""

    def __init__(self, net: SelfClassifierNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.net.backbone(x))[0]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    Weights (≥ 2-D) get weight decay and the trust ratio ``eta·‖w‖/‖g + wd·w‖``; biases and
    normalisation parameters (1-D) get neither, as in the reference trainings.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float,
                 momentum: float = 0.9, eta: float = 0.001) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def warmup_cosine(warmup: int, epochs: int, final: float = 1e-3) -> Callable[[int], float]:
    """lr factor per epoch: linear warm-up over ``warmup`` epochs, then cosine from 1 to ``final``."""
    def factor(epoch: int) -> float:
        if epoch < warmup:
            return (epoch + 1) / warmup
        t = (epoch - warmup) / max(epochs - warmup, 1)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


def train_epoch(model: nn.Module, criterion: nn.Module, loader: Any, optimizer: torch.optim.Optimizer,
                ctx: common.DistContext, show: bool, desc: str, amp: bool = False) -> dict[str, float]:
    """One epoch of the Self-Classifier loss over all views; mean loss (over ranks) and throughput."""
    model.train()
    loss_sum = torch.zeros((), device=ctx.device)
    steps, images = 0, 0
    start = time.perf_counter()
    for views, _ in common.progress(loader, show, desc):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model([v.to(ctx.device, non_blocking=True) for v in views])
        loss = criterion([[v.float() for v in head] for head in logits])  # the loss in float32 under --amp
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        steps += 1
        images += views[0].shape[0] * ctx.world_size
    seconds = time.perf_counter() - start
    (loss,) = common.mean_over_ranks([float(loss_sum) / steps], ctx)
    return {"loss": loss, "images_per_s": images / seconds, "train_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    common.launch(parser, args, args.classes[0], run, ("model", "optimizer", "scheduler"))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, data: common.ImageData,
        ckpt: dict[str, Any] | None, ctx: common.DistContext) -> None:
    """Train (or resume), log, checkpoint and plot."""
    common.seed_everything(args.seed, ctx)
    train_loader, eval_loader = common.loaders(parser, args, data, MultiCrop(args.resolution, args.local_crops, args.flip, args.colour, args.min_scale), ctx)
    net = SelfClassifierNet(args.arch, args.classes, args.hidden_dim, args.out_dim, args.proj_layers,
                            common.small_input(args.resolution), args.width)
    if ctx.device.type == "cuda" and ctx.world_size > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net.to(ctx.device)
    lr = args.base_lr * args.batch_size / 256
    optimizer = LARS(net.parameters(), lr=lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.warmup_epochs, args.epochs))
    criterion = clt.SelfClassifierLoss(args.row_temperature, args.col_temperature, eps=1e-12)
    training = args.eval_only is None
    random_init = copy.deepcopy(net.backbone) if ckpt is not None else net.backbone  # the random network baseline's weights
    start = 0
    if ckpt is not None:  # everything restored (and checked) before the run directory is touched
        common.restore(ckpt, {"model": net, "optimizer": optimizer, "scheduler": scheduler})
        start = ckpt["epoch"]
    out = common.run_dir(args, METHOD)
    log = common.metrics_log(args, out, ctx.main and training, resumed=ckpt is not None)
    show = args.progress and ctx.main
    scored = args.classes[0]
    evaluation = common.Evaluation(out, data, args, ctx, eval_loader, write=training)
    if ctx.main:
        print(f"Self-Classifier: {data.name}, {len(data)} images; {args.arch}, heads {common.format_value(args.classes)}, "
              f"lr {lr:g}, {ctx.world_size} process(es) on {ctx.device}; run directory {out}", flush=True)
    baselines = evaluation.baselines(random_init, fresh=ckpt is None)
    if ckpt is not None:
        common.resume_rng(ckpt, args.seed, ctx)
    labels_name = f"{scored}-class head argmax"
    if not training:
        record = {"epoch": start, **evaluation(net.backbone)}
        common.broadcast_module(net, ctx)
        predicted = clt.extract_features(FirstHeadLogits(net), eval_loader, device=ctx.device, progress=show).argmax(1)
        if ctx.main:
            record |= common.cluster_scores(data.targets, predicted)
            print(common.eval_only_lines("Self-Classifier", labels_name, record, baselines), flush=True)
        return
    model = common.wrap_ddp(net, ctx)
    stop = min(args.epochs, args.stop_after or args.epochs)
    sizes = None
    for epoch in range(start, stop):
        train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        record |= train_epoch(model, criterion, train_loader, optimizer, ctx, show, f"epoch {epoch + 1}/{args.epochs}", args.amp)
        scheduler.step()
        common.broadcast_module(net, ctx)  # score rank 0's BatchNorm statistics on every shard
        predicted = clt.extract_features(FirstHeadLogits(net), eval_loader, device=ctx.device, progress=show).argmax(1)
        rng = common.all_rng_states(ctx)
        if common.eval_due(epoch + 1, stop, args.eval_every):
            evaluated = time.perf_counter()
            record |= evaluation(net.backbone) | {"eval_seconds": time.perf_counter() - evaluated}
        if ctx.main:
            common.save_checkpoint(out / common.CHECKPOINT, {
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1, "rng": rng, "args": common.args_record(args),
            })
            record |= common.cluster_scores(data.targets, predicted)
            sizes, size_record = common.size_stats(predicted, scored)
            record |= size_record
            record["seconds"] = time.perf_counter() - started
            log.write(record)
            print(common.epoch_line(record), flush=True)
    if ctx.main and sizes is not None:
        records = log.read()
        plot = common.plot_run(out, records, sizes, f"Self-Classifier on {data.name}, {args.arch}, first head C = {scored}",
                               baselines)
        assignments = common.write_assignments(out, data, predicted)
        print(f"wrote {log.path}, {out / common.CHECKPOINT}, {plot}, {assignments}")
        print(common.summary_line("Self-Classifier", labels_name, records[-1], baselines), flush=True)


if __name__ == "__main__":
    main()
