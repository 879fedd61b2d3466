"""Encode a dataset's captions (and images) once, so training reads embeddings, not encoders.

    python -m train.precompute --config configs/X.py --data DIR/train --out DIR/train-cond \\
        [--images] [--dtype float16|bfloat16|float32] [--batch 64] \\
        [--config.encoders.t5=... --config.encoders.clip_text=... --config.encoders.clip_vision=...]

Reads the records at --data, runs the config's encoders (jitted, the batch sharded over every
device) and writes a copy of each record with a `cond` field (data/embeddings.py) to --out.
Then train with `--config.data.name=records --config.data.path=DIR/train-cond` and the same
encoders section (sampling encodes prompts with it).

Resumable: the output is written chunk by chunk, each chunk a complete shard renamed into place;
a rerun after an interruption skips the chunks already written, and the dataset becomes
readable (its sidecar appears) only when every chunk is there. A rerun with other settings is an
error rather than a mix.
"""
from __future__ import annotations

import argparse
import sys

from ediffi_jax.config import ConfigError, split_overrides


def main(argv=None) -> int:
    from ediffi_jax.parallel.host import configure_cpu_host

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m train.precompute", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="records prefix to encode (DIR/train)")
    p.add_argument("--out", required=True, help="records prefix to write (DIR/train-cond)")
    p.add_argument("--images", action="store_true", help="also embed each record's image (CLIP)")
    p.add_argument("--dtype", default="float16", help="storage dtype: float16, bfloat16, float32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=4096, help="records per resumable chunk")
    args = p.parse_args(rest)
    configure_cpu_host()
    from ediffi_jax.config import load_config
    from ediffi_jax.data.precompute import precompute
    from ediffi_jax.runs.spec import run_schema

    try:
        config = load_config(args.config, overrides, run_schema())
        precompute(config, args.data, args.out, images=args.images, dtype=args.dtype,
                   batch=args.batch, chunk=args.chunk)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
