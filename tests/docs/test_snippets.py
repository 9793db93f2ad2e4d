"""The code blocks of README.md and docs/*.md cannot rot: each one is run or checked here.

- A ```` ```python ```` block runs, in a fresh namespace and a temporary directory. An HTML
  comment right above it (invisible on GitHub and in the rendered site) may say what it needs::

      <!-- snippet
      setup: torch            (names from SETUPS below: a tiny data set, loader, backbone)
      replace: 10_000 => 4    (ImageNet sizes to test sizes; the left side must occur)
      -->

  so a snippet that no longer matches the API fails ``make test``.
- A ```` ```bash ```` block is checked, not run (it trains for hours): every ``make`` target
  it names exists in the Makefile, every script exists, every ``--option`` given to a script
  is defined by it (or by the examples' shared modules), every ``pip install`` extra exists.
- Every public name has a docstring (the same check ``make docs`` runs).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

# Sizes the setups use: large enough for ODC's floor (C * min_cluster_size <= N), small enough
# to run in a second.
SETUPS = {
    "torch": """
import torch
torch.manual_seed(0)

class _Images(torch.utils.data.Dataset):
    # 128 random 3x8x8 images; each item is (image, dataset index), as ODC's loop needs
    def __init__(self):
        self.images = torch.randn(128, 3, 8, 8)
    def __len__(self):
        return len(self.images)
    def __getitem__(self, i):
        return self.images[i], i

dataset = _Images()
loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
eval_loader = torch.utils.data.DataLoader(dataset, batch_size=64)
backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU())  # (B, 32, 8, 8)
view1, view2 = torch.randn(16, 32), torch.randn(16, 32)  # two views' backbone outputs
""",
    "arrays": """
import numpy as np
rng = np.random.default_rng(0)
s1, s2 = rng.standard_normal((64, 10), dtype=np.float32), rng.standard_normal((64, 10), dtype=np.float32)
g1, g2, l1, l2 = (rng.standard_normal((64, 10), dtype=np.float32) for _ in range(4))
a1, a2, b1, b2 = (rng.standard_normal((64, 10), dtype=np.float32) for _ in range(4))
features = rng.standard_normal((300, 64), dtype=np.float32)   # a frozen network's features
labels = np.arange(300) % 5                                   # their true classes
""",
    "jax": """
import numpy as np
import jax.numpy as jnp
rng = np.random.default_rng(0)
N = 256
features = jnp.asarray(rng.standard_normal((N, 16), dtype=np.float32))  # a network's (N, D) features
batches = [(jnp.asarray(rng.permutation(N)[:32]), jnp.asarray(rng.standard_normal((32, 16), dtype=np.float32)))
           for _ in range(3)]                                      # (indices, features) per step
""",
    # frozen features of 5 classes, for the evaluation page
    "frozen": """
import numpy as np
rng = np.random.default_rng(0)
num_classes = 5
labels = np.repeat(np.arange(num_classes), 60)
feats = (rng.standard_normal((num_classes, 32)) * 3)[labels] + rng.standard_normal((300, 32))
feats = feats.astype(np.float32)
""",
    # what torchrun puts in the environment, for a group of one
    "torchrun-env": """
import datetime, os, socket, torch
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_s.getsockname()[1]), RANK="0", WORLD_SIZE="1")
backend = "gloo"
""",
    # a process group of one (gloo on the loopback): the collectives' code paths, in one process
    "gloo": """
