"""The fused CPU kernel of the Self-Classifier loss: built with a C++ compiler on first use.

``_self_classifier_kernel.cpp`` (next to this file) streams one head's views row by row: four
passes over the logits, ``(K, N)`` / ``(K, C)`` statistics in between and one gradient-sized
buffer (plus, for small problems, a cache of the exponentials), instead of the ~30 full-size
passes and intermediates of the eager closed form. :func:`kernel` (its C functions, for
PyTorch) and :func:`xla_targets` (its XLA FFI handlers, for JAX) compile it once per machine
and ISA (``-march=$CLUSTERLEARN_MARCH``, default ``native``) into a cache directory
(``$CLUSTERLEARN_CACHE``, else ``$XDG_CACHE_HOME/clusterlearn``, else
``~/.cache/clusterlearn``; a few seconds) and load it with :mod:`ctypes`.

Loading a library runs its code, so only what this process can trust is loaded: the cache
directory must be this user's and writable by nobody else (else a warning, and the kernel is
built in a private temporary directory instead); directories are created 0o700 and files
0o700 / 0o600 whatever the umask; each library is written with its SHA-256 beside it
(``<library>.sha256``), both synced and renamed into place atomically, and is loaded only
if it is this user's, writable by nobody else and matches that digest (else it is rebuilt:
a truncated file would crash the process when mapped). Builders hold a lock on the
directory, so DDP ranks starting together build once. Without a compiler, with
``CLUSTERLEARN_NATIVE=0`` or where the build fails, :func:`kernel` and :func:`xla_targets`
return ``None`` after a RuntimeWarning (once per process) and the adapters use their array
code instead (the same values, slower).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import hmac
import math
import os
import platform
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from clusterlearn.self_classifier_guards import GuardPlan

try:
    import fcntl
except ImportError:  # not POSIX: the kernel is not built (see _load)
    fcntl = None

__all__ = [
    "CACHE_BYTES", "KERNELS", "LOG_SPACE", "NOT_BUILT", "XLA_TARGETS", "Params", "cache_size", "check_kernel",
    "gradient_scale", "kernel", "march", "params", "pointers", "unavailable", "use_fused", "xla_targets",
]

#: The adapters' ``kernel=`` choices: the fused kernel where it applies, always, or never.
KERNELS = ("auto", "fused", "array")
#: Reasons the fused kernel does not apply, shared by the adapters.
LOG_SPACE = "clamp_sums=False, or an eps too small for the dtype, needs the log-space arithmetic"
NOT_BUILT = "it could not be built (no C++ compiler, or CLUSTERLEARN_NATIVE=0)"


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else ValueError."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def use_fused(kernel: str, why_not: Callable[[], str | None]) -> bool:
    """Whether an adapter runs the fused kernel for ``kernel``; ``why_not()`` says why it cannot
    (``None``: it can). ``"fused"`` where it cannot raises ValueError with that reason."""
    if check_kernel(kernel) == "array":
        return False
    why = why_not()
    if why is not None and kernel == "fused":
        raise ValueError(f"kernel='fused' cannot compute this loss: {why}")
    return why is None


def unavailable(plan: GuardPlan, elsewhere: str | None, dtype: Any, built: Callable[[], Any]) -> str | None:
    """Why the fused kernel cannot compute a head under ``plan`` (``None``: it can): ``elsewhere``
    says where the logits are if not on the CPU, ``dtype`` is theirs, ``built()`` loads the kernel."""
    if elsewhere is not None:
        return f"{elsewhere}, the kernel runs on the CPU"
    if plan.rows[2] != 1:
        return f"the kernel takes contiguous loss rows, got rows={plan.loss_rows}"
    if str(dtype).rpartition(".")[2] not in ("float32", "float64"):
        return f"the kernel computes in float32 or float64, the logits are {dtype}"
    if not plan.linear:
        return LOG_SPACE
    return NOT_BUILT if built() is None else None


_SOURCE = Path(__file__).with_name("_self_classifier_kernel.cpp")
_XLA_SOURCE = Path(__file__).with_name("_self_classifier_xla.cpp")
#: The custom-call targets of ``_self_classifier_xla.cpp``.
XLA_TARGETS = ("clusterlearn_sc_forward", "clusterlearn_sc_vjp_fwd", "clusterlearn_sc_vjp_bwd")
# No -ffast-math: the kernel's own exp/log vectorise without it, and its reductions are declared
# with `omp simd` (-fopenmp-simd, no OpenMP runtime); a fast-math link would also add
# crtfastmath.o, which switches the loading thread to flush-to-zero for good.
_COMPILE = ["-O3", "-std=c++17", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
if platform.machine() in ("x86_64", "AMD64"):
    _COMPILE.append("-mprefer-vector-width=512")  # AVX-512 where the ISA has it (1.1-1.2x here)
_LINK = ["-shared", "-pthread"]
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FALLBACK = "using the array implementation instead (the same values, slower)"


def _compile_flags() -> list[str]:
    """The compiler flags, with ``-march`` from :func:`march` (part of the cache key)."""
    return [*_COMPILE, f"-march={march()}"]


class Params(ctypes.Structure):
    """The kernel's ``Params`` (field for field)."""

    _fields_ = [
        ("k", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("c", ctypes.c_int64),
        ("r0", ctypes.c_int64),
        ("r1", ctypes.c_int64),
        ("pairs", ctypes.POINTER(ctypes.c_int64)),
        ("npairs", ctypes.c_int64),
        ("inv_tc", ctypes.c_double),
        ("inv_tr", ctypes.c_double),
        ("log_floor_t", ctypes.c_double),
        ("log_floor_p", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("threads", ctypes.c_int),
    ]


def params(plan: GuardPlan, k: int, *, threads: int) -> Params:
    """The kernel's :class:`Params` for ``k`` views under ``plan`` (a linear-space
    :class:`~clusterlearn.self_classifier_guards.GuardPlan` with contiguous loss rows): the
    temperatures, ``eps`` and the ``exp`` floors all come from the plan."""
    flat = (ctypes.c_int64 * (2 * len(plan.pairs)))(*[v for pair in plan.pairs for v in pair])
    out = Params(
        k, plan.n, plan.c, plan.rows[0], plan.rows[1], flat, len(plan.pairs),
        1.0 / plan.col_temperature, 1.0 / plan.row_temperature,
        math.log(plan.floor_targets), math.log(plan.floor_predictions), plan.eps, max(1, int(threads)),
    )
    out._pairs = flat  # keep the array alive with the struct
    return out


def gradient_scale(plan: GuardPlan) -> float:
    """The factor the kernel's backward applies to the incoming gradient: ``−1 / (P n τ_col)``."""
    return -1.0 / (len(plan.pairs) * plan.num_loss_rows * plan.col_temperature)


def _cache_dir() -> Path:
    root = os.environ.get("CLUSTERLEARN_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clusterlearn"


def march() -> str | None:
    """The ``-march`` the kernel is built for: ``$CLUSTERLEARN_MARCH``, else ``native`` (this
    CPU's full instruction set); ``None`` if the variable is not a plain ISA name."""
    value = os.environ.get("CLUSTERLEARN_MARCH") or "native"
    return value if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", value) else None


def _cpu_id() -> str:
    """The CPU's feature flags (``-march=native`` builds are only valid on the same CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A RuntimeWarning with ``message``, the first time this process meets it."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"clusterlearn: {message}", RuntimeWarning, stacklevel=4)


def _make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0o700 (whatever the umask)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            pass


def _private(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else."""
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _open_cache(path: Path) -> int | None:
    """A descriptor of the cache directory ``path`` (created 0o700 if missing), or ``None`` (with
    a warning) if another user owns it or others can write to it: anything there could have been
    planted."""
    _make_private_dirs(path)
    fd = _open_dir(path)
    st = os.fstat(fd)
    if _private(st):
        return fd
    os.close(fd)
    owner = "another user" if st.st_uid != os.getuid() else f"you with mode {stat.S_IMODE(st.st_mode):o}"
    _warn_once(
        f"the kernel cache {path} is owned by {owner} (writable by others: a library there could "
        "have been planted); not loading from it. The kernel is built in a private temporary "
        "directory for this process instead: point CLUSTERLEARN_CACHE at a directory only you can write"
    )
    return None


def _read_private(dir_fd: int, name: str) -> int | None:
    """A descriptor of the regular file ``name`` in ``dir_fd`` (not followed if a link) if it is
    this user's and writable by nobody else, else ``None``."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and _private(st):
        return fd
    os.close(fd)
    return None


def _sha256(fd: int) -> str:
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _open_verified(dir_fd: int, name: str) -> int | None:
    """A descriptor of the library ``name`` in ``dir_fd`` if it and the SHA-256 recorded beside
    it (``name.sha256``) are this user's, writable by nobody else, and the library's content
    has that digest (a truncated or altered file has not); else ``None``."""
    fd = _read_private(dir_fd, name + ".sha256")
    if fd is None:
        return None
    try:
        recorded = os.pread(fd, 256, 0).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    fd = _read_private(dir_fd, name)
    if fd is None:
        return None
    if hmac.compare_digest(_sha256(fd), recorded):
        return fd
    os.close(fd)
    return None


def _write_private(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``name`` in ``dir_fd`` atomically: a new file of ``mode`` (whatever the
    umask), synced, then renamed over ``name``."""
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _build(compiler: str, source: Path, flags: Sequence[str], dir_fd: int, name: str) -> None:
    """Compile in a private temporary directory, then write the library and its SHA-256 into
    ``dir_fd`` as ``name`` and ``name.sha256``, each atomically: a reader sees whole files or
    none (or, between the two renames, a library that does not match its digest: it waits for
    the builder's lock and checks again)."""
    with tempfile.TemporaryDirectory(prefix="clusterlearn-build-") as tmp:  # mode 0o700
        obj, lib = os.path.join(tmp, "kernel.o"), os.path.join(tmp, "kernel.so")
        subprocess.run([compiler, *_compile_flags(), *flags, "-c", str(source), "-o", obj], check=True, capture_output=True, text=True)
        subprocess.run([compiler, *_LINK, obj, "-o", lib, "-lm"], check=True, capture_output=True, text=True)
        data = Path(lib).read_bytes()
    _write_private(dir_fd, name, data, 0o700)
    _write_private(dir_fd, name + ".sha256", hashlib.sha256(data).hexdigest().encode() + b"\n", 0o600)
    with contextlib.suppress(OSError):  # not every filesystem syncs directories
        os.fsync(dir_fd)


@contextlib.contextmanager
def _locked(dir_fd: int) -> Iterator[None]:
    """Hold an exclusive lock on the cache directory's lock file: one builder at a time (DDP
    ranks that start together build the kernel once; the others then load it)."""
    fd = os.open(".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_from(dir_fd: int, path: Path, name: str, build: Callable[[int], None]) -> ctypes.CDLL:
    """The library ``name`` of the trusted directory ``dir_fd`` (at ``path``), verified, else
    (re)built there and verified."""
    fd = _open_verified(dir_fd, name)
    if fd is None:
        with _locked(dir_fd):
            fd = _open_verified(dir_fd, name)  # another process may have built it meanwhile
            if fd is None:
                build(dir_fd)
                fd = _open_verified(dir_fd, name)
        if fd is None:
            raise OSError(f"the library just built in {path} does not match its digest")
    return _map_verified(fd)


def _map_verified(fd: int) -> ctypes.CDLL:
    """Load the library open at ``fd`` (the file whose digest was checked, not whatever its name
    points to by now).

    Where there is ``/proc``, through the descriptor itself; ``fd`` then stays open for the
    process's lifetime (the library stays mapped that long anyway): the dynamic loader knows
    loaded libraries by their path, so a later load must not reuse this ``/proc/self/fd`` name.
    Elsewhere, from a copy of the verified bytes in a fresh private directory (no parent of the
    cache, which others might be able to rename, is resolved again).
    """
    proc = f"/proc/self/fd/{fd}"
    if os.path.exists(proc):
        try:
            return ctypes.CDLL(proc)
        except BaseException:
            os.close(fd)
            raise
    try:
        data, offset = [], 0
        while chunk := os.pread(fd, 1 << 20, offset):
            data.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    with tempfile.TemporaryDirectory(prefix="clusterlearn-load-") as private:  # 0o700, removed once mapped
        copy = os.path.join(private, "kernel.so")
        out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o700)
        try:
            for chunk in data:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
        finally:
            os.close(out)
        return ctypes.CDLL(copy)


def _open_dir(path: Path | str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)


def _library_file(compiler: str, name: str, source: Path, flags: Sequence[str]) -> str:
    """The cache's file name for ``source`` built by ``compiler`` with ``flags``: a hash of the
    sources, all flags (the ``-march`` included), the compiler's version and the CPU's flags."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [path.read_text() for path in dict.fromkeys([_SOURCE, source])]
    key = hashlib.sha256("\0".join([*texts, " ".join([*_compile_flags(), *flags, *_LINK]), version, _cpu_id()]).encode())
    return f"{name}_{key.hexdigest()[:16]}.so"


def _load(name: str, source: Path, flags: Sequence[str] = ()) -> ctypes.CDLL | None:
    """Compile ``source`` (with the kernel it includes) once per machine and ISA, and load it;
    ``None`` (with a warning, once per process) where it cannot be."""
    if os.environ.get("CLUSTERLEARN_NATIVE", "1") == "0":
        _warn_once(f"CLUSTERLEARN_NATIVE=0 turns the fused Self-Classifier kernel off; {_FALLBACK}")
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        _warn_once(f"no C++ compiler (g++, c++ or $CXX) to build the fused Self-Classifier kernel; {_FALLBACK}")
        return None
    if os.name != "posix" or fcntl is None:
        _warn_once(f"the fused Self-Classifier kernel is built on POSIX systems only; {_FALLBACK}")
        return None
    if march() is None:
        _warn_once(f"CLUSTERLEARN_MARCH={os.environ['CLUSTERLEARN_MARCH']!r} is not an ISA name; {_FALLBACK}")
        return None
    try:
        file = _library_file(compiler, name, source, flags)
        build = functools.partial(_build, compiler, source, flags, name=file)
        cache = _cache_dir()
        try:
            dir_fd = _open_cache(cache)
        except OSError as err:  # cannot be created or opened (e.g. HOME=/nonexistent): as an untrusted one
            _warn_once(f"cannot use the kernel cache {cache} ({err}); the kernel is built in a private temporary "
                       "directory for this process instead: point CLUSTERLEARN_CACHE at a directory you can write")
            dir_fd = None
        if dir_fd is not None:
            try:
                return _load_from(dir_fd, cache, file, build)
            finally:
                os.close(dir_fd)
        with tempfile.TemporaryDirectory(prefix="clusterlearn-") as private:  # 0o700, removed once loaded
            dir_fd = _open_dir(private)
            try:
                return _load_from(dir_fd, Path(private), file, build)
            finally:
                os.close(dir_fd)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        _warn_once(f"the fused Self-Classifier kernel could not be built with {compiler} ({detail.strip()[:500]}); {_FALLBACK}")
        return None


def _torch_openmp() -> tuple[int, int, int] | None:
    """``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_get_num_threads`` of the OpenMP runtime
    that PyTorch loaded (its bundled ``torch/lib/libgomp.so.1`` on Linux), or None.

    The kernel then runs on PyTorch's own thread pool: its workers spin for milliseconds after
    every parallel op, and threads of the kernel's own would have to share the cores with them
    (measured: 512 x 1000 logits, 2 cores: 7.7 ms right after a PyTorch reduction, 5.1 ms
    without one).
    """
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/torch/lib/" in line and "omp" in line.rsplit("/", 1)[-1]})
    except OSError:
        return None
    names = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
    for path in paths:
        try:
            runtime = ctypes.CDLL(path)  # already loaded: the same instance as PyTorch's
            return tuple(ctypes.cast(getattr(runtime, name), ctypes.c_void_p).value for name in names)
        except (OSError, AttributeError):
            continue
    return None


def _declare_stats_size(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.sc_stats_size.restype = ctypes.c_int64
    lib.sc_stats_size.argtypes = [ctypes.c_int64] * 3
    return lib


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The kernel's C functions (``sc_stats_size``, ``sc_forward_f32/f64``, ``sc_finish_f32/f64``),
    built on first use; ``None`` where it cannot be built."""
    lib = _load("self_classifier", _SOURCE)
    if lib is None:
        return None
    _declare_stats_size(lib)
    lib.sc_use_openmp.restype = None
    lib.sc_use_openmp.argtypes = [ctypes.c_void_p] * 3
    runtime = _torch_openmp()
    if runtime is not None:
        lib.sc_use_openmp(*runtime)
    ptr, params = ctypes.c_void_p, ctypes.POINTER(Params)
    for suffix in ("f32", "f64"):
        fwd, finish = getattr(lib, f"sc_forward_{suffix}"), getattr(lib, f"sc_finish_{suffix}")
        fwd.restype = ctypes.c_double
        fwd.argtypes = [ptr, params, ptr, ptr, ptr]  # views, params, stats, g0 (or None), cache (or None)
        finish.restype = None
        finish.argtypes = [ptr, params, ptr, ctypes.c_double, ptr, ptr, ptr]  # ..., scale, g0, out, cache
    return lib


@functools.cache
def xla_targets() -> ctypes.CDLL | None:
    """Register the kernel's XLA FFI handlers (``_self_classifier_xla.cpp``) as the CPU
    custom-call targets :data:`XLA_TARGETS`, building them on first use against jaxlib's FFI
    headers. Returns their library (which also has
    ``sc_stats_size``), or ``None`` where it cannot be built."""
    import jax

    lib = _load("self_classifier_xla", _XLA_SOURCE, [f"-I{jax.ffi.include_dir()}", f"-DJAXLIB_VERSION={jax.__version__}"])
    if lib is None:
        return None
    for name in XLA_TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return _declare_stats_size(lib)


#: Largest cache of the forward's exponentials (2 K N C values) the adapters pass to the kernel:
#: within it, passes 3 and 4 load four of the six exponentials per element instead of
#: recomputing them; beyond it (memory-bound sizes) they recompute.
CACHE_BYTES = 16 << 20


def cache_size(k: int, n: int, c: int, itemsize: int) -> int:
    """Number of values of the exponentials' cache for ``k`` views of ``(n, c)``; 0: no cache."""
    size = 2 * k * n * c
    return size if size * itemsize <= CACHE_BYTES else 0


def pointers(addresses: Sequence[int]) -> ctypes.Array:
    """A C array of ``void*`` (the views' or gradients' data pointers)."""
    return (ctypes.c_void_p * len(addresses))(*addresses)
