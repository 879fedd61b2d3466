"""python -m train --config configs/X.py[:ARG] --workdir DIR [--config.section.key=value ...]

    python -m train --config configs/X.py[:ARG] --dry_run [--devices N] [--device_memory_gib G]
compiles the train step for a mesh of N devices without allocating and prints parameters,
per-device memory and FLOPs per step (ediffi_jax/training/dry_run.py); exit status 0 if it fits, 3 if not."""
from __future__ import annotations

import argparse
import os
import sys

from ediffi_jax.config import split_overrides
from ediffi_jax.parallel.host import configure_cpu_host


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/X.py or configs/X.py:ARG")
    parser.add_argument("--workdir", help="checkpoints, logs; resumes if present "
                        "(required unless --dry_run)")
    parser.add_argument("--dry_run", action="store_true",
                        help="plan only: compile for --devices devices, report memory and FLOPs")
    parser.add_argument("--devices", type=int, default=None,
                        help="dry run: devices of the mesh (default: the real device count; a "
                        "CPU host simulates N)")
    parser.add_argument("--device_memory_gib", type=float, default=80.0,
                        help="dry run: memory of one device in GiB (default 80, an H100)")
    add_resume_arguments(parser)
    args = parser.parse_args(rest)
    if not args.dry_run and not args.workdir:
        parser.error("--workdir is required (except with --dry_run)")

    if args.dry_run:
        from ediffi_jax.training.dry_run import prepare_host

        prepare_host(args.devices)  # before any jax backend starts
    else:
        configure_cpu_host()
    from ediffi_jax.config import ConfigError, load_config
    from ediffi_jax.runs.checkpoint import CheckpointSaveError
    from ediffi_jax.runs.spec import run_schema
    from ediffi_jax.training.trainer import train

    try:
        config = load_config(args.config, overrides, run_schema())
        if args.dry_run:
            from ediffi_jax.training.dry_run import dry_run

            return dry_run(config, devices=args.devices, device_memory_gib=args.device_memory_gib)
        train(config, args.workdir, changes=args.change,
              restart_if_unreadable=args.restart_if_unreadable)
    except CheckpointSaveError as e:
        exit_after_failed_save(e)
    except (ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def exit_after_failed_save(error: Exception) -> None:
    """One clear message, then out: orbax's half-finished background writes would otherwise
    print a traceback per pending task while the interpreter shuts down."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that steer a resume (ediffi_jax/training/resume.py); `python -m train.branch` takes them too."""
    parser.add_argument("--change", action="append", default=[], metavar="KEY",
                        help="on resume, take a new value of this optimisation setting (e.g. "
                        "train.lr); without it a changed value is an error (repeatable)")
    parser.add_argument("--restart-if-unreadable", action="store_true",
                        help="if every checkpoint of the workdir is damaged, train from scratch "
                        "(default: stop with an error; the damaged ones are kept aside)")


if __name__ == "__main__":
    sys.exit(main())
