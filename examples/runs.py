"""Framework-free parts of the training examples (PyTorch and JAX alike).

The command line with ImageNet/small/demo presets and its validators, the data (the embedded
digits demo as NumPy arrays, an ImageFolder tree listed without torchvision, images read with
PIL), the run directory (``metrics.jsonl``, atomic file writes, the settings check of
``--resume``), scores against the true labels, the evaluation of frozen features (the fixed
split, k-NN, linear probe and k-means scores, the random-network and raw-pixel baselines,
``--eval-every`` / ``--eval-only``), the training set's cluster assignments, the epoch and final
lines, the summary plot and tqdm progress.

It imports NumPy, PIL, scikit-learn (demo data, through ``clusterlearn.metrics``) and
matplotlib (the plot) only: no deep-learning framework. The scripts import it as ``import
runs`` (``python examples/x.py`` puts ``examples/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np
from PIL import Image

import clusterlearn as cl
from clusterlearn import metrics
from clusterlearn.backend import to_numpy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: File endings an ImageFolder tree's images may have (torchvision's list).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Options a resumed run may change; any other difference from the checkpoint's is refused. (The
#: preset's name may change: the values it filled in are compared, and a checkpoint from before
#: ``--preset`` existed has none.)
RESUMABLE_CHANGES = frozenset({"resume", "out", "epochs", "stop_after", "workers", "progress", "dist_timeout",
                               "eval_every", "eval_only", "tensorboard", "preset"})
#: Options added after checkpoints were written without them, with the value such a checkpoint was
#: trained with: a checkpoint that lacks one compares as that value (where the script has the option).
ADDED_OPTIONS = {"shard_memory": False}
#: The presets, in the order ``--help`` shows them.
PRESET_NAMES = ("imagenet", "small", "demo")
#: ``--data`` trees of at most this many images get the ``small`` preset unless ``--preset`` says otherwise.
SMALL_DATA_MAX_IMAGES = 20_000
#: Options every script has whose defaults differ between the presets.
COMMON_PRESETS = {"imagenet": {"eval_every": 0}, "small": {"eval_every": 5}, "demo": {"eval_every": 5}}
#: The ``small`` preset of a script that defines none: its demo values (tuned on 1797 images), with
#: the data's own settings where the digits' are particular to them: flips and colour jitter on
#: (the digits turn them off), 32-pixel crops (CIFAR's size; the digits are 8×8 upscaled to 16).
#: A script's own ``small`` entry overrides these; keys a script does not have are ignored.
SMALL_DATA = {"resolution": 32, "workers": 0, "flip": True, "colour": True}


#: How an :class:`ImageError`'s message starts (before the file's path).
IMAGE_ERROR = "cannot read image "


class CheckpointError(ValueError):
    """A ``--resume`` checkpoint that loads but cannot continue this run (a one-line message)."""


class ImageError(ValueError):
    """A file of ``--data`` that cannot be read as an image (the message names the file)."""


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``, or just ``Type`` when the message is empty."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit with the one line ``<prog>: error: <message>`` on stderr and exit code 2.

    For a file that cannot be used (``--resume``, ``--data``): the options parsed, so unlike
    ``parser.error`` no usage is printed before the line.
    """
    parser.exit(2, f"{parser.prog}: error: {message}\n")


