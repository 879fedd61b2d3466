"""Average an ensemble's experts back into one model (the merge-back baseline).

    python -m train.merge --out runs/study/merged runs/study/ensemble.json [--by-mass] [--dtype float32]

The experts must share one architecture (they do when grown from one parent by train.branch).
Their EMA weights are averaged, equally or weighted by each interval's share of the training
noise mass (--by-mass), and written as an export over the whole noise range: one network with
the ensemble's training compute, to compare against the ensemble and the parent
("Decouple-Then-Merge", CVPR 2025). Everything that takes a run takes the export.
"""
from __future__ import annotations

import argparse
import sys

from ediffi_jax.runs.store import DTYPES, write_merged_export


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ensemble", help="an ensemble.json of experts of one architecture")
    p.add_argument("--out", required=True, help="the export directory (replaced if it exists)")
    p.add_argument("--by-mass", action="store_true",
                   help="weight each expert by its interval's noise mass (default: equally)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="storage dtype")
    args = p.parse_args(argv)
    from ediffi_jax.config import ConfigError

    try:
        write_merged_export(args.ensemble, args.out, args.dtype, args.by_mass)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: the experts of {args.ensemble} averaged "
          f"({'by noise mass' if args.by_mass else 'equally'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
