"""CPU-host settings for the command-line entry points, applied before jax initialises.

On a CPU-only machine one XLA device per core runs the data-parallel (sharded) path the
clusters run, at no cost against one device (benchmarks/train_throughput.py, BENCHMARKS.md;
XLA's deprecated classic CPU runtime measured no faster, so XLA's default is kept).
Accelerators are unaffected: the flag only touches the host platform, and a device count the
user already set is left alone.
"""
from __future__ import annotations

import os


def configure_cpu_host(devices: int | None = None) -> None:
    """Set XLA_FLAGS for the host platform: `devices` XLA CPU devices (default: one per core).
    Must run before jax initialises its backends."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={devices or os.cpu_count()}"
    os.environ["XLA_FLAGS"] = flags.strip()
