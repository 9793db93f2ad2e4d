"""Shared test fixtures: every core test runs on every available array backend.

``backend`` is parametrised over numpy, array_api_strict, torch (CPU) and jax (CPU); cupy is
included and skipped without a GPU. Tests build their data in NumPy and move it with
``backend.asarray`` so that every backend sees identical inputs.

``core_backend`` adds ``jit``: JAX arrays, with the core function under test called through
``jax.jit`` (``core_backend.call(fn, *arrays, **static)``), so that a pure core function that
cannot be traced (a Python ``bool``/``float`` of an array value, a shape that depends on
values) fails there while its eager runs pass.

Helpers shared by the test folders (``bounds``, ``streams``, ``example_runs``, ``ddp_checks``)
live next to this file and are imported by name: ``--import-mode=importlib`` puts no test
folder on ``sys.path``, so this file puts ``tests/`` there.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from collections.abc import Callable
from typing import Any

# pytest-xdist workers share the cores: each gets its share of threads (OpenMP, OpenBLAS), set
# before NumPy or torch load them, and inherited by the subprocesses its tests start. More
# threads than cores make OpenMP's and OpenBLAS' spinning workers compete for them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np  # noqa: E402  (after the thread count)
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole session: the example scripts' subprocesses
# (and the pytest-xdist workers) compile the same programs again and again; a hit skips the
# compiler, the results are the same executables. Keyed by program, flags and devices. The
# process that creates the directory (the controller under xdist) removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="clusterlearn-xla-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
# XLA's CPU backend at LLVM optimisation level 0 compiles several times faster (compilation
# dominates most JAX tests: about 30 % of their time saved). The programs are the same HLO
# (fusion is decided before the backend) and LLVM does not reassociate floating point without
# fast-math, so the results are those of the default level; the example scripts' own runs
# (tests/examples) compile the same way. Set XLA_FLAGS to test with other flags.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# --import-mode=importlib puts no test folder on sys.path: make the shared helpers of tests/
# (bounds.py, streams.py, example_runs.py, ddp_checks.py) importable from every test folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile(
    "default",
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

BACKEND_NAMES = ["numpy", "array_api_strict", "torch", "jax", "cupy"]


#: Seconds each of the longest files took on one pytest-xdist worker (``--durations=0``, summed
#: per file; 2-core AMD EPYC, 2026-12-07). Only the order matters: longest first, then the other
#: files holding ``slow`` tests, then the rest. A stale number costs balance, not correctness.
FILE_SECONDS = {
    "examples/test_torch_faults.py": 129, "examples/test_jax_examples.py": 116, "odc/test_sharded_step.py": 104,
    "odc/test_jax_adapter.py": 80, "examples/test_torch_examples.py": 69, "core/test_native_cache.py": 66,
    "deepcluster/test_kmeans.py": 53, "odc/test_torch_sharded.py": 51, "examples/test_jax_odc_shard.py": 49,
    "self_classifier/test_loss.py": 47, "self_classifier/test_closed_form.py": 46,
    "evaluation/test_frozen_features.py": 45, "odc/test_online_deep_clustering.py": 45,
    "examples/test_demo_and_benchmarks.py": 42, "self_classifier/test_fused_kernel.py": 40,
    "examples/test_jax_deepcluster.py": 37, "examples/test_torch_deepcluster_shard.py": 34,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (:data:`FILE_SECONDS`), then the other files holding ``slow``
    tests (each file's own order kept): pytest-xdist (``--dist loadfile``) hands out whole files
    in this order, so the two workers start on the long runs and end together on short files."""
    tests = os.path.dirname(os.path.abspath(__file__))
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[float, bool]:
        name = os.path.relpath(item.path, tests).replace(os.sep, "/")
        return -FILE_SECONDS.get(name, 0), item.path not in slow_files

    items.sort(key=rank)


