"""CPU-host flags for the entry points: set what is missing, never override the user."""
from ediffi_jax.parallel.host import configure_cpu_host


def test_configure_cpu_host_adds_missing_flags_only(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    configure_cpu_host(devices=3)
    import os

    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=3"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=5")
    configure_cpu_host(devices=3)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=5"
