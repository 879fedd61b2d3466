"""Export a run's EMA params as a small self-contained model directory (ediffi_jax.runs.store).

    python -m train.export --workdir runs/tiny/shared --out pretrained/tiny-shapes [--dtype float16]

The directory holds `config.json` (the run's config, as saved in its checkpoint) and
`params.safetensors` (the EMA params under '/'-joined names, the step and source in the
metadata). It is what a run is without its optimizer and input-pipeline state: a model to share
or ship. Everything that takes a run's workdir (`train.branch --parent`, `train.ensemble`,
`sample --ensemble`) takes an export too; a child branched from one starts with params = EMA =
the exported weights. A pretrained fine-tune (`train.branch --pretrained`) exports as a
diffusers pipeline folder instead (training/pretrained.py export_pretrained).
"""
from __future__ import annotations

import argparse
import os
import sys

from ediffi_jax.runs.store import DTYPES, PARAMS_FILE, write_export

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the run to export")
    p.add_argument("--out", required=True, help="the export directory (replaced if it exists)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="storage dtype")
    p.add_argument("--step", type=int, help="a checkpoint step (default: the newest)")
    args = p.parse_args(argv)
    from ediffi_jax.config import ConfigError

    try:
        from ediffi_jax.runs.store import run_config

        if "pretrained" in run_config(args.workdir):  # a fine-tuned diffusers checkpoint
            from ediffi_jax.training.pretrained import export_pretrained

            out = export_pretrained(args.workdir, args.out, args.dtype, args.step)
            print(f"wrote {out}: the expert's U-Net, the parent's other components linked")
            return 0
        write_export(args.workdir, args.out, args.dtype, args.step)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = os.path.getsize(os.path.join(args.out, PARAMS_FILE))
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB of {args.dtype} params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