@dataclass(frozen=True)
class Backend:
    """One array library under test."""

    name: str
    xp: ModuleType  # array-API-compatible namespace (array_api_compat wrapper where needed)
    native: ModuleType  # the library itself
    jit: bool = False  # core functions called through jax.jit (the ``jit`` variant of jax)

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        """Move a NumPy array (or nested list) to this backend, keeping its dtype kind.

        float64 data becomes float32 unless ``dtype`` says otherwise, as a user's
        features would be; integer data keeps the backend's default integer dtype.
        """
        a = np.asarray(a)
        if dtype is None:
            if a.dtype.kind == "f":
                dtype = self.xp.float32
            elif a.dtype.kind in "iu":
                dtype = self.xp.__array_namespace_info__().default_dtypes()["integral"]
            elif a.dtype.kind == "b":
                dtype = self.xp.bool
        if self.name == "array_api_strict":
            return self.xp.asarray(a.tolist() if a.ndim == 0 else a, dtype=dtype)
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        from clusterlearn.backend import to_numpy

        return np.asarray(to_numpy(x))

    def call(self, fn: Callable[..., Any], *arrays: Any, **static: Any) -> Any:
        """``fn(*arrays, **static)``; on ``jit`` through ``jax.jit`` with ``static`` bound.

        ``arrays`` are traced (arrays or pytrees of arrays: lists, NamedTuples); the keyword
        arguments are Python settings fixed at trace time (``config``, temperatures, ``rows``).
        The jitted function is kept per ``(fn, static)`` where ``static`` is hashable, so that
        a loop of calls compiles once.
        """
        if not self.jit:
            return fn(*arrays, **static)
        return _jitted(fn, static)(*arrays)


_JITTED: dict[Any, Callable[..., Any]] = {}


def _jitted(fn: Callable[..., Any], static: dict[str, Any]) -> Callable[..., Any]:
    """``jax.jit(partial(fn, **static))``, cached when ``static`` is hashable."""
    import jax

    key = (fn, tuple(sorted(static.items())))
    try:
        hash(key)
    except TypeError:  # an unhashable setting (a slice before Python 3.12): compiled per call
        return jax.jit(functools.partial(fn, **static))
    if key not in _JITTED:
        _JITTED[key] = jax.jit(functools.partial(fn, **static))
    return _JITTED[key]


def _load(name: str) -> Backend:
    if name == "numpy":
        import array_api_compat.numpy as xp

        return Backend(name, xp, np)
    if name == "array_api_strict":
        mod = importlib.import_module("array_api_strict")
        return Backend(name, mod, mod)
    if name == "torch":
        torch = importlib.import_module("torch")
        import array_api_compat.torch as xp

        return Backend(name, xp, torch)
    if name == "jax":
        jax = importlib.import_module("jax")
        jax.config.update("jax_platforms", "cpu")
        import jax.numpy as jnp

        return Backend(name, jnp, jax)
    if name == "jit":
        jax = _load("jax")
        return Backend(name, jax.xp, jax.native, jit=True)
    if name == "cupy":
        cupy = importlib.import_module("cupy")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise ImportError("no CUDA device")
        import array_api_compat.cupy as xp

        return Backend(name, xp, cupy)
    raise ValueError(name)


def _available(name: str) -> Backend | None:
    try:
        return _load(name)
    except Exception:  # not installed, or (cupy) no GPU
        return None


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every array backend; unavailable ones (cupy without a GPU) are skipped."""
    b = _available(request.param)
    if b is None:
        pytest.skip(f"{request.param} not available")
    return b


@pytest.fixture(params=[*BACKEND_NAMES, "jit"])
def core_backend(request: pytest.FixtureRequest) -> Backend:
    """Every array backend, and ``jit``: JAX with the function under test traced by ``jax.jit``.

    Call the core function as ``core_backend.call(fn, *arrays, **static)``.
    """
    b = _available(request.param)
    if b is None:
        pytest.skip(f"{request.param} not available")
    return b


@pytest.fixture
def numpy_backend() -> Backend:
    return _load("numpy")