import os, socket, torch
with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_s.getsockname()[1]))
torch.distributed.init_process_group("gloo", rank=0, world_size=1)
""",
}


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    body: str
    setup: list[str] = field(default_factory=list)
    replace: list[tuple[str, str]] = field(default_factory=list)

    @property
    def id(self) -> str:
        path = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{path}:{self.line}"


FENCE = re.compile(
    r"(?:<!--\s*snippet\s*\n(?P<meta>.*?)-->\s*\n)?^```(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)^```\s*$",
    re.S | re.M,
)


def doc_files() -> list[Path]:
    """README.md and every Markdown page of docs/ (not the build or the generated API pages)."""
    pages = [p for p in sorted(DOCS.rglob("*.md")) if not {"_build", "api"} & set(p.relative_to(DOCS).parts)]
    return [ROOT / "README.md", *pages]


def parse(path: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of one Markdown file, with their snippet settings."""
    text = path.read_text() if text is None else text
    blocks = []
    for m in FENCE.finditer(text):
        block = Block(path, text.count("\n", 0, m.start("body")), m["lang"], m["body"])
        for line in (m["meta"] or "").splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "setup":
                block.setup += value.split()
            elif key == "replace":
                old, sep, new = value.partition("=>")
                if not sep:
                    raise ValueError(f"{block.id}: replace needs 'old => new', got {value!r}")
                block.replace.append((old.strip(), new.strip()))
            elif key:
                raise ValueError(f"{block.id}: unknown snippet setting {key!r}")
        blocks.append(block)
    return blocks


ALL_BLOCKS = [b for p in doc_files() for b in parse(p)]
PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]
SHELL = [b for b in ALL_BLOCKS if b.lang in ("bash", "sh", "shell")]


def source_of(block: Block) -> str:
    """The code that runs: the setups, then the block with its replacements applied."""
    body = block.body
    for old, new in block.replace:
        if old not in body:
            raise AssertionError(f"{block.id}: 'replace: {old} => ...' but the snippet has no {old!r}")
        body = body.replace(old, new)
    unknown = [s for s in block.setup if s not in SETUPS]
    if unknown:
        raise AssertionError(f"{block.id}: unknown setup {unknown}; known: {sorted(SETUPS)}")
    return "\n".join([*(SETUPS[s] for s in block.setup), body])


#: clusterlearn's deprecation messages ("X is deprecated, use Y"): a page still showing an old name fails
DEPRECATED = re.compile(r"(is|are) deprecated, use ")


def run_block(block: Block) -> dict:
    namespace = {"__name__": "__snippet__"}
    code = compile(source_of(block), block.id, "exec")
    environ = dict(os.environ)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*" + DEPRECATED.pattern, category=DeprecationWarning)
            exec(code, namespace)  # noqa: S102  (the project's own documentation)
    finally:  # leave no process group and no torchrun variables to later tests
        if "torch" in sys.modules and sys.modules["torch"].distributed.is_initialized():
            sys.modules["torch"].distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    return namespace


def test_docs_have_code_blocks():
    assert len(PYTHON) >= 10, [b.id for b in PYTHON]
    assert any(b.path.name == "README.md" for b in PYTHON)


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_python_snippet_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_block(block)


def test_a_snippet_off_the_api_fails(tmp_path, monkeypatch):
    """The check can fail: a snippet calling a removed or deprecated argument raises, a stale replace is caught."""
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "page.md"
    stale = (
        "<!-- snippet\nsetup: arrays\n-->\n```python\nimport clusterlearn as cl\n"
        "cl.kmeans(features, num_clusters=5)\n```\n"
    )
    (block,) = parse(page, stale)
    with pytest.raises(TypeError, match="num_clusters"):
        run_block(block)
    renamed = "<!-- snippet\nsetup: arrays\n-->\n```python\nimport clusterlearn as cl\ncl.SmallClusterHandler(2, split_iters=3)\n```\n"
    (block,) = parse(page, renamed)
    with pytest.raises(DeprecationWarning, match="split_iters"):
        run_block(block)
    moved = "<!-- snippet\nreplace: 10_000 => 4\n-->\n```python\nk = 4096\n```\n"
    (block,) = parse(page, moved)
    with pytest.raises(AssertionError, match="has no '10_000'"):
        source_of(block)


# ------------------------------------------------------------------------- shell blocks
def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for line in text.splitlines() for t in re.findall(r"^([\w.-]+)\s*:(?!=)", line)}


