"""CPU-host settings for the command-line entry points, applied before jax initialises.

On a CPU-only machine XLA's classic (non-thunk) CPU runtime runs the U-Net's convolutions
~1.4x faster than the default thunk runtime (benchmarks/train_throughput.py, BENCHMARKS.md),
and one XLA device per core lets data parallelism use every core. Accelerators are unaffected:
both flags only touch the host platform, and a flag the user already set is left alone.
"""
from __future__ import annotations

import os


def configure_cpu_host(devices: int | None = None) -> None:
    """Set XLA_FLAGS for the host platform: `devices` XLA CPU devices (default: one per core)
    and the classic CPU runtime. Must run before jax is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = []
    if "xla_force_host_platform_device_count" not in flags:
        extra.append(f"--xla_force_host_platform_device_count={devices or os.cpu_count()}")
    if "xla_cpu_use_thunk_runtime" not in flags:
        extra.append("--xla_cpu_use_thunk_runtime=false")
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
