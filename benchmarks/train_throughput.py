"""Train throughput of the tiny config on CPU: XLA devices per core x CPU runtime, and how long a
checkpoint save blocks training.

    python -m benchmarks.train_throughput [--rounds 2] [--steps 60] [--batch B]

Each variant runs the real trainer (`ediffi_jax.training.trainer.train`: input pipeline, jitted donated
step, logging, async orbax saves) in its own process, because the device count and runtime are
fixed when jax starts. Variants alternate in A-B-C-D, D-C-B-A rounds so drift hits all alike.
Images/s is the median over logging windows after the first (which holds the compile); the
blocking time is how long `Checkpointer.save` held the training loop (the write itself
continues in the background).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

VARIANTS = {  # name: (XLA CPU devices, classic runtime)
    "1 device, thunk runtime": (1, False),
    "2 devices, thunk runtime": (2, False),
    "1 device, classic runtime": (1, True),
    "2 devices, classic runtime": (2, True),
}


def worker(devices: int, classic: bool, steps: int, batch: int | None) -> dict:
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                               f"--xla_cpu_use_thunk_runtime={str(not classic).lower()}")
    from ediffi_jax.config import load_config
    from ediffi_jax.runs.spec import run_schema
    from ediffi_jax.training.trainer import train

    lines: list[str] = []
    config = load_config("configs/tiny.py", [
        f"--config.train.steps={steps}", "--config.train.log_every=10",
        f"--config.train.checkpoint_every={steps // 3}"]
        + ([f"--config.train.batch_size={batch}"] if batch else []), run_schema())
    with tempfile.TemporaryDirectory() as workdir:
        train(config, workdir, log=lines.append)
    rates = [float(m.group(1)) for m in map(re.compile(r"([\d.]+) img/s").search, lines) if m]
    blocked = [float(m.group(1)) for m in map(re.compile(r"blocked ([\d.]+) s").search, lines) if m]
    return {"images_per_second": statistics.median(rates[1:]), "blocked_seconds": blocked}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, help="global batch (default: the tiny config's)")
    p.add_argument("--worker", nargs=2, type=int, metavar=("DEVICES", "CLASSIC"))
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], bool(args.worker[1]), args.steps, args.batch)))
        return 0

    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    order = list(VARIANTS)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            devices, classic = VARIANTS[name]
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.train_throughput", "--steps", str(args.steps),
                 "--worker", str(devices), str(int(classic))]
                + (["--batch", str(args.batch)] if args.batch else []),
                capture_output=True, text=True, check=True, env={**os.environ, "XLA_FLAGS": ""})
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r}: {name}: {results[name][-1]}", file=sys.stderr, flush=True)

    base = statistics.median(x["images_per_second"] for x in results[order[0]])
    from configs.tiny import get_config
    batch = args.batch or get_config().train.batch_size
    print(f"## Train throughput, tiny config on CPU ({datetime.date.today()})\n")
    print(f"`python -m benchmarks.train_throughput --rounds {args.rounds} --steps {args.steps}"
          f"{f' --batch {args.batch}' if args.batch else ''}`  ")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; tiny config, batch {batch}, "
          f"32x32, the full trainer loop (input pipeline, logging, async checkpoints).\n")
    print("| variant | images/s (median of runs) | vs 1 device, thunk | checkpoint save blocked (s) |")
    print("|---|---|---|---|")
    for name in order:
        rate = statistics.median(x["images_per_second"] for x in results[name])
        blocked = [b for x in results[name] for b in x["blocked_seconds"]]
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} | median {statistics.median(blocked):.3f},"
              f" max {max(blocked):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