def _extras() -> set[str]:
    import tomllib

    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _options_of(script: Path) -> str:
    """The source that defines a script's options: itself and the examples' shared modules."""
    shared = ["common.py", "jax_common.py", "runs.py"]
    paths = [script, *(script.parent / s for s in shared if (script.parent / s).exists())]
    return "\n".join(p.read_text() for p in paths)


def _defines(source: str, opt: str) -> bool:
    """Whether ``source`` defines ``opt``: literally, or ``--no-X`` as the negation that
    ``argparse.BooleanOptionalAction`` adds to ``--X``."""
    if f'"{opt}"' in source or f"'{opt}'" in source:
        return True
    positive = re.escape("--" + opt[len("--no-"):])
    return opt.startswith("--no-") and re.search(rf"[\"']{positive}[\"'][^\n]*BooleanOptionalAction", source) is not None


def shell_problems(block: Block) -> list[str]:
    problems = []
    for raw in block.body.splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        words = [w for w in shlex.split(line) if "=" not in w or w.startswith("-")]
        if words[:1] == ["make"]:
            problems += [f"no make target {t!r}" for t in words[1:] if t not in _make_targets()]
        if words[:2] == ["pip", "install"]:
            for extra in re.findall(r"\[([\w,-]+)\]", line):
                problems += [f"no extra {e!r}" for e in extra.split(",") if e not in _extras()]
        scripts = [w for w in words if w.endswith(".py")]
        for script in scripts:
            path = ROOT / script
            if not path.exists():
                problems.append(f"no script {script}")
                continue
            source = _options_of(path)
            after = words[words.index(script) + 1 :]
            for opt in (w.split("=")[0] for w in after if w.startswith("--")):
                if not _defines(source, opt):
                    problems.append(f"{script} defines no option {opt}")
    return problems


@pytest.mark.parametrize("block", SHELL, ids=lambda b: b.id)
def test_shell_block_names_what_exists(block):
    assert shell_problems(block) == []


def test_shell_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    text = (
        "```bash\nmake dmeo\npython examples/imagenet_odc_torch.py --epoch 3 --no-colour --no-epochs\n"
        "pip install clusterlearn[jaxx]\n```\n"
    )
    (block,) = parse(page, text)
    assert shell_problems(block) == [
        "no make target 'dmeo'",
        "examples/imagenet_odc_torch.py defines no option --epoch",
        "examples/imagenet_odc_torch.py defines no option --no-epochs",  # --epochs is no flag
        "no extra 'jaxx'",
    ]


# ------------------------------------------------------------------------- links
#: The API reference pages, written by docs/_ext/apigen.py when the site is built (git-ignored).
GENERATED = ROOT / "docs" / "api"


