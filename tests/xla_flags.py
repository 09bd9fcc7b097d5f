"""The suite's XLA flags (set in tests/conftest.py) for a process a test starts."""

import os

_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(*, devices: int) -> str:
    """The test process's ``XLA_FLAGS`` with ``devices`` fake CPU devices instead of its own."""
    kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
            if not flag.startswith(_DEVICE_COUNT)]
    return " ".join([*kept, f"{_DEVICE_COUNT}={devices}"])
