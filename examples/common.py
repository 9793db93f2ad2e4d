"""Shared parts of the PyTorch training examples (ODC, DeepCluster, Self-Classifier).

The framework-free parts (data, command line with ImageNet and demo presets, run directory
with its ``metrics.jsonl`` and summary plot, scores) live in :mod:`runs`, shared with the JAX
examples, and are re-exported here. This module adds what needs torch: the data loaders and
torchvision transforms, the ResNet backbone, ``torch.distributed`` set-up, atomic checkpoints
that load with ``torch.load(weights_only=True)``, the RNG state that makes ``--resume``
continue bit-exactly on CPU, and :class:`Evaluation` (frozen features extracted on every rank,
scored on rank 0, the training's random streams untouched).

The scripts import it as ``import common`` (``python examples/x.py`` puts ``examples/`` on
``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import runs
from clusterlearn.adapters import torch as clt
from runs import (  # noqa: F401  (re-exported for the scripts)
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageData,
    MetricsLog,
    PresetParser,
    args_record,
    cluster_scores,
    epoch_line,
    eval_due,
    eval_only_lines,
    format_value,
    non_negative_int,
    open_data,
    plot_run,
    positive_float,
    positive_int,
    positive_int_list,
    progress,
    run_dir,
    size_stats,
    summary_line,
    unit_float,
    write_assignments,
)

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CHECKPOINT = "checkpoint.pt"
#: Default of ``--dist-timeout`` in seconds (torch's own default is 30 minutes for gloo, 10 for NCCL).
DIST_TIMEOUT = 300.0


# ---------------------------------------------------------------------------- command line

def add_common_arguments(parser: PresetParser) -> None:
    """The options shared with the JAX examples, plus the torch backbone's and augmentations'."""
    runs.add_common_arguments(parser, ARCHS, workers_help="data-loading processes per training process")
    parser.add_preset("--width", type=positive_int, help="channels of the ResNet's stem and first stage "
                      "(torchvision's: 64; later stages double it)")
    parser.add_preset("--flip", action=argparse.BooleanOptionalAction,
                      help="random horizontal flips (off for digits: a flip changes what they show)")
    parser.add_preset("--colour", action=argparse.BooleanOptionalAction,
                      help="saturation/hue jitter and random greyscale of ODC and Self-Classifier (DeepCluster has none; "
                      "no-ops on grey images)")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: the forward pass under bfloat16 autocast (CPU and CUDA); "
                        "losses, gradients' accumulation and the clustering state stay float32")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write metrics.jsonl's numbers as TensorBoard scalars to <out>/tensorboard "
                        "(needs the tensorboard package)")
    parser.add_argument("--dist-timeout", type=positive_float, default=DIST_TIMEOUT, metavar="SECONDS",
                        help="under torchrun: how long a process waits for the others (joining the group, each "
                        "collective) before it stops with an error, e.g. when another process died "
                        f"(default: {DIST_TIMEOUT:g})")




def metrics_log(args: argparse.Namespace, directory: Path, enabled: bool, resumed: bool) -> MetricsLog:
    """The run's :class:`MetricsLog` (written where ``enabled``: rank 0 of a training run), with
    TensorBoard scalars under ``--tensorboard``.

    The scalars (every number of a record, at step = its epoch) go through PyTorch's own
    ``torch.utils.tensorboard.SummaryWriter`` to ``<directory>/tensorboard``; ``parser.error``-style
    exit if the tensorboard package is missing.
    """
    sink = None
    if args.tensorboard and enabled:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise SystemExit(f"error: --tensorboard needs the tensorboard package ({err}): pip install tensorboard") from None
        writer = SummaryWriter(str(Path(directory) / "tensorboard"))

        def sink(record: dict[str, Any]) -> None:
            step = int(record["epoch"])
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, step)
            writer.flush()

    return MetricsLog(directory, enabled, resumed=resumed, also=sink)

# ---------------------------------------------------------------------------- data

class IndexedImages(Dataset):
    """``(transform(image), dataset index)`` pairs: the methods address samples by index."""

    def __init__(self, data: ImageData, transform: Callable[[Image.Image], Any]) -> None:
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(self.data.image(i)), i


def normalize() -> torchvision.transforms.Compose:
    """To a tensor, normalised with ImageNet's channel statistics."""
    t = torchvision.transforms
    return t.Compose([t.ToTensor(), t.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(resolution: int) -> torchvision.transforms.Compose:
    """No augmentation: resize the short side to 8/7 of ``resolution``, centre crop (224 from 256)."""
    t = torchvision.transforms
    return t.Compose([t.Resize(round(resolution * 8 / 7)), t.CenterCrop(resolution), normalize()])


def loaders(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    data: ImageData,
    train_transform: Callable[[Image.Image], Any],
    ctx: DistContext,
    train_sampler: torch.utils.data.Sampler | None = None,
) -> tuple[DataLoader, DataLoader]:
    """The training loader (shuffled shards, full batches) and the fixed-order extraction loader.

    Training uses ``train_sampler``, or a ``DistributedSampler`` (also with one process, so
    that the order depends only on the seed and the epoch). ``parser.error`` if the global
    batch does not split evenly or leaves no full batch.
    """
    if args.batch_size % ctx.world_size:
        parser.error(f"--batch-size {args.batch_size} is not divisible by the {ctx.world_size} processes")
    per_rank = args.batch_size // ctx.world_size
    if per_rank * ctx.world_size > len(data):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(data)} images")
    train_set = IndexedImages(data, train_transform)
    if train_sampler is None:
        train_sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
    common = {"num_workers": args.workers, "pin_memory": ctx.device.type == "cuda"}
    train = DataLoader(train_set, per_rank, sampler=train_sampler, drop_last=True, **common)
    eval_set = IndexedImages(data, eval_transform(args.resolution))
    ordered = DistributedSampler(eval_set, ctx.world_size, ctx.rank, shuffle=False)
    return train, DataLoader(eval_set, per_rank, sampler=ordered, **common)


# ---------------------------------------------------------------------------- model
SMALL_INPUT_MAX = 32  # crops up to this size get the small-image stem


def small_input(resolution: int) -> bool:
    """Whether crops of ``resolution`` pixels get the small-image stem (≤ 32 px, as for CIFAR).

    torchvision's ImageNet stem (7×7 stride-2 conv, 3×3 stride-2 max-pool) shrinks a 16-pixel
    image to 4×4 before the first residual block and a 32-pixel one to 8×8.
    """
    return resolution <= SMALL_INPUT_MAX


class _WideResNet(torchvision.models.resnet.ResNet):
    """torchvision's ResNet with every stage's width scaled by ``width / 64`` (64 = torchvision's)."""

    def __init__(self, block: type[nn.Module], layers: list[int], width: int) -> None:
        self._width = width
        super().__init__(block, layers)  # its _make_layer calls below see self._width

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        if planes == 64:  # the first stage: the stem's output is `width` channels wide
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


_BLOCKS = {"resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet34": ("BasicBlock", [3, 4, 6, 3]),
           "resnet50": ("Bottleneck", [3, 4, 6, 3]), "resnet101": ("Bottleneck", [3, 4, 23, 3]),
           "resnet152": ("Bottleneck", [3, 8, 36, 3])}


def backbone(arch: str, small_input: bool = False, width: int = 64) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet without its classifier, and its feature width.

    ``weights=None``: nothing is ever downloaded. ``small_input``: the 3×3 stride-1 stem
    without max-pool (CIFAR-style), so the first block sees the full resolution. ``width``:
    channels of the stem and first stage (torchvision: 64; the later stages double it as
    usual), e.g. 32 for a network four times cheaper. Output: (B, features) pooled features.
    """
    if width == 64:
        net = torchvision.models.get_model(arch, weights=None)
    else:
        block, layers = _BLOCKS[arch]
        net = _WideResNet(getattr(torchvision.models.resnet, block), layers, width)
    if small_input:
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif width != 64:
        net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    if small_input or width != 64:
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
        net.bn1 = nn.BatchNorm2d(width)
    features = net.fc.in_features * width // 64
    net.fc = nn.Identity()
    return net, features


# ---------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistContext:
    """Where this process runs: rank, world size, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that prints and writes)."""
        return self.rank == 0


def setup_distributed(timeout: float = DIST_TIMEOUT) -> DistContext:
    """Join the process group when launched by torchrun (NCCL with CUDA, gloo on CPU).

    One plain process (no ``WORLD_SIZE`` > 1 in the environment) runs without a group.
    ``timeout``: seconds a collective (and joining) may wait for the other processes.
    """
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext(0, 1, torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


Runner = Callable[[argparse.ArgumentParser, argparse.Namespace, ImageData, "dict[str, Any] | None", "DistContext"], None]


def launch(parser: argparse.ArgumentParser, args: argparse.Namespace, min_images: int, run: Runner,
           states: Sequence[str] = ("model", "optimizer")) -> None:
    """Open the data and the ``--resume`` checkpoint (one-line errors), join the process group,
    call ``run(parser, args, data, checkpoint, ctx)``, and leave the group whatever happens.

    ``states``: the checkpoint's state-dict entries the script restores (checked on loading).
    A checkpoint that ``run`` cannot restore (:class:`runs.CheckpointError`) or an unreadable
    image file (:class:`runs.ImageError`, on this rank or, under DDP, on a peer whose error a
    collective reports) ends in one line and exit code 2; losing the other
    processes (one died, or did not answer within ``--dist-timeout``) in one line and exit code 1.
    """
    runs.check_eval_only(parser, args)
    data = open_data(parser, args, min_images)
    ckpt = load_checkpoint(parser, args, states)
    ctx = setup_distributed(args.dist_timeout)
    try:
        run(parser, args, data, ckpt, ctx)
    except runs.CheckpointError as err:
        runs.fail(parser, f"{_checkpoint_flag(args)}: {runs.checkpoint_path(args)}: {err}")
    except (ValueError, RuntimeError) as err:
        if runs.IMAGE_ERROR in str(err):  # this rank's ImageError, or a peer's named by a collective's header
            runs.fail(parser, f"--data: {runs.image_error_line(err)}")
        if not isinstance(err, RuntimeError) or not lost_processes(err, ctx):
            raise
        print(f"{parser.prog}: error: rank {ctx.rank} of {ctx.world_size} lost the other processes (one died or "
              f"did not answer within --dist-timeout {args.dist_timeout:g} s): {runs.error_line(err)}",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        teardown_distributed()


def lost_processes(err: BaseException, ctx: DistContext) -> bool:
    """Whether ``err`` says that a collective failed: another process died or timed out.

    torch raises ``DistError`` from collectives it calls itself, but a plain ``RuntimeError``
    with the backend's message from inside ``DistributedDataParallel``'s backward.
    """
    if ctx.world_size == 1:
        return False
    text = str(err)
    return isinstance(err, dist.DistError) or "gloo" in text or "NCCL" in text


def teardown_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` on its device, in ``DistributedDataParallel`` when there are several processes."""
    model.to(ctx.device)
    if ctx.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def restore(ckpt: dict[str, Any], objects: dict[str, Any]) -> None:
    """``obj.load_state_dict(ckpt[name])`` for each entry; :class:`runs.CheckpointError` naming
    the entry if one does not fit (shapes, keys, types)."""
    for name, obj in objects.items():
        with runs.restoring(name):
            obj.load_state_dict(ckpt[name])