def broken_links(path: Path, text: str) -> list[str]:
    """Relative Markdown links whose file does not exist (Sphinx checks the anchors of docs/);
    links into the generated API reference are left to the build (``make docs``, -n -W)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    generated = lambda t: (path.parent / t).resolve().is_relative_to(GENERATED)  # noqa: E731
    return [t for t in local if t and not (path.parent / t).exists() and not generated(t)]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(path):
    assert broken_links(path, path.read_text()) == []


def test_link_check_can_fail():
    assert broken_links(ROOT / "README.md", "[a](docs/index.md) [b](docs/nope.md#x) [c](https://x.org)") == [
        "docs/nope.md"
    ]


PATH_IN_CODE = re.compile(r"`((?:tests|examples|benchmarks|clusterlearn|adapters|docs)/[\w./-]+)`")


def missing_paths(text: str) -> list[str]:
    """Repository paths named in inline code (`tests/odc/test_torch_ddp.py`) that do not exist."""
    built = ("docs/_build", "docs/api")  # written by `make docs`
    return [p for p in PATH_IN_CODE.findall(text) if not (ROOT / p.rstrip("/")).exists() and not p.startswith(built)]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_exist(path):
    """A guide that names a test or a script the repository moved is stale."""
    assert missing_paths(path.read_text()) == []


def test_path_check_can_fail():
    assert missing_paths("checked in `tests/test_torch_ddp.py` and `tests/odc/test_torch_ddp.py`") == [
        "tests/test_torch_ddp.py"
    ]


ALIASES = {"clt": "clusterlearn.adapters.torch", "clj": "clusterlearn.adapters.jax", "cl": "clusterlearn"}
DOTTED = re.compile(r"\b((?:clusterlearn|clt|clj|cl)(?:\.[A-Za-z_]\w*)+)")


def _names(dotted: str) -> bool:
    """Whether ``clusterlearn.x.y`` (or ``clt.X``, ``clj.X``, ``cl.X``) names an existing object."""
    import importlib

    parts = dotted.split(".")
    parts = [*ALIASES[parts[0]].split("."), *parts[1:]] if parts[0] in ALIASES else parts
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def missing_names(text: str) -> list[str]:
    """Dotted clusterlearn names in the prose's inline code that name nothing (code blocks run anyway)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", prose)
    return [name for span in spans for name in DOTTED.findall(span) if not _names(name)]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_named_objects_exist(path):
    """A guide that names a renamed or removed function in its prose is stale."""
    assert missing_names(path.read_text()) == []


def test_name_check_can_fail():
    assert missing_names("use `clj.shard_memory(state, mesh)` or `clusterlearn.odc_state.stepp`") == [
        "clusterlearn.odc_state.stepp"
    ]


# ------------------------------------------------------------------------- troubleshooting
def _message_source() -> str:
    """The library's and examples' source with adjacent string literals joined, as Python does."""
    paths = [*(ROOT / "clusterlearn").glob("*.py"), *(ROOT / "adapters").glob("*.py"), *(ROOT / "examples").glob("*.py")]
    text = "\n".join(p.read_text() for p in sorted(paths))
    return re.sub(r"\"\s*\n\s*(?:f|rf|fr)?\"", "", text)


def message_problems(page: str, source: str) -> list[str]:
    """Messages quoted as definition terms on the troubleshooting page that the code no longer has.

    Each term's code spans are split at ``{placeholders}`` and ``...``; every literal piece of
    eight characters or more must occur in the source.
    """
    problems = []
    lines = page.splitlines()
    for term, nxt in zip(lines, lines[1:]):
        if not nxt.startswith(": ") or term.startswith(":"):
            continue
        for span in re.findall(r"`([^`]+)`", term):
            for piece in re.split(r"\{[^}]*\}|\.\.\.", span):
                piece = piece.strip()
                if len(piece) >= 8 and piece not in source:
                    problems.append(piece)
    return problems


def test_troubleshooting_messages_are_the_codes():
    page = (DOCS / "troubleshooting.md").read_text()
    assert message_problems(page, _message_source()) == []
    assert message_problems("`indices must be 1-D, got a list`\n: stale\n", _message_source()) == [
        "indices must be 1-D, got a list"
    ]


# ------------------------------------------------------------------------- docstrings
def _apigen():
    import importlib.util

    spec = importlib.util.spec_from_file_location("clusterlearn_docs_apigen", DOCS / "_ext" / "apigen.py")
    apigen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(apigen)
    return apigen


def test_every_public_name_has_a_docstring():
    assert _apigen().missing_docstrings() == []


def test_no_paragraph_is_read_as_a_parameter():
    """numpydoc renders a paragraph after the parameters, without a Notes header, as a parameter."""
    apigen = _apigen()
    assert apigen.prose_in_entries() == []
    doc = "Doc.\n\nParameters\n----------\nx, y : int\n    the values\n**kw : settings\n\n{}Every call is a collective.\n"
    assert apigen.swallowed_paragraph(doc.format("")) == "Every call is a collective."
    assert apigen.swallowed_paragraph(doc.format("Notes\n-----\n")) is None
