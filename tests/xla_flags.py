"""XLA flags for the tests' JAX subprocesses."""

from __future__ import annotations

import os


def with_devices(devices: int) -> str:
    """This session's ``XLA_FLAGS`` (tests/conftest.py: backend optimisation level 0 unless
    set) plus ``devices`` forced host CPU devices, for a subprocess's environment."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
