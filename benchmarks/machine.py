"""The machine a benchmark ran on: CPU model, its widest x86 vector extension, the load.

Every benchmark prints :func:`describe` above its table: timings depend on the vector width
(the fused kernel is built for the host) and on what else the machine was running.
"""

from __future__ import annotations

import os
import platform


def cpu_description() -> str:
    """The CPU's model name and widest x86 vector extension, e.g. ``AMD EPYC, AVX-512``.

    Ratios depend on both: cross-entropy and the fused kernel gain differently from wider
    vectors (the kernel is built with ``-march=native`` unless ``CLUSTERLEARN_MARCH`` names
    another instruction set).
    """
    try:
        with open("/proc/cpuinfo") as f:
            info = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in f)}
    except OSError:
        info = {}
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    simd = next((name.upper().replace("512F", "-512") for name in ("avx512f", "avx2", "avx") if name in flags), "")
    return f"{model}, {simd}" if simd else model


def describe() -> str:
    """One line: CPU (model, vector ISA), logical cores, and the 1-minute load average."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu_description()}; {os.cpu_count()} logical cores; load average {load:.2f} at the start"
