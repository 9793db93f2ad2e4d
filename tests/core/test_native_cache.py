"""The fused kernel's build cache (``adapters/_native.py``): what it loads, the modes it
creates, the warnings it gives, and the kernel built for a baseline ISA.

Loading a library runs its code, so each scenario runs in a child process: a planted library's
constructor, or a SIGBUS from a truncated one, then shows as a failed assertion here instead of
acting inside (or killing) pytest.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterlearn.adapters import _native

ROOT = Path(__file__).resolve().parents[2]
COMPILER = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")

# One torch loss through the fused kernel, compared with the torch-op closed form (float64,
# within the rounding bound of tests/bounds.py), then the names and modes of what
# the cache holds.
LOSS = """
import json, os, stat, sys, warnings, numpy as np, torch
from clusterlearn.adapters import _native
from clusterlearn.adapters._torch_self_classifier import self_classifier_head_loss as f
sys.path.insert(0, TESTS)
from bounds import rounding_bounds
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lib = _native.kernel()
    rng = np.random.default_rng(0)
    v = [torch.tensor(rng.standard_normal((16, 5)), requires_grad=True) for _ in range(2)]
    got = f(v, kernel="auto")
    want = f(v, kernel="array")
    grads = [g.numpy() for g in torch.autograd.grad(want, v)]
    bound = 2 * rounding_bounds([x.detach().numpy() for x in v], float(want), grads, np.float64)[0]
cache = os.environ["CLUSTERLEARN_CACHE"]
modes = {}
for d, dirs, files in os.walk(cache):
    for name in dirs + files:
        path = os.path.join(d, name)
        modes[os.path.relpath(path, cache)] = stat.S_IMODE(os.lstat(path).st_mode)
print(json.dumps(dict(
    loaded=lib is not None, close=abs(float(got) - float(want)) <= bound,
    warnings=[str(w.message) for w in caught if "clusterlearn" in str(w.message)], modes=modes,
)))
""".replace("TESTS", repr(str(Path(__file__).parent)))


def run_child(code: str, cache: Path, **env: str) -> dict:
    """Run ``code`` in a child Python with ``CLUSTERLEARN_CACHE=cache``; its last line's JSON."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "CLUSTERLEARN_CACHE": str(cache), **env}
    result = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"child exited {result.returncode}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str, dict]:
    """A cache holding a kernel built under umask 000 into missing directories (copied into the
    tests' caches: one compile), its library's name and the child's report."""
    pytest.importorskip("torch")
    if COMPILER is None:
        pytest.skip("no C++ compiler")
    cache = tmp_path_factory.mktemp("built") / "a" / "b" / "cache"
    out = run_child("import os; os.umask(0)\n" + LOSS, cache)
    name = _native._library_file(COMPILER, "self_classifier", _native._SOURCE, [])
    assert (cache / name).is_file()
    return cache, name, out


def copy_cache(built: tuple[Path, str, dict], to: Path) -> Path:
    shutil.copytree(built[0], to)
    return to


def copying_compiler(built: tuple[Path, str, dict], tmp_path: Path, seconds: float = 0) -> tuple[dict, Path]:
    """``CXX`` for a child: a stand-in for the compiler that reports its version (so the cache
    key, and the library's name, are the real compiler's), "links" by copying the fixture's
    library after ``seconds`` and logs each link: rebuilds without compiling, and countable."""
    log = tmp_path / "links.log"
    script = tmp_path / "cxx"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && exec "{COMPILER}" --version\n'
        'prev=; out=; for a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; done\n'
        f'case "$out" in *.so) sleep {seconds}; cp "{built[0] / built[1]}" "$out"; echo link >> "{log}";; *) : > "$out";; esac\n'
    )
    script.chmod(0o700)
    return {"CXX": str(script)}, log