def broadcast_module(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank (after a re-initialisation, before
    extracting features with per-rank BatchNorm statistics)."""
    if ctx.world_size == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, 0)


def broadcast_tensor(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Rank 0's ``x`` on every rank (same shape and dtype everywhere; CPU or the group's device)."""
    if ctx.world_size == 1:
        return x
    buf = x.to(ctx.device).contiguous()
    dist.broadcast(buf, 0)
    return buf.to(x.device)


def mean_over_ranks(values: Sequence[float], ctx: DistContext) -> list[float]:
    """Element-wise mean of ``values`` over all ranks."""
    if ctx.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


# ---------------------------------------------------------------------------- randomness
def seed_everything(seed: int, ctx: DistContext) -> None:
    """Seed Python, NumPy and torch, differently per rank (augmentations must differ)."""
    s = seed * 1000 + ctx.rank
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) RNG states as tensors and numbers.

    Nothing is pickled as an object, so a checkpoint holding it loads with
    ``torch.load(weights_only=True)``.
    """
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": torch.tensor(words, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_gauss": [int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_rng(ckpt: dict[str, Any], seed: int, ctx: DistContext) -> None:
    """Continue this rank's random streams from the checkpoint.

    Under the world size that wrote it, each rank restores its own saved state (the run
    continues bit-exactly on CPU). Under another world size, every rank re-seeds from
    ``(seed, the checkpoint's epoch, rank)``: the run is reproducible but its augmentations
    and dropout differ from an uninterrupted run's; rank 0 prints a note naming both sizes.
    """
    states = ckpt["rng"]
    if len(states) == ctx.world_size:
        set_rng_state(states[ctx.rank])
        return
    s = int(np.random.SeedSequence([seed, ckpt["epoch"], ctx.rank]).generate_state(1, np.uint32)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    if ctx.main:
        print(f"note: the checkpoint was written by {len(states)} process(es), this run has {ctx.world_size}: model, "
              "optimiser and clustering state carry over; the random streams (augmentations) are re-seeded from "
              "--seed, the epoch and the rank", flush=True)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore this process's Python, NumPy and torch random states on leaving (a
    ``DataLoader`` draws a seed from torch's stream each time it is iterated)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def all_rng_states(ctx: DistContext) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective)."""
    mine = rng_state()
    if ctx.world_size == 1:
        return [mine]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``.

    A crash mid-write leaves the previous checkpoint intact.
    """
    runs.atomic_write(path, lambda f: torch.save(state, f))


#: Entries of :func:`rng_state` and their types (``cuda`` is optional).
_RNG_ENTRIES = {"python": torch.Tensor, "python_version": int, "python_gauss": (float, type(None)),
                "numpy_keys": torch.Tensor, "numpy_pos": int, "numpy_gauss": list, "torch": torch.Tensor}


def _checkpoint_flag(args: argparse.Namespace) -> str:
    return "--eval-only" if args.eval_only is not None else "--resume"


def load_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    states: Sequence[str] = ("model", "optimizer")) -> dict[str, Any] | None:
    """The ``--resume`` (or ``--eval-only``) checkpoint (``weights_only=True``, on the CPU), or
    None without either.

    :func:`runs.fail` (one line, exit code 2) if it is unreadable, is not a dictionary with the
    ``states`` (dictionaries), ``epoch``, ``rng`` (one :func:`rng_state` per process that wrote
    it) and ``args`` entries, has nothing left to train (``--resume`` only), or was trained with
    other settings than this run's (only the options in ``runs.RESUMABLE_CHANGES`` may differ).
    """
    path, flag = runs.checkpoint_path(args), _checkpoint_flag(args)
    if path is None:
        return None
    if not path.is_file():
        runs.fail(parser, f"{flag}: no checkpoint file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types
        runs.fail(parser, f"{flag}: cannot load {path}: {runs.error_line(err)}")
    try:
        check_checkpoint(state, states, args)
    except runs.CheckpointError as err:
        runs.fail(parser, f"{flag}: {path}: {err}")
    return state


def check_checkpoint(state: Any, states: Sequence[str], args: argparse.Namespace) -> None:
    """:class:`runs.CheckpointError` unless ``state`` is a checkpoint this run can continue
    (see :func:`load_checkpoint`)."""
    if not isinstance(state, dict):
        raise runs.CheckpointError(f"it holds a {type(state).__name__}, not a dictionary of states")
    missing = [k for k in (*states, "epoch", "rng", "args") if k not in state]
    if missing:
        raise runs.CheckpointError(f"it has no {', '.join(missing)} entr{'ies' if len(missing) > 1 else 'y'}")
    for name in states:
        if not isinstance(state[name], dict):
            raise runs.CheckpointError(f"its {name} entry is a {type(state[name]).__name__}, not a state dictionary")
    runs.check_resume(state["args"], state["epoch"], args)
    rng = state["rng"]
    if not isinstance(rng, list) or not rng:
        raise runs.CheckpointError("its rng entry is not a list of random states, one per process")
    for entry in rng:
        bad = [k for k, kind in _RNG_ENTRIES.items() if not isinstance(entry, dict) or not isinstance(entry.get(k), kind)]
        if not bad and (entry["python"].numel() != 625 or entry["numpy_keys"].numel() != 624):
            bad = ["python", "numpy_keys"]
        if bad:
            raise runs.CheckpointError(f"its rng entry has no valid {', '.join(bad)} state")


# ---------------------------------------------------------------------------- evaluation
def rank0_decides(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's ``flag`` on every rank (a collective under torchrun)."""
    return bool(broadcast_tensor(torch.tensor([int(flag)]), ctx).item())


class Evaluation:
    """The frozen-feature evaluation of a run (see :class:`runs.Evaluator`), under torchrun too.

    Features are extracted on every rank (``extract_features`` gathers them), in eval mode,
    through ``loader`` (no augmentation, dataset order), with rank 0's weights; only rank 0
    scores them, the other ranks return at once. Extraction leaves the random streams of the
    training as they were, so evaluating never changes what is trained.

    Parameters
    ----------
    directory : the run directory
    data, args, ctx : the run's data, options and process
    loader : the fixed-order extraction loader of :func:`loaders`
    write : whether rank 0 writes ``split.npz`` and ``baselines.json`` (False for ``--eval-only``)
    """

    def __init__(self, directory: Path, data: ImageData, args: argparse.Namespace, ctx: DistContext,
                 loader: DataLoader, write: bool) -> None:
        self.scorer = runs.Evaluator(directory, data.targets, args.seed, write=write and ctx.main)
        self.ctx, self.loader, self.show = ctx, loader, args.progress and ctx.main
        self.pixels = runs.pixel_baseline_affordable(len(data), args.resolution)

    def _features(self, module: nn.Module) -> np.ndarray:
        """(N, D) float32 outputs of ``module`` (rank 0's weights) over the data set, on every rank."""
        broadcast_module(module, self.ctx)
        with preserved_rng():
            return clt.extract_features(module, self.loader, device=self.ctx.device, progress=self.show).numpy()

    def __call__(self, backbone: nn.Module) -> dict[str, Any]:
        """:meth:`runs.Evaluator.evaluate` of ``backbone``'s pooled features on rank 0; ``{}`` elsewhere."""
        feats = self._features(backbone)
        return self.scorer.evaluate(feats) if self.ctx.main else {}

    def baselines(self, backbone: nn.Module, fresh: bool) -> dict[str, Any] | None:
        """The run's baselines on rank 0 (None elsewhere): read from the run directory unless
        ``fresh`` (a new run) or missing there, else computed from ``backbone``, which must
        still be the randomly initialised network, and the flattened eval images."""
        stored = None if fresh or not self.ctx.main else self.scorer.load_baselines()
        if not rank0_decides(stored is None, self.ctx):
            if self.ctx.main:
                print(f"baselines read from {self.scorer.directory / runs.BASELINES_FILE}", flush=True)
            return stored
        random_net = self._features(backbone)
        pixels = self._features(nn.Flatten()) if self.pixels else None
        return self.scorer.make_baselines(random_net, pixels) if self.ctx.main else None
