"""Helpers shared by the tests that run the example scripts (``examples/``)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def script(name: str) -> ModuleType:
    """An example script imported as a module (``examples/`` on ``sys.path``, as when run)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def records(out: Path) -> list[dict]:
    """The records of ``<out>/metrics.jsonl``, in order."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def npz_checkpoint(out: Path) -> dict[str, np.ndarray]:
    """The arrays of a JAX example's ``<out>/checkpoint.npz`` (no pickles)."""
    with np.load(Path(out) / "checkpoint.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def run_main(name: str, argv: list[str]) -> str:
    """Run an example script's ``main(argv)`` in this process and return what it printed."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        script(name).main(argv)
    return buf.getvalue()