@contextlib.contextmanager
def restoring(name: str) -> Iterator[None]:
    """Run the restore of the checkpoint's ``name`` state (``load_state_dict``, ``unflatten``, ...)
    inside this block: any exception it raises becomes a :class:`CheckpointError` naming the entry
    (a :class:`CheckpointError` passes unchanged)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # torch raises RuntimeError, KeyError, ValueError, TypeError, ...
        raise CheckpointError(f"its {name} state does not fit this run: {error_line(err)}") from err


def image_error_line(err: BaseException) -> str:
    """The one line of an :class:`ImageError`, also when a ``DataLoader`` worker re-raised it
    with the worker's traceback folded into the message, or when it is a peer rank's, as the
    other ranks raise it from a collective's header exchange (``... (rank 1: ImageError:
    cannot read image <path>: <reason>; rank 2: ...)``)."""
    lines = [line for line in str(err).splitlines() if IMAGE_ERROR in line]
    if not lines:
        return str(err)
    line = lines[-1][lines[-1].index(IMAGE_ERROR):]
    if isinstance(err, ImageError):
        return line
    first = re.split(r"; rank \d+: ", line, maxsplit=1)  # the first failing rank's
    return first[0] if len(first) > 1 else line.removesuffix(")")


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
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text}") from err


def format_value(value: Any) -> str:
    """A preset value for help texts and messages: lists as comma-separated items."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class PresetParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose options default to one of three presets.

    ``presets`` maps ``"imagenet"`` and ``"demo"`` (and optionally ``"small"``) to option values;
    a missing ``"small"`` is the demo's values updated with :data:`SMALL_DATA`, then with the
    script's own ``"small"`` entry where it has one. :meth:`add_preset` options stay ``None`` when
    not given; :meth:`parse_args` fills them from the preset of ``--preset``, by default chosen by
    the data (:func:`auto_preset`): ``demo`` without ``--data``, ``small`` for a tree of at most
    :data:`SMALL_DATA_MAX_IMAGES` images, else ``imagenet``. The chosen name is ``args.preset``.
    """

    def __init__(self, presets: dict[str, dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        demo = presets["demo"]
        small = {**demo, **{k: v for k, v in SMALL_DATA.items() if k in demo}, **presets.get("small", {})}
        given = {**presets, "small": small}
        self.presets = {name: {**COMMON_PRESETS[name], **given[name]} for name in PRESET_NAMES}

    def add_preset(self, flag: str, *, help: str, **kwargs: Any) -> None:
        """Add an option whose default comes from the presets (each preset's value shown in ``--help``)."""
        key = flag.lstrip("-").replace("-", "_")
        shown = ", ".join(f"{name} {format_value(self.presets[name][key])}" for name in PRESET_NAMES)
        self.add_argument(flag, default=None, help=f"{help} (default by --preset: {shown})", **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if parsed.preset is None:
            parsed.preset = auto_preset(parsed.data)
        for key, value in self.presets[parsed.preset].items():
            if getattr(parsed, key) is None:
                setattr(parsed, key, value)
        return parsed


def auto_preset(data: Path | None) -> str:
    """The preset for ``--data``: ``demo`` when it is None, ``small`` for a tree of at most
    :data:`SMALL_DATA_MAX_IMAGES` images (counted up to one more: an ImageNet tree is not listed
    in full), else ``imagenet``. A path that cannot be listed gets ``imagenet`` (the run then
    stops on it with its own message)."""
    if data is None:
        return "demo"
    try:
        count = count_images(data, SMALL_DATA_MAX_IMAGES + 1)
    except OSError:
        return "imagenet"
    return "small" if 0 < count <= SMALL_DATA_MAX_IMAGES else "imagenet"


def count_images(root: Path, limit: int) -> int:
    """The number of images :func:`list_image_folder` would list under ``root``, counted up to ``limit``."""
    count = 0
    with os.scandir(root) as entries:
        classes = sorted(entry.path for entry in entries if entry.is_dir())
    for folder in classes:
        for _, files in _walk_once(Path(folder)):
            count += sum(file.lower().endswith(IMAGE_EXTENSIONS) for file in files)
            if count >= limit:
                return count
    return count


def add_common_arguments(parser: PresetParser, archs: Sequence[str], *, workers_help: str) -> None:
    """Data, run directory, resumption, network and loader options shared by the scripts."""
    parser.add_argument("--data", type=Path, help="ImageFolder tree (ImageNet layout: one folder per class); "
                        "without it: the embedded digits demo (scikit-learn's load_digits)")
    parser.add_argument("--preset", choices=PRESET_NAMES,
                        help="defaults of the options marked 'default by --preset': imagenet (the paper's settings), "
                        "small (a few thousand images on a CPU, e.g. 2,000 grey 28×28 images: small ResNet, short "
                        "schedule, over-clustering where the method has it) or demo (the digits). Default: demo "
                        f"without --data, small for a tree of at most {SMALL_DATA_MAX_IMAGES:,} images, else imagenet")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<method>-<timestamp>, or the "
                        "checkpoint's directory with --resume)")
    parser.add_argument("--resume", type=Path, metavar="CHECKPOINT", help="continue from this checkpoint")
    parser.add_argument("--eval-only", type=Path, metavar="CHECKPOINT",
                        help="evaluate this checkpoint (the same settings as its run), print the final line and exit; "
                        "writes nothing")
    parser.add_preset("--eval-every", type=non_negative_int,
                      help="evaluate the frozen features every this many epochs (0: only at the end of the run)")
    parser.add_preset("--epochs", type=positive_int, help="total training epochs")
    parser.add_argument("--stop-after", type=positive_int, metavar="EPOCH",
                        help="stop after this epoch (the schedule still plans --epochs; continue with --resume)")
    parser.add_preset("--batch-size", type=positive_int, help="global batch, split evenly over the devices/processes")
    parser.add_preset("--arch", choices=tuple(archs), help="ResNet, randomly initialised")
    parser.add_preset("--resolution", type=positive_int, help="training crop size in pixels")
    parser.add_preset("--workers", type=non_negative_int, help=workers_help)
    parser.add_argument("--subset", type=positive_int, metavar="N",
                        help="train on N images spread evenly over the data (smoke tests, quick looks)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of everything (default: 0)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="tqdm progress bars (default: on)")


# ---------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ImageData:
    """Images with their true class labels (for metrics only; training never sees them).

    ``images`` is an (N, H, W, 3) uint8 array (the demo) or a list of N file paths (an
    ImageFolder tree, read on access). ``pixels`` holds flat raw pixel vectors for the
    k-means baseline where that is affordable (the demo data), else ``None``. ``ids``: each
    array image's index in the full data set (a ``--subset`` keeps them), ``None`` for
    ``0..N-1``.
    """

    name: str
    images: np.ndarray | list[str]
    targets: np.ndarray
    pixels: np.ndarray | None = None
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image; :class:`ImageError` naming the file if it cannot be read."""
        if isinstance(self.images, np.ndarray):
            return Image.fromarray(self.images[i])
        try:
            with Image.open(self.images[i]) as im:
                return im.convert("RGB")
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
            raise ImageError(f"{IMAGE_ERROR}{self.images[i]}: {error_line(err)}") from err

    def subset(self, n: int) -> ImageData:
        """``n`` images spread evenly over the data (so every class of a sorted tree appears)."""
        idx = np.linspace(0, len(self) - 1, n).round().astype(np.int64)
        images = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        pixels = None if self.pixels is None else self.pixels[idx]
        ids = np.arange(len(self), dtype=np.int64) if self.ids is None else self.ids
        return ImageData(f"{self.name} (subset of {n})", images, self.targets[idx], pixels, ids[idx])

    def names(self) -> list[str]:
        """What identifies each image to a user: its file path, or its index in the full data set."""
        if not isinstance(self.images, np.ndarray):
            return list(self.images)
        ids = np.arange(len(self), dtype=np.int64) if self.ids is None else self.ids
        return [str(i) for i in ids.tolist()]


def demo_digits(resolution: int) -> ImageData:
    """scikit-learn's 1797 handwritten digits (8×8, 16 grey levels) as RGB images of ``resolution``².

    Bilinear upscaling, the grey level repeated in 3 channels; the true digit labels are kept
    for the metrics, and the raw 64 pixels for the k-means baseline.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BILINEAR)) for im in small])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    return ImageData("digits (demo)", rgb, digits.target.astype(np.int64), digits.data.astype(np.float32))


