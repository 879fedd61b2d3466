"""python -m train --config configs/X.py[:ARG] --workdir DIR [--config.section.key=value ...]"""
from __future__ import annotations

import argparse
import sys

from ediffi_jax.config import split_overrides
from ediffi_jax.parallel.host import configure_cpu_host


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("--config", required=True, help="configs/X.py or configs/X.py:ARG")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs; resumes if present")
    args = parser.parse_args(rest)

    configure_cpu_host()
    from ediffi_jax.config import ConfigError, load_config
    from train.trainer import run_schema, train

    try:
        config = load_config(args.config, overrides, run_schema())
        train(config, args.workdir)
    except (ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
