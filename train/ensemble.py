"""Assemble expert runs into one ensemble that sampling loads.

    python -m train.ensemble --out runs/base/ensemble.json runs/base/E3_0 runs/base/MC runs/base/E9_511

Checks that the runs share one U-Net config and that their noise intervals tile (0, inf) with no
gap or overlap, then writes {"experts": [...]} with paths relative to the file (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def write_ensemble(out: str, workdirs: list[str]) -> None:
    from sample.generate import load_ensemble

    base = os.path.dirname(os.path.abspath(out))
    rel = [os.path.relpath(os.path.abspath(w), base) for w in workdirs]
    tmp = f"{out}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"experts": rel}, f, indent=1)
    try:
        load_ensemble(tmp)  # validates: readable checkpoints, one architecture, a tiling layout
    except Exception:
        os.remove(tmp)
        raise
    os.replace(tmp, out)


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