def list_image_folder(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Files and class indices of an ImageFolder tree: ``root/<class>/**/<image>``.

    Classes are the sorted sub-directories of ``root``; images are the files with an ending
    in :data:`IMAGE_EXTENSIONS` (any case) anywhere below them, in sorted order. Symbolic links
    are followed, but a directory whose real path was already listed for the same class (a
    link loop, or a second link to it) is skipped, so every image of a class is listed once.
    Raises ``ValueError`` when ``root`` is not a directory or holds no image in a class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    paths: list[str] = []
    targets: list[int] = []
    for index, name in enumerate(classes):
        for directory, files in _walk_once(root / name):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(directory, file))
                    targets.append(index)
    if not paths:
        raise ValueError(f"{root} holds no images in class folders (endings {', '.join(IMAGE_EXTENSIONS)})")
    return paths, np.asarray(targets, dtype=np.int64), classes


def _walk_once(top: Path) -> list[tuple[str, list[str]]]:
    """``(directory, files)`` below ``top``, sorted by directory, each real directory once."""
    seen: set[str] = set()
    found = []
    for directory, subdirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:
            subdirs.clear()
            continue
        seen.add(real)
        subdirs.sort()
        found.append((directory, files))
    return sorted(found)


def image_folder(root: Path) -> ImageData:
    """An ImageFolder tree (see :func:`list_image_folder`), read with PIL on access."""
    paths, targets, _ = list_image_folder(root)
    return ImageData(f"ImageFolder {root}", paths, targets)


def open_data(parser: argparse.ArgumentParser, args: argparse.Namespace, min_images: int) -> ImageData:
    """The data of ``--data`` (or the demo), cut to ``--subset``; ``parser.error`` on bad options,
    :func:`fail` on a tree that cannot be listed.

    ``min_images`` is the smallest data set the method can use (e.g. its cluster count).
    """
    try:
        data = image_folder(args.data) if args.data is not None else demo_digits(args.resolution)
    except ValueError as err:
        fail(parser, f"--data: {err}")
    if args.subset is not None:
        if args.subset > len(data):
            parser.error(f"--subset {args.subset} exceeds the {len(data)} images of {data.name}")
        data = data.subset(args.subset)
    if len(data) < min_images:
        parser.error(f"{data.name} has {len(data)} images, fewer than the {min_images} this run needs "
                     "(lower the number of clusters)")
    return data


