"""Assemble expert runs into one ensemble that sampling loads.

    python -m train.ensemble --out runs/base/ensemble.json runs/base/E3_0 runs/base/MC runs/base/E9_511

Checks that the runs share one U-Net config and that their noise intervals tile (0, inf) with no
gap or overlap, then writes {"experts": [...]} with paths relative to the file (atomically).
"""
from __future__ import annotations

import argparse
import sys

from ediffi_jax.runs.store import write_ensemble


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("workdirs", nargs="+")
    args = p.parse_args(argv)
    try:
        write_ensemble(args.out, args.workdirs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} with {len(args.workdirs)} experts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
