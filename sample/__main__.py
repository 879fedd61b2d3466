"""python -m sample --ensemble runs/tiny/ensemble.json --prompt "a red circle" [--prompt ...]
       [--num 4] [--seed 0] [--out samples/] [--config.sampling.num_steps=32 ...]
       [--resolution 128 --highres scalecrafter [--config.highres.disperse=True ...]]

Writes one PNG per sample and grid.png (a row per prompt). --ensemble takes an ensemble.json,
a single run's workdir or an export. --resolution samples at another size than the training
one: directly (--highres none) or with ScaleCrafter's re-dilation (--highres scalecrafter; the
`highres` section's fields tune it, see ediffi_jax/highres/plans.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from ediffi_jax.config import split_overrides
from ediffi_jax.parallel.host import configure_cpu_host


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", required=True, help="ensemble.json or a run's workdir")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--num", type=int, default=4, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples")
    p.add_argument("--resolution", type=int, help="output side (default: the training one)")
    p.add_argument("--highres", choices=("none", "scalecrafter"),
                   help="how to sample past the training resolution (default: highres.method)")
    args = p.parse_args(rest)
    configure_cpu_host()

    import numpy as np
    from PIL import Image

    from ediffi_jax.config import ConfigError
    from sample.generate import generate, grid, load_ensemble, sample_settings, sampling_plan

    try:
        run, ensemble = load_ensemble(args.ensemble)
        if args.highres:
            overrides.append(f"--config.highres.method={args.highres}")
        sampling, highres = sample_settings(run, [o.replace("--config.", "", 1) for o in overrides])
        model = run.stage.model
        resolution = args.resolution or model.resolution
        if resolution % 2 ** (len(model.channel_mult) - 1):
            raise ConfigError(f"--resolution {resolution} cannot be halved "
                              f"{len(model.channel_mult) - 1} times by this U-Net")
        plan = sampling_plan(model, ensemble, sampling, resolution, highres)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = [q for q in args.prompt for _ in range(args.num)]
    print(f"{len(ensemble)} expert(s) at {resolution}x{resolution}; plan:\n{plan.describe()}")
    images = generate(run, ensemble, prompts, seed=args.seed, sampling=sampling,
                      resolution=resolution, highres=highres)
    os.makedirs(args.out, exist_ok=True)
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        name = f"{i:04d}_{'_'.join(prompt.split())[:60]}.png"
        Image.fromarray(img).save(os.path.join(args.out, name))
    Image.fromarray(grid(images, args.num)).save(os.path.join(args.out, "grid.png"))
    print(f"wrote {len(images)} samples and grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
