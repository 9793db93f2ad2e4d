"""Shared parts of the PyTorch training examples (ODC, DeepCluster, Self-Classifier).

Data (an ImageFolder tree or the embedded digits demo), the command line with ImageNet and
demo presets, ``torch.distributed`` set-up, the run directory with its ``metrics.jsonl`` and
summary plot, atomic checkpoints that load with ``torch.load(weights_only=True)``, and the RNG
state that makes ``--resume`` continue bit-exactly on CPU.

The scripts import it as ``import common`` (``python examples/x.py`` puts ``examples/`` on
``sys.path``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
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

import clusterlearn as cl
from clusterlearn import metrics

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CHECKPOINT = "checkpoint.pt"
# Options a resumed run may change; any other difference from the checkpoint's is refused.
RESUMABLE_CHANGES = {"resume", "out", "epochs", "stop_after", "workers", "progress"}


# ---------------------------------------------------------------------------- command line
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def positive_int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers, e.g. ``1000,2000``."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text}") from err


class PresetParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose options can default to an ImageNet or a demo preset.

    :meth:`add_preset` options stay ``None`` when not given; :meth:`parse_args` fills them
    from ``presets["imagenet"]`` when ``--data`` is given, else from ``presets["demo"]``.
    """

    def __init__(self, presets: dict[str, dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.presets = presets

    def add_preset(self, flag: str, *, help: str, **kwargs: Any) -> None:
        """Add an option whose default comes from the presets (shown in ``--help``)."""
        key = flag.lstrip("-").replace("-", "_")
        shown = {name: format_value(values[key]) for name, values in self.presets.items()}
        self.add_argument(flag, default=None, help=f"{help} (default: ImageNet {shown['imagenet']}, demo {shown['demo']})", **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        preset = self.presets["imagenet" if parsed.data is not None else "demo"]
        for key, value in preset.items():
            if getattr(parsed, key) is None:
                setattr(parsed, key, value)
        return parsed


def format_value(value: Any) -> str:
    """A preset value for help texts and messages: lists as comma-separated items."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def add_common_arguments(parser: PresetParser) -> None:
    """Data, run directory, resumption, network and loader options shared by the three scripts."""
    parser.add_argument("--data", type=Path, help="ImageFolder tree (ImageNet layout: one folder per class); "
                        "without it: the embedded digits demo (scikit-learn's load_digits)")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<method>-<timestamp>, or the "
                        "checkpoint's directory with --resume)")
    parser.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="continue from this checkpoint.pt")
    parser.add_preset("--epochs", type=positive_int, help="total training epochs")
    parser.add_argument("--stop-after", type=positive_int, metavar="EPOCH",
                        help="stop after this epoch (the schedule still plans --epochs; continue with --resume)")
    parser.add_preset("--batch-size", type=positive_int, help="global batch, split evenly over the processes")
    parser.add_preset("--arch", choices=ARCHS, help="torchvision ResNet, randomly initialised")
    parser.add_preset("--resolution", type=positive_int, help="training crop size in pixels (up to "
                      f"{SMALL_INPUT_MAX}: the 3×3 stride-1 stem without max-pool)")
    parser.add_preset("--width", type=positive_int, help="channels of the ResNet's stem and first stage "
                      "(torchvision's: 64; later stages double it)")
    parser.add_preset("--flip", action=argparse.BooleanOptionalAction,
                      help="random horizontal flips (off for digits: a flip changes what they show)")
    parser.add_preset("--colour", action=argparse.BooleanOptionalAction,
                      help="saturation/hue jitter and random greyscale of ODC and Self-Classifier (DeepCluster has none; "
                      "no-ops on grey images)")
    parser.add_preset("--workers", type=non_negative_int, help="data-loading processes per training process")
    parser.add_argument("--subset", type=positive_int, metavar="N",
                        help="train on N images spread evenly over the data (smoke tests, quick looks)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of everything (default: 0)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="tqdm progress bars on rank 0 (default: on)")


# ---------------------------------------------------------------------------- data
class ArrayImages:
    """A sequence of RGB PIL images backed by an (N, H, W, 3) uint8 array."""

    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels[i])

    def take(self, indices: np.ndarray) -> ArrayImages:
        """The images at ``indices``."""
        return ArrayImages(self.pixels[indices])


class FolderImages:
    """A sequence of RGB PIL images read from files on access."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Image.Image:
        return torchvision.datasets.folder.default_loader(self.paths[i])

    def take(self, indices: np.ndarray) -> FolderImages:
        """The images at ``indices``."""
        return FolderImages([self.paths[i] for i in indices])


@dataclass(frozen=True)
class ImageData:
    """Images with their true class labels (for metrics only; training never sees them).

    ``pixels`` holds flat raw pixel vectors for the k-means baseline where that is affordable
    (the demo data), else ``None``.
    """

    name: str
    images: ArrayImages | FolderImages
    targets: np.ndarray
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int) -> ImageData:
        """``n`` images spread evenly over the data (so every class of a sorted tree appears)."""
        idx = np.linspace(0, len(self) - 1, n).round().astype(np.int64)
        pixels = None if self.pixels is None else self.pixels[idx]
        return ImageData(f"{self.name} (subset of {n})", self.images.take(idx), self.targets[idx], pixels)


def demo_digits(resolution: int) -> ImageData:
    """scikit-learn's 1797 handwritten digits (8×8, 16 grey levels) as RGB images of ``resolution``²."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BILINEAR)) for im in small])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    return ImageData("digits (demo)", ArrayImages(rgb), digits.target.astype(np.int64), digits.data.astype(np.float32))


def image_folder(root: Path) -> ImageData:
    """An ImageFolder tree; raises ``ValueError`` when it is missing or holds no image."""
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    try:
        folder = torchvision.datasets.ImageFolder(str(root))
    except FileNotFoundError as err:
        raise ValueError(f"{root} holds no images in class folders ({err})") from err
    paths = [path for path, _ in folder.samples]
    return ImageData(f"ImageFolder {root}", FolderImages(paths), np.asarray(folder.targets, dtype=np.int64))


def open_data(parser: argparse.ArgumentParser, args: argparse.Namespace, min_images: int) -> ImageData:
    """The data of ``--data`` (or the demo), cut to ``--subset``; ``parser.error`` on bad input.

    ``min_images`` is the smallest data set the method can use (e.g. its cluster count).
    """
    try:
        data = image_folder(args.data) if args.data is not None else demo_digits(args.resolution)
    except ValueError as err:
        parser.error(f"--data: {err}")
    if args.subset is not None:
        if args.subset > len(data):
            parser.error(f"--subset {args.subset} exceeds the {len(data)} images of {data.name}")
        data = data.subset(args.subset)
    if len(data) < min_images:
        parser.error(f"{data.name} has {len(data)} images, fewer than the {min_images} this run needs "
                     "(lower the number of clusters)")
    return data


class IndexedImages(Dataset):
    """``(transform(image), dataset index)`` pairs: the methods address samples by index."""

    def __init__(self, images: ArrayImages | FolderImages, transform: Callable[[Image.Image], Any]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(self.images[i]), i


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
    train_set = IndexedImages(data.images, train_transform)
    if train_sampler is None:
        train_sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
    common = {"num_workers": args.workers, "pin_memory": ctx.device.type == "cuda"}
    train = DataLoader(train_set, per_rank, sampler=train_sampler, drop_last=True, **common)
    eval_set = IndexedImages(data.images, eval_transform(args.resolution))
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


def setup_distributed() -> DistContext:
    """Join the process group when launched by torchrun (NCCL with CUDA, gloo on CPU).

    One plain process (no ``WORLD_SIZE`` > 1 in the environment) runs without a group.
    """
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext(0, 1, torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--resume`` checkpoint (``weights_only=True``, on the CPU), or None without ``--resume``.

    ``parser.error`` if it is unreadable or was trained with other settings than this run's
    (only the options in ``RESUMABLE_CHANGES`` may differ).
    """
    if args.resume is None:
        return None
    if not args.resume.is_file():
        parser.error(f"--resume: no checkpoint file {args.resume}")
    try:
        state = torch.load(args.resume, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types
        parser.error(f"--resume: cannot load {args.resume}: {type(err).__name__}: {str(err).splitlines()[0]}")
    mine = args_record(args)
    differ = sorted(k for k in set(mine) | set(state["args"]) if k not in RESUMABLE_CHANGES and mine.get(k) != state["args"].get(k))
    if differ:
        was = ", ".join(f"--{k.replace('_', '-')} {state['args'].get(k)}" for k in differ)
        parser.error(f"--resume: the checkpoint was trained with {was}; pass the same settings")
    return state


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The options as plain JSON/``weights_only``-safe values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


# ---------------------------------------------------------------------------- run directory
def run_dir(args: argparse.Namespace, method: str) -> Path:
    """``--out``, else the checkpoint's directory when resuming, else ``runs/<method>-<timestamp>``."""
    if args.out is not None:
        return args.out
    if args.resume is not None:
        return args.resume.parent
    return Path("runs") / f"{method}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


class MetricsLog:
    """Appends one JSON object per epoch to ``<dir>/metrics.jsonl`` (rank 0 only writes).

    A fresh run (``resumed=False``) starts the file anew; a resumed one appends to it.
    """

    def __init__(self, directory: Path, enabled: bool, resumed: bool) -> None:
        self.path = directory / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            if not resumed:
                self.path.unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (numbers, strings, lists)."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All records, the last one per epoch (a resumed epoch replaces its first attempt)."""
        by_epoch: dict[int, dict[str, Any]] = {}
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            by_epoch[record["epoch"]] = record
        return [by_epoch[e] for e in sorted(by_epoch)]


def cluster_scores(truth: np.ndarray, labels: Any) -> dict[str, float]:
    """NMI, ARI and Hungarian-matched accuracy of cluster ``labels`` against the true classes."""
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    return {"nmi": metrics.nmi(truth, labels), "ari": metrics.ari(truth, labels), "acc": metrics.accuracy(truth, labels)}


def size_stats(labels: Any, num_clusters: int) -> tuple[np.ndarray, dict[str, int]]:
    """Cluster sizes (C,) of ``labels`` and their min/max (and how many are empty)."""
    sizes = np.bincount(np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64), minlength=num_clusters)
    return sizes, {"cluster_size_min": int(sizes.min()), "cluster_size_max": int(sizes.max()),
                   "empty_clusters": int((sizes == 0).sum())}


def pixel_kmeans_scores(data: ImageData, num_clusters: int, seed: int) -> dict[str, float] | None:
    """Scores of k-means on the L2-normalised raw pixels, where the data carries them."""
    if data.pixels is None:
        return None
    result = cl.kmeans(cl.l2_normalize(data.pixels), num_clusters, seed=seed, backend="array")
    return cluster_scores(data.targets, result.labels)


def epoch_line(record: dict[str, Any]) -> str:
    """A one-line summary of an epoch's metrics record."""
    parts = [f"epoch {record['epoch']}", f"loss {record['loss']:.4f}"]
    if "change_ratio" in record:
        parts.append(f"change ratio {record['change_ratio']:.3f}")
    if record.get("nmi_previous") is not None:
        parts.append(f"NMI vs previous epoch {record['nmi_previous']:.3f}")
    parts += [f"NMI {record['nmi']:.3f}", f"ACC {record['acc']:.3f}",
              f"clusters {record['cluster_size_min']}-{record['cluster_size_max']}",
              f"{record['images_per_s']:.0f} img/s"]
    return "  ".join(parts)


def final_line(method: str, record: dict[str, Any], baseline: dict[str, float] | None) -> str:
    """The run's last line: final NMI/ACC against the true labels next to k-means on raw pixels."""
    text = f"final {method}: NMI {record['nmi']:.3f}  ACC {record['acc']:.3f}"
    if baseline is None:
        return text + "  |  k-means on raw pixels: not computed for ImageFolder data"
    return text + f"  |  k-means on raw pixels: NMI {baseline['nmi']:.3f}  ACC {baseline['acc']:.3f}"


def plot_run(directory: Path, records: list[dict[str, Any]], sizes: np.ndarray, title: str) -> Path:
    """``<dir>/summary.png``: loss and NMI/ACC per epoch, and a histogram of the final cluster sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_nmi, ax_hist) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot(epochs, [r["loss"] for r in records], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_nmi.plot(epochs, [r["nmi"] for r in records], marker="o", label="NMI")
    ax_nmi.plot(epochs, [r["acc"] for r in records], marker="s", label="ACC")
    ax_nmi.set(xlabel="epoch", ylim=(0, 1), title="against the true labels")
    ax_nmi.legend()
    for ax in (ax_loss, ax_nmi):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_hist.hist(sizes, bins=min(50, max(len(sizes), 1)))
    ax_hist.set(xlabel="samples per cluster", ylabel="clusters", title=f"final cluster sizes (C = {len(sizes)})")
    fig.suptitle(title)
    fig.tight_layout()
    path = directory / "summary.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def progress(iterable: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    """A tqdm bar over ``iterable`` when ``enabled`` (rank 0 with ``--progress``)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
