"""Grade samples of the built-in shapes dataset from their pixels: prompts are held-out captions
(a different seed from training), the checker reads colour, shape, count, size and position.

    python -m sample.evaluate --ensemble runs/tiny/ensemble.json [--num 256] [--seed 0]
        [--out samples.png] [--config.sampling.num_steps=32 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    from ediffi_jax.config import split_overrides
    from ediffi_jax.parallel.host import configure_cpu_host

    overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(prog="python -m sample.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", required=True)
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the graded samples as one PNG grid")
    args = p.parse_args(rest)
    configure_cpu_host()
    from ediffi_jax.config import ConfigError
    from ediffi_jax.eval.sweep import evaluate_shapes
    from ediffi_jax.pipeline.generate import StepProgress, grid, sampling_with_overrides
    from ediffi_jax.rng import check_seed
    from ediffi_jax.runs.data import held_out_shapes
    from ediffi_jax.runs.store import load_ensemble

    batch = 64  # evaluate_shapes's default
    try:
        if args.num < 1:
            raise ConfigError(f"--num must be >= 1 (samples to grade), got {args.num}")
        check_seed(args.seed, "--seed")
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise ConfigError(f"--out {args.out}: its folder does not exist")
        run, ensemble = load_ensemble(args.ensemble)
        sampling = sampling_with_overrides(run, [o.replace("--config.", "", 1) for o in overrides])
        available = len(held_out_shapes(run))  # also: the run was trained on shapes
        if args.num > available:
            raise ConfigError(f"--num {args.num} exceeds the {available} held-out shapes "
                              "examples")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress = StepProgress(sampling.num_steps * -(-args.num // min(batch, args.num)))
    rates, images, _ = evaluate_shapes(run, ensemble, args.num, args.seed, sampling, batch,
                                       progress)
    if args.out:
        from PIL import Image

        Image.fromarray(grid(images, columns=16)).save(args.out)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rates.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
