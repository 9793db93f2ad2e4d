"""The fused CPU kernel of the Self-Classifier loss: built with a C++ compiler on first use.

``_self_classifier_kernel.cpp`` (next to this file) streams one head's views row by row: four
passes over the logits, ``(K, N)`` / ``(K, C)`` statistics in between and one gradient-sized
buffer (plus, for small problems, a cache of the exponentials), instead of the ~30 full-size
passes and intermediates of the eager closed form. :func:`kernel` (its C functions, for
PyTorch) and :func:`xla_targets` (its XLA FFI handlers, for JAX) compile it once per machine
into a cache directory (``$CLUSTERLEARN_CACHE``, else ``$XDG_CACHE_HOME/clusterlearn``, else
``~/.cache/clusterlearn``; a few seconds) and load it with :mod:`ctypes`. Without a compiler,
or with ``CLUSTERLEARN_NATIVE=0``, they return ``None`` and the adapters use their array code
instead (the same values, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_BYTES", "KERNELS", "LOG_SPACE", "NOT_BUILT", "XLA_TARGETS", "Params", "cache_size", "check_kernel",
    "exp_floors", "kernel", "params", "pointers", "use_fused", "xla_targets",
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

_SOURCE = Path(__file__).with_name("_self_classifier_kernel.cpp")
_XLA_SOURCE = Path(__file__).with_name("_self_classifier_xla.cpp")
#: The custom-call targets of ``_self_classifier_xla.cpp``.
XLA_TARGETS = ("clusterlearn_sc_forward", "clusterlearn_sc_vjp_fwd", "clusterlearn_sc_vjp_bwd")
# No -ffast-math: the kernel's own exp/log vectorise without it, and its reductions are declared
# with `omp simd` (-fopenmp-simd, no OpenMP runtime); a fast-math link would also add
# crtfastmath.o, which switches the loading thread to flush-to-zero for good.
_COMPILE = ["-O3", "-std=c++17", "-fPIC", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
if platform.machine() in ("x86_64", "AMD64"):
    _COMPILE.append("-mprefer-vector-width=512")  # AVX-512 where the CPU has it (1.1-1.2x here)
_LINK = ["-shared", "-pthread"]


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


def params(
    k: int,
    n: int,
    c: int,
    rows: tuple[int, int],
    pairs: Sequence[tuple[int, int]],
    *,
    row_temperature: float,
    col_temperature: float,
    log_floor_t: float,
    log_floor_p: float,
    eps: float,
    threads: int,
) -> Params:
    """A :class:`Params` for ``k`` views of shape ``(n, c)``, loss rows ``[rows[0], rows[1])``."""
    flat = (ctypes.c_int64 * (2 * len(pairs)))(*[v for pair in pairs for v in pair])
    out = Params(
        k, n, c, rows[0], rows[1], flat, len(pairs),
        1.0 / col_temperature, 1.0 / row_temperature, log_floor_t, log_floor_p, eps, max(1, int(threads)),
    )
    out._pairs = flat  # keep the array alive with the struct
    return out


def _cache_dir() -> Path:
    root = os.environ.get("CLUSTERLEARN_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clusterlearn"


def _cpu_id() -> str:
    """The CPU's feature flags (``-march=native`` builds are only valid on the same CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(compiler: str, source: Path, flags: Sequence[str], target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / target.name
        subprocess.run([compiler, *_COMPILE, *flags, "-c", str(source), "-o", str(obj)], check=True, capture_output=True, text=True)
        subprocess.run([compiler, *_LINK, str(obj), "-o", str(lib), "-lm"], check=True, capture_output=True, text=True)
        os.replace(lib, target)  # atomic: concurrent builders (DDP ranks) never load half a file


def _load(name: str, source: Path, flags: Sequence[str] = ()) -> ctypes.CDLL | None:
    """Compile ``source`` (with the kernel it includes) once per machine and load it."""
    if os.environ.get("CLUSTERLEARN_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        texts = [path.read_text() for path in dict.fromkeys([_SOURCE, source])]
        key = hashlib.sha256("\0".join([*texts, " ".join([*_COMPILE, *flags, *_LINK]), version, _cpu_id()]).encode())
        target = _cache_dir() / f"{name}_{key.hexdigest()[:16]}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _build(compiler, source, flags, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(
            f"clusterlearn: the fused Self-Classifier kernel could not be built with {compiler} "
            f"({detail.strip()[:500]}); using the array implementation instead",
            RuntimeWarning,
            stacklevel=3,
        )
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


def exp_floors(finfo: Any, n: int, c: int, eps: float) -> tuple[float, float]:
    """Floors of ``exp`` in the column softmax (targets) and the row softmax (predictions) of
    ``(n, c)`` logits on the linear-space path; ``finfo`` of their dtype (NumPy's or torch's).

    The core floors ``exp`` at 8 × the smallest normal number and shows the change is below
    rounding while ``C · floor / eps <= (dtype eps) / 1024`` (targets) and
    ``(N/C) · floor / eps² <= (dtype eps) / 16`` and ``N · floor / eps <= (dtype eps) / 16``
    (predictions). The largest floors within those bounds keep every product in the loss
    and its gradient away from denormal numbers, which cost 10-100× per operation on x86.
    """
    tiny = 8.0 * float(finfo.tiny)
    resolution = float(finfo.eps)
    target = max(tiny, eps * resolution / 1024 / c)
    prediction = max(tiny, min(eps * eps * resolution / 16 * c / n, eps * resolution / 16 / n))
    return target, prediction


def pointers(addresses: Sequence[int]) -> ctypes.Array:
    """A C array of ``void*`` (the views' or gradients' data pointers)."""
    return (ctypes.c_void_p * len(addresses))(*addresses)