def links(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def planted_library(tmp_path: Path, marker: Path) -> bytes:
    """A harmless shared library whose constructor creates ``marker`` (as a planted one could do
    anything)."""
    source = tmp_path / "planted.cpp"
    source.write_text(
        "#include <cstdio>\n"
        f'__attribute__((constructor)) static void planted() {{ std::FILE* f = std::fopen("{marker}", "w"); if (f) std::fclose(f); }}\n'
    )
    lib = tmp_path / "planted.so"
    subprocess.run([COMPILER, "-shared", "-fPIC", str(source), "-o", str(lib)], check=True, capture_output=True)
    return lib.read_bytes()


def plant(cache: Path, name: str, data: bytes, mode: int) -> None:
    """Put ``data`` at the kernel's path with a matching SHA-256 beside it (a planter can
    compute one too)."""
    import hashlib

    (cache / name).write_bytes(data)
    (cache / (name + ".sha256")).write_text(hashlib.sha256(data).hexdigest() + "\n")
    for path in (cache / name, cache / (name + ".sha256")):
        path.chmod(mode)


@pytest.mark.slow
@needs_compiler
def test_planted_library_in_shared_cache_is_not_loaded(built, tmp_path):
    """A cache directory others can write to is refused (with a warning), whatever it holds, and
    the kernel is built privately instead; in a private cache a library that others can write
    to is not loaded either but rebuilt."""
    marker = tmp_path / "constructor-ran"
    data = planted_library(tmp_path, marker)
    cxx, log = copying_compiler(built, tmp_path)
    shared = copy_cache(built, tmp_path / "shared")
    plant(shared, built[1], data, 0o777)
    shared.chmod(0o777)  # a world-writable directory, as CLUSTERLEARN_CACHE=/tmp/something
    out = run_child(LOSS, shared, **cxx)
    assert not marker.exists(), "the planted library's constructor ran"
    assert out["loaded"] and out["close"] and links(log) == 1
    assert any("writable by others" in w for w in out["warnings"]), out["warnings"]
    assert (shared / built[1]).read_bytes() == data  # not touched either

    private = copy_cache(built, tmp_path / "private")
    plant(private, built[1], data, 0o666)  # this user's directory, a file others can write
    out = run_child(LOSS, private, **cxx)
    assert not marker.exists(), "the planted library's constructor ran"
    assert out["loaded"] and out["close"] and not out["warnings"] and links(log) == 2
    assert (private / built[1]).read_bytes() == (built[0] / built[1]).read_bytes()  # rebuilt in its place
    assert out["modes"][built[1]] == 0o700 and out["modes"][built[1] + ".sha256"] == 0o600


# Replace the cache's library by the planted one right after its digest was checked (a concurrent
# writer could), then load: what gets mapped must be the verified file, not the name's new target.
SWAP_AFTER_CHECK = """
import json, os, warnings
from clusterlearn.adapters import _native
checked = _native._open_verified
def swapping(dir_fd, name):
    fd = checked(dir_fd, name)
    if fd is not None and name.endswith(".so"):
        tmp = ".swap"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o700, dir_fd=dir_fd), "wb") as f:
            with open(PLANTED, "rb") as planted:
                f.write(planted.read())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    return fd
_native._open_verified = swapping
if NO_PROC:  # as on macOS: no /proc/self/fd
    exists = os.path.exists
    os.path.exists = lambda p: False if str(p).startswith("/proc/self/fd/") else exists(p)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lib = _native._load("self_classifier", _native._SOURCE)
print(json.dumps(dict(loaded=lib is not None and hasattr(lib, "sc_stats_size"),
                      warnings=[str(w.message) for w in caught])))
"""


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("no_proc", [False, True], ids=["proc", "no-proc"])
def test_the_library_loaded_is_the_one_verified(built, tmp_path, no_proc):
    """A library swapped in at the verified one's name after the digest check is not what gets
    loaded: through /proc/self/fd of the checked descriptor, or (without /proc) from a private
    copy of the checked bytes."""
    marker = tmp_path / "constructor-ran"
    planted = tmp_path / "planted.so"
    planted.write_bytes(planted_library(tmp_path, marker))
    cache = copy_cache(built, tmp_path / "cache")
    code = SWAP_AFTER_CHECK.replace("PLANTED", repr(str(planted))).replace("NO_PROC", repr(no_proc))
    out = run_child(code, cache)
    assert not marker.exists(), "the planted library's constructor ran"
    assert out["loaded"] and not out["warnings"], out


@pytest.mark.slow
@needs_compiler
def test_an_unusable_cache_builds_privately(built, tmp_path):
    """A cache directory that cannot be created (here its parent is a file; also e.g.
    HOME=/nonexistent) is treated as an untrusted one: a warning, and the kernel is built in a
    private temporary directory."""
    cxx, log = copying_compiler(built, tmp_path)
    parent = tmp_path / "not-a-directory"
    parent.write_text("")
    out = run_child(LOSS, parent / "cache", **cxx)
    assert out["loaded"] and out["close"] and links(log) == 1
    assert len(out["warnings"]) == 1 and "cannot use the kernel cache" in out["warnings"][0], out["warnings"]


@pytest.mark.slow
@needs_compiler
def test_truncated_library_is_rebuilt(built, tmp_path):
    """A truncated library (an interrupted copy, a full disk) fails its digest and is rebuilt;
    loaded as it was, it killed the process with SIGBUS at the first loss. A whole one is
    loaded as it is."""
    cxx, log = copying_compiler(built, tmp_path)
    cache = copy_cache(built, tmp_path / "cache")
    out = run_child(LOSS, cache, **cxx)
    assert out["loaded"] and out["close"] and links(log) == 0
    lib = cache / built[1]
    whole = lib.read_bytes()
    lib.write_bytes(whole[: len(whole) // 2])
    out = run_child(LOSS, cache, **cxx)
    assert out["loaded"] and out["close"] and not out["warnings"] and links(log) == 1
    assert lib.read_bytes() == whole


@pytest.mark.slow
@needs_compiler
def test_concurrent_builders_build_once(built, tmp_path):
    """Two processes (DDP ranks) that need the kernel at the same moment: one builds (1 s here),
    the other waits for its lock and loads the result."""
    cxx, log = copying_compiler(built, tmp_path, seconds=1)
    cache, go = tmp_path / "cache", tmp_path / "go"
    barrier = (
        "import os, pathlib, time, torch\n"
        "from clusterlearn.adapters import _native\n"
        f"pathlib.Path(r'{tmp_path}', f'ready-{{os.getpid()}}').touch()\n"
        f"while not pathlib.Path(r'{go}').exists(): time.sleep(0.01)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CLUSTERLEARN_CACHE": str(cache), **cxx}
    children = [
        subprocess.Popen([sys.executable, "-c", barrier + LOSS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for _ in range(6000):  # both ready (imports done), then both released at once
            if len(list(tmp_path.glob("ready-*"))) == 2 or any(c.poll() is not None for c in children):
                break
            time.sleep(0.01)
        go.touch()
        results = [c.communicate(timeout=300) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    for c, (out, err) in zip(children, results):
        assert c.returncode == 0, err[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert report["loaded"] and report["close"] and not report["warnings"]
    assert links(log) == 1


@pytest.mark.slow
@needs_compiler
def test_umask_000_gives_private_modes(built):
    """Under umask 000 (the fixture's build) the cache's missing directories are created 0o700
    and its files 0o700 (libraries) / 0o600 (digests, lock): nobody else can plant or alter
    anything."""
    cache, _, out = built
    assert out["loaded"] and out["close"] and not out["warnings"]
    assert len(out["modes"]) == 3, out["modes"]
    for name, mode in out["modes"].items():
        want = 0o700 if name.endswith(".so") else 0o600
        assert mode == want, (name, oct(mode))
    for d in (cache.parent.parent, cache.parent, cache):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


@pytest.mark.parametrize("why", ["CLUSTERLEARN_NATIVE=0", "no C++ compiler"])
def test_no_kernel_warns_once(why, tmp_path, monkeypatch):
    """With CLUSTERLEARN_NATIVE=0, or without a compiler, the kernel's loaders return ``None``
    (the "auto" loss then uses the array implementation: test_kernel_selection) with one
    RuntimeWarning per process, torch's and JAX's loaders together."""
    import warnings

    monkeypatch.setattr(_native, "_warned", set())
    monkeypatch.setenv("CLUSTERLEARN_CACHE", str(tmp_path / "cache"))
    if why == "CLUSTERLEARN_NATIVE=0":
        monkeypatch.setenv("CLUSTERLEARN_NATIVE", "0")
    else:
        monkeypatch.delenv("CXX", raising=False)
        monkeypatch.setattr(_native.shutil, "which", lambda name: None)
    loaders = [_native.kernel.__wrapped__]
    if pytest.importorskip("importlib").util.find_spec("jax") is not None:
        loaders.append(_native.xla_targets.__wrapped__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert all(load() is None for load in loaders)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and why in messages[0] and "array implementation" in messages[0], messages
    assert not (tmp_path / "cache").exists()


def test_march_variable(monkeypatch):
    """CLUSTERLEARN_MARCH selects ``-march`` (default native) and is part of the cache key; a
    value that is not an ISA name is refused with a warning, never passed on."""
    monkeypatch.delenv("CLUSTERLEARN_MARCH", raising=False)
    assert _native.march() == "native" and "-march=native" in _native._compile_flags()
    monkeypatch.setenv("CLUSTERLEARN_MARCH", "x86-64-v2")
    assert "-march=x86-64-v2" in _native._compile_flags()
    if COMPILER is not None:
        v2 = _native._library_file(COMPILER, "self_classifier", _native._SOURCE, [])
        monkeypatch.setenv("CLUSTERLEARN_MARCH", "native")
        assert _native._library_file(COMPILER, "self_classifier", _native._SOURCE, []) != v2
    monkeypatch.setattr(_native, "_warned", set())
    for bad in ("native -fplugin=evil.so", "-O0", "a;b"):
        monkeypatch.setenv("CLUSTERLEARN_MARCH", bad)
        assert _native.march() is None
    with pytest.warns(RuntimeWarning, match="not an ISA name"):
        assert _native.kernel.__wrapped__() is None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def baseline_isa() -> tuple[str, str | None] | None:
    """An x86-64 level below this CPU's own (so that it runs here and takes other code paths than
    ``-march=native``) and XLA's matching ``--xla_cpu_max_isa``; ``None`` off x86-64."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = _cpu_flags()
    if "avx512f" in flags:
        return "x86-64-v3", "AVX2"  # AVX2 + FMA: the machines the suite was first tuned on
    if "avx2" in flags:
        return "x86-64-v2", "SSE4_2"
    return "x86-64", None


@pytest.mark.slow
@needs_compiler
def test_kernel_built_for_baseline_isa(tmp_path):
    """The kernel built for an ISA below this CPU's (AVX2 on an AVX-512 machine, SSE4.2 on an
    AVX2 one) passes the fused kernel's checks against the array closed form and the float64
    core, with the tolerances their error bounds give: a suite tuned on one ISA must hold on
    the others. (The rest of the suite runs the ``-march=native`` build.)"""
    pytest.importorskip("torch")
    isa = baseline_isa()
    if isa is None:
        pytest.skip("x86-64 ISA levels only")
    march, xla_isa = isa
    cache = tmp_path / "cache"
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "CLUSTERLEARN_CACHE": str(cache), "CLUSTERLEARN_MARCH": march,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_max_isa={xla_isa}" if xla_isa else os.environ.get("XLA_FLAGS", ""),
    }
    selection = [
        "tests/self_classifier/test_fused_kernel.py::test_fused_equals_array_closed_form",
        "tests/self_classifier/test_fused_kernel.py::test_fused_peaked_logits_and_denormal_mode",
        "tests/self_classifier/test_closed_form.py::test_torch_extreme_logits_match_float64",
        "tests/self_classifier/test_closed_form.py::test_jax_extreme_logits_match_float64",
        "-k", "not large and not 8v and not tiny and not 2-",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-1000:]
    (lib,) = cache.glob("self_classifier_" + "?" * 16 + ".so")
    objdump = shutil.which("objdump")
    if objdump is not None:  # the build really is for the baseline: no wider registers than it has
        text = subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        assert "%zmm" not in text
        if march != "x86-64-v3":
            assert "%ymm" not in text