def check_batch_size(parser: argparse.ArgumentParser, batch_size: int, shards: int, what: str, num_images: int) -> int:
    """The per-shard batch; ``parser.error`` unless ``batch_size`` splits evenly and fits the data."""
    if batch_size % shards:
        parser.error(f"--batch-size {batch_size} is not divisible by the {shards} {what}")
    if batch_size > num_images:
        parser.error(f"--batch-size {batch_size} exceeds the {num_images} images")
    return batch_size // shards


def square_image(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the short side resized to ``size`` (bilinear), centre-cropped."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    out = image.convert("RGB").resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size))
    return np.asarray(out, dtype=np.uint8)


def epoch_order(num_samples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(steps, batch_size) dataset indices of one epoch: a permutation seeded by (seed, epoch),
    the incomplete last batch dropped. Depends on nothing else, so a resumed run repeats it."""
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    steps = num_samples // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


# ---------------------------------------------------------------------------- run directory
def run_dir(args: argparse.Namespace, method: str) -> Path:
    """``--out``, else the checkpoint's directory when resuming or evaluating (``--eval-only``),
    else ``runs/<method>-<timestamp>``."""
    if args.out is not None:
        return args.out
    if checkpoint_path(args) is not None:
        return checkpoint_path(args).parent
    return Path("runs") / f"{method}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def checkpoint_path(args: argparse.Namespace) -> Path | None:
    """The checkpoint to load: ``--eval-only``'s, else ``--resume``'s, else None."""
    return args.eval_only if args.eval_only is not None else args.resume


def check_eval_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` when ``--eval-only`` is combined with ``--resume``."""
    if args.eval_only is not None and args.resume is not None:
        parser.error("--eval-only: evaluates a checkpoint without training; do not pass --resume with it")


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The options as plain JSON values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def resume_mismatch(saved: dict[str, Any], args: argparse.Namespace) -> str | None:
    """None if ``args`` may continue a run trained with ``saved`` (an :func:`args_record`),
    else a message naming the checkpoint's differing settings (only :data:`RESUMABLE_CHANGES`
    may differ)."""
    mine = args_record(args)
    saved = {**{k: v for k, v in ADDED_OPTIONS.items() if k in mine}, **saved}
    differ = sorted(k for k in set(mine) | set(saved) if k not in RESUMABLE_CHANGES and mine.get(k) != saved.get(k))
    if not differ:
        return None
    was = ", ".join(f"--{k.replace('_', '-')} {format_value(saved.get(k))}" for k in differ)
    return f"the checkpoint was trained with {was}; pass the same settings"


def check_resume(saved: Any, epoch: Any, args: argparse.Namespace) -> int:
    """The number of epochs a checkpoint has finished, if ``args`` may continue it.

    ``saved`` is the checkpoint's :func:`args_record`, ``epoch`` its epoch count (a Python or
    NumPy integer). Raises :class:`CheckpointError` (a one-line message) when ``saved`` is not
    a dictionary, ``epoch`` not an integer in ``[0, --epochs)`` or not before ``--stop-after``,
    or the settings differ from this run's beyond :data:`RESUMABLE_CHANGES`. Under
    ``--eval-only`` nothing is trained: any epoch count >= 0 is accepted.
    """
    if not isinstance(saved, dict):
        raise CheckpointError(f"its args entry is a {type(saved).__name__}, not a dictionary of settings")
    if isinstance(epoch, (bool, np.bool_)) or not isinstance(epoch, (int, np.integer)):
        raise CheckpointError(f"its epoch entry is a {type(epoch).__name__}, not an integer")
    mismatch = resume_mismatch(saved, args)
    if mismatch:
        raise CheckpointError(mismatch)
    epoch = int(epoch)
    if epoch < 0:
        raise CheckpointError(f"its epoch entry is {epoch}, not a number of finished epochs (>= 0)")
    if args.eval_only is not None:
        return epoch
    if epoch >= args.epochs:
        raise CheckpointError(f"the checkpoint has finished {epoch} epochs of --epochs {args.epochs}: nothing to "
                              "train (raise --epochs to train longer)")
    if args.stop_after is not None and args.stop_after <= epoch:
        raise CheckpointError(f"--stop-after {args.stop_after} is not after the checkpoint's epoch {epoch}")
    return epoch


def _umask() -> int:
    """This process's umask (read by setting a stricter one for an instant)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``.

    A crash mid-write leaves the previous file intact and no temporary file behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0o600 would make every rewritten file private
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power loss only once synced
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class MetricsLog:
    """Appends one JSON object per epoch to ``<dir>/metrics.jsonl`` (only where ``enabled``).

    A fresh run (``resumed=False``) starts the file anew; a resumed one appends to it, after
    dropping (with a warning) any line that is not a complete JSON record, such as the partial
    last line of a run killed while writing it. Each record is flushed and synced to disk
    before :meth:`write` returns.
    """

    def __init__(self, directory: Path, enabled: bool, resumed: bool,
                 also: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(directory) / "metrics.jsonl"
        self.enabled = enabled
        self.also = also  # a second writer of each record (e.g. TensorBoard scalars)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not resumed:
                self.path.unlink(missing_ok=True)
            elif self.path.exists():
                self._repair()

    def _repair(self) -> None:
        """Keep only the complete records (rewritten atomically if any line is dropped)."""
        text = self.path.read_bytes()
        lines = text.split(b"\n")
        kept = [line for line in lines[:-1] if _record(line) is not None]  # lines[-1]: after the last newline
        dropped = len(lines) - 1 - len(kept) + (lines[-1].strip() != b"")
        if dropped:
            print(f"warning: {self.path}: dropped {dropped} incomplete or unreadable line(s) (a run stopped while "
                  "writing?)", file=sys.stderr, flush=True)
            atomic_write(self.path, lambda f: f.write(b"".join(line + b"\n" for line in kept)))

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (numbers, strings, lists) as one line, synced to disk."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if self.also is not None:
                self.also(record)

    def read(self) -> list[dict[str, Any]]:
        """All records, the last one per epoch (a resumed epoch replaces its first attempt)."""
        by_epoch: dict[int, dict[str, Any]] = {}
        for line in self.path.read_text().splitlines():
            record = json.loads(line)
            by_epoch[record["epoch"]] = record
        return [by_epoch[e] for e in sorted(by_epoch)]


def _record(line: bytes) -> dict[str, Any] | None:
    """The metrics record of one line, or None if it is not a JSON object with an integer epoch."""
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return record if isinstance(record, dict) and isinstance(record.get("epoch"), int) else None


# ---------------------------------------------------------------------------- evaluation
#: The fixed held-out split of every run: the same for every method, seed and baseline.
TEST_FRACTION, SPLIT_SEED = 0.2, 0
#: k of the weighted k-NN (capped by the train split's size on tiny subsets).
KNN_K = (20, 200)
#: Keys an evaluation adds to a metrics record (see :meth:`Evaluator.evaluate`).
EVAL_KEYS = ("knn_top1@20", "knn_top1@200", "linear_top1", "feat_nmi", "feat_ari", "feat_acc")
#: The probe is fitted on at most this many training images (a fixed class-stratified part of the
#: train split): scikit-learn's multinomial fit on ImageNet's million 2048-d features would take hours.
PROBE_MAX_TRAIN = 50_000
#: The raw-pixel baseline is skipped when the flattened images would take more bytes (float32).
PIXEL_BASELINE_MAX_BYTES = 1 << 30
SPLIT_FILE = "split.npz"
BASELINES_FILE = "baselines.json"
ASSIGNMENTS_FILE = "assignments.csv"


def eval_due(epoch: int, stop: int, every: int) -> bool:
    """Whether finished epoch ``epoch`` (1-based) is evaluated: every ``every`` epochs (0: never
    on the way) and always the last epoch of the run, ``stop``."""
    return epoch == stop or (every > 0 and epoch % every == 0)


def pixel_baseline_affordable(num_images: int, resolution: int) -> bool:
    """Whether the flattened eval images (N, 3·resolution²) float32 fit :data:`PIXEL_BASELINE_MAX_BYTES`."""
    return num_images * 3 * resolution * resolution * 4 <= PIXEL_BASELINE_MAX_BYTES


class Evaluator:
    """The evaluation protocol of one run: a fixed split, frozen-feature scores and the baselines.

    The split is ``cl.stratified_split(targets, 0.2, seed=0)`` (labels used for evaluation
    only); with ``write`` it is saved as ``<dir>/split.npz`` (``train`` and ``test`` index
    arrays). :meth:`evaluate` scores features; the baselines (the randomly initialised network
    and the raw pixels through the same protocol) live in ``<dir>/baselines.json``.

    Parameters
    ----------
    directory : the run directory
    targets : (N,) int64 true class labels
    seed : seed of the k-means of :meth:`evaluate` (the run's ``--seed``)
    write : whether this process writes files (rank 0 of a training run)
    """

    def __init__(self, directory: Path, targets: np.ndarray, seed: int, write: bool) -> None:
        self.directory = Path(directory)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.seed = seed
        self.write = write
        self.train, self.test = cl.stratified_split(self.targets, TEST_FRACTION, seed=SPLIT_SEED)
        self.probe_train = self.train
        if len(self.train) > PROBE_MAX_TRAIN:
            part = cl.stratified_split(self.targets[self.train], PROBE_MAX_TRAIN / len(self.train), seed=SPLIT_SEED)[1]
            self.probe_train = self.train[part]
        if write:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(self.directory / SPLIT_FILE, lambda f: np.savez(f, train=self.train, test=self.test))

    def evaluate(self, features: np.ndarray) -> dict[str, float | None]:
        """Scores of (N, D) frozen features, in dataset order (L2-normalised here).

        Returns :data:`EVAL_KEYS`: ``knn_top1@20`` and ``knn_top1@200`` (weighted k-NN fitted on
        the train split, scored on the test split; k capped by the train split's size),
        ``linear_top1`` (a logistic-regression probe on standardised features, C = 1, fitted on
        the train split, or a fixed class-stratified part of :data:`PROBE_MAX_TRAIN` of it), and
        ``feat_nmi``, ``feat_ari``, ``feat_acc`` (k-means of all N features with k = the number
        of classes, against the labels). k-NN and probe are ``None`` when the split leaves no
        test sample or fewer than two training classes (tiny subsets).
        """
        x = np.asarray(features, dtype=np.float32)
        if x.shape[0] != self.targets.shape[0]:
            raise ValueError(f"features must have one row per image ({self.targets.shape[0]}), got {x.shape[0]}")
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        out: dict[str, float | None] = dict.fromkeys(EVAL_KEYS[:3])
        y_train, y_test = self.targets[self.train], self.targets[self.test]
        if len(self.test) and np.unique(y_train).shape[0] >= 2:
            ks = [min(k, len(self.train)) for k in KNN_K]
            knn = cl.knn_accuracy(x[self.train], y_train, x[self.test], y_test, k=sorted(set(ks)),
                                  num_classes=int(self.targets.max()) + 1)
            for k, capped in zip(KNN_K, ks):
                out[f"knn_top1@{k}"] = knn[f"knn_top1@{capped}"]
            probe = cl.linear_probe(x[self.probe_train], self.targets[self.probe_train], x[self.test], y_test)
            out["linear_top1"] = probe["probe_top1"]
        scores = cl.cluster_scores(x, self.targets, seed=self.seed)
        out |= {"feat_nmi": scores["nmi"], "feat_ari": scores["ari"], "feat_acc": scores["acc"]}
        return out

    def load_baselines(self) -> dict[str, Any] | None:
        """The run directory's baselines, or None if it has none (or an unreadable file)."""
        try:
            baselines = json.loads((self.directory / BASELINES_FILE).read_text())
        except (OSError, ValueError):
            return None
        return baselines if isinstance(baselines, dict) and {"random_net", "pixels"} <= set(baselines) else None

    def make_baselines(self, random_net: np.ndarray, pixels: np.ndarray | None) -> dict[str, Any]:
        """Evaluate the random network's features and the flattened pixels (``None``: skipped,
        too large); saved to ``<dir>/baselines.json`` when writing."""
        baselines = {"random_net": self.evaluate(random_net), "pixels": None if pixels is None else self.evaluate(pixels),
                     "split": {"test_fraction": TEST_FRACTION, "seed": SPLIT_SEED, "train": len(self.train),
                               "test": len(self.test)}}
        if self.write:
            atomic_write(self.directory / BASELINES_FILE, lambda f: f.write(json.dumps(baselines, indent=1).encode()))
        return baselines


def _assignment_rows(data: ImageData, labels: Any, start: int, header: bool) -> bytes:
    """The CSV lines of :func:`write_assignments` for the images ``start .. start + len(labels) - 1``."""
    labels = np.asarray(to_numpy(labels), dtype=np.int64)
    if labels.ndim != 1 or not 0 <= start <= start + labels.shape[0] <= len(data):
        raise ValueError(f"labels must have one entry per image of [{start}, {len(data)}), got shape {labels.shape}")
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    if header:
        writer.writerow(["index", "path_or_id", "cluster"])
    stop = start + labels.shape[0]
    writer.writerows(zip(range(start, stop), data.names()[start:stop], labels.tolist()))
    return rows.getvalue().encode()


def write_assignments(directory: Path, data: ImageData, labels: Any) -> Path:
    """``<dir>/assignments.csv``: ``index,path_or_id,cluster`` for every training image (atomic).

    ``labels`` (N,) are the method's final cluster ids (any backend); ``path_or_id`` is the
    image's file, or its index in the full data set (the digits demo).
    """
    if np.shape(to_numpy(labels)) != (len(data),):
        raise ValueError(f"labels must have one entry per image ({len(data)}), got shape {np.shape(to_numpy(labels))}")
    path = Path(directory) / ASSIGNMENTS_FILE
    rows = _assignment_rows(data, labels, 0, header=True)
    atomic_write(path, lambda f: f.write(rows))
    return path


def write_assignment_part(directory: Path, data: ImageData, labels: Any, start: int, part: int) -> Path:
    """Part ``part`` of ``assignments.csv`` (atomic): the rows of the images ``start ..
    start + len(labels) - 1`` (part 0 with the header), for labels that no process holds
    entirely; :func:`join_assignment_parts` puts the parts together."""
    path = Path(directory) / f".{ASSIGNMENTS_FILE}.part-{part}"
    rows = _assignment_rows(data, labels, start, header=part == 0)
    atomic_write(path, lambda f: f.write(rows))
    return path


def join_assignment_parts(directory: Path, parts: int) -> Path:
    """``<dir>/assignments.csv`` from the ``parts`` files of :func:`write_assignment_part`, in
    order, streamed (atomic); the parts are removed afterwards."""
    names = [Path(directory) / f".{ASSIGNMENTS_FILE}.part-{p}" for p in range(parts)]

    def write(f: IO[bytes]) -> None:
        for name in names:
            with open(name, "rb") as part:
                shutil.copyfileobj(part, f)

    path = Path(directory) / ASSIGNMENTS_FILE
    atomic_write(path, write)
    for name in names:
        name.unlink()
    return path


def _eval_text(scores: dict[str, Any] | None, feat: str = "") -> str:
    """``kNN@20 0.912  probe 0.934  NMI 0.710  ACC 0.700`` of an evaluation (n/a where not computed)."""
    if scores is None:
        return "not computed (too large)"
    show = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"kNN@20 {show(scores.get('knn_top1@20'))}  probe {show(scores.get('linear_top1'))}  "
            f"{feat}NMI {show(scores.get('feat_nmi'))}  ACC {show(scores.get('feat_acc'))}")


def summary_line(method: str, labels: str, record: dict[str, Any], baselines: dict[str, Any] | None) -> str:
    """The run's last line: the frozen features' evaluation, the training labels' scores, and
    the same evaluation of the randomly initialised network and of the raw pixels.

    ``final ODC: kNN@20 0.912  probe 0.934  feat NMI 0.710  ACC 0.700 | memory labels NMI ..  ACC ..
    | random net: kNN@20 ..  probe ..  NMI ..  ACC .. | pixels: kNN@20 ..  probe ..  NMI ..  ACC ..``
    """
    parts = [f"final {method}: {_eval_text(record, 'feat ')}", f"{labels} NMI {record['nmi']:.3f}  ACC {record['acc']:.3f}"]
    if baselines is None:
        parts.append("baselines: not computed")
    else:
        parts += [f"random net: {_eval_text(baselines['random_net'])}", f"pixels: {_eval_text(baselines['pixels'])}"]
    return " | ".join(parts)


def eval_only_lines(method: str, labels: str, record: dict[str, Any], baselines: dict[str, Any] | None) -> str:
    """What ``--eval-only`` prints: the record as JSON (``evaluation {...}``), then :func:`summary_line`."""
    return f"evaluation {json.dumps(record)}\n{summary_line(method, labels, record, baselines)}"


# ---------------------------------------------------------------------------- scores and output
def cluster_scores(truth: np.ndarray, labels: Any) -> dict[str, float]:
    """NMI, ARI and Hungarian-matched accuracy of cluster ``labels`` (any backend, any device)."""
    labels = np.asarray(to_numpy(labels), dtype=np.int64)
    return {"nmi": metrics.nmi(truth, labels), "ari": metrics.ari(truth, labels), "acc": metrics.accuracy(truth, labels)}


def contingency_scores(table: Any) -> dict[str, float]:
    """:func:`cluster_scores` from the (classes, clusters) contingency table of the labels alone
    (``table[i, j]``: the samples of class ``i`` in cluster ``j``; any backend): the scores
    depend on nothing else, so processes that each hold some of the labels sum their tables
    instead of gathering the labels. NMI by :func:`clusterlearn.metrics.nmi_from_contingency`,
    ARI from the pair counts as scikit-learn's ``adjusted_rand_score`` computes them, accuracy
    by the same Hungarian matching as :func:`clusterlearn.metrics.accuracy`."""
    from scipy.optimize import linear_sum_assignment

    t = np.asarray(to_numpy(table), dtype=np.int64)
    n = int(t.sum())
    squares = int((t * t).sum())
    same_class = int(t.sum(axis=1) @ t.sum(axis=1)) - squares  # ordered pairs in one class, not one cluster
    same_cluster = int(t.sum(axis=0) @ t.sum(axis=0)) - squares
    both, neither = squares - n, n * n - same_class - same_cluster - squares
    ari = 1.0 if same_class == same_cluster == 0 else 2.0 * (both * neither - same_class * same_cluster) / (
        (both + same_class) * (same_class + neither) + (both + same_cluster) * (same_cluster + neither))
    rows, cols = linear_sum_assignment(t, maximize=True)
    return {"nmi": metrics.nmi_from_contingency(t), "ari": ari, "acc": float(t[rows, cols].sum()) / n}


def size_stats(labels: Any, num_clusters: int) -> tuple[np.ndarray, dict[str, int]]:
    """Cluster sizes (C,) of ``labels`` (any backend) and their min/max (and how many are empty)."""
    sizes = np.bincount(np.asarray(to_numpy(labels), dtype=np.int64), minlength=num_clusters)
    return sizes, sizes_record(sizes)


def sizes_record(sizes: Any) -> dict[str, int]:
    """The smallest and largest of the cluster ``sizes`` (C,) and how many are empty."""
    sizes = np.asarray(to_numpy(sizes), dtype=np.int64)
    return {"cluster_size_min": int(sizes.min()), "cluster_size_max": int(sizes.max()),
            "empty_clusters": int((sizes == 0).sum())}


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
    if "feat_nmi" in record:
        parts.append(f"| eval: {_eval_text(record, 'feat ')}")
    return "  ".join(parts)


#: What the evaluation panel of the summary plot draws: record key, legend label.
_PLOTTED_EVAL = (("knn_top1@20", "kNN@20"), ("linear_top1", "probe"), ("feat_nmi", "feature NMI"))


def plot_run(directory: Path, records: list[dict[str, Any]], sizes: np.ndarray, title: str,
             baselines: dict[str, Any] | None = None) -> Path:
    """``<dir>/summary.png``: loss and NMI/ACC per epoch, a histogram of the final cluster sizes,
    and (when any record was evaluated) kNN@20, probe and feature NMI over the evaluated
    epochs with ``baselines`` (random network dashed, raw pixels dotted) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    evaluated = [r for r in records if "feat_nmi" in r]
    fig, axes = plt.subplots(1, 4 if evaluated else 3, figsize=(19 if evaluated else 14, 4))
    ax_loss, ax_nmi, ax_hist = axes[:3]
    ax_loss.plot(epochs, [r["loss"] for r in records], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_nmi.plot(epochs, [r["nmi"] for r in records], marker="o", label="NMI")
    ax_nmi.plot(epochs, [r["acc"] for r in records], marker="s", label="ACC")
    ax_nmi.set(xlabel="epoch", ylim=(0, 1), title="against the true labels")
    ax_nmi.legend()
    for ax in (ax_loss, ax_nmi):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if evaluated:
        _plot_eval(axes[3], evaluated, baselines)
        axes[3].set_xlim(ax_loss.get_xlim())  # the same epochs as the loss, also with one evaluation
        axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_hist.hist(sizes, bins=min(50, max(len(sizes), 1)))
    ax_hist.set(xlabel="samples per cluster", ylabel="clusters", title=f"final cluster sizes (C = {len(sizes)})")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(directory) / "summary.png"
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def _plot_eval(ax: Any, evaluated: list[dict[str, Any]], baselines: dict[str, Any] | None) -> None:
    """The evaluation panel: frozen-feature scores per evaluated epoch, baselines as lines."""
    for i, (key, label) in enumerate(_PLOTTED_EVAL):
        colour = f"C{i}"
        points = [(r["epoch"], r[key]) for r in evaluated if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", color=colour, label=label)
        for name, style in (("random_net", "--"), ("pixels", ":")):
            value = ((baselines or {}).get(name) or {}).get(key)
            if value is not None:
                ax.axhline(value, color=colour, linestyle=style, linewidth=1)
    ax.plot([], [], "k--", linewidth=1, label="random network")
    ax.plot([], [], "k:", linewidth=1, label="raw pixels")
    ax.set(xlabel="epoch", ylim=(0, 1), title="frozen features (held-out split)")
    ax.legend(fontsize="small")


def progress(iterable: Iterable[Any], enabled: bool, desc: str, total: int | None = None) -> Iterable[Any]:
    """A tqdm bar over ``iterable`` when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)
