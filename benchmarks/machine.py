"""The machine a benchmark ran on: CPU model, its widest x86 vector extension, the load.

Every benchmark prints :func:`describe` above its table: timings depend on the vector width
(the fused kernel is built for the host) and on what else the machine was running.
"""

from __future__ import annotations

import os
import platform


def cpu_flags() -> set[str]:
    """The ``flags`` of the first CPU in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_description() -> str:
    """The CPU's model name and widest x86 vector extension, e.g. ``AMD EPYC, AVX-512``."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    simd = next((name.upper().replace("512F", "-512") for name in ("avx512f", "avx2", "avx") if name in flags), "")
    return f"{model}, {simd}" if simd else model


def describe() -> str:
    """One line: CPU (model, vector ISA), logical cores, and the 1-minute load average."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_description()}; {os.cpu_count()} logical cores; load average {load:.2f} at the start"
