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


def evaluate_shapes(run, ensemble, num: int = 256, seed: int = 0, sampling=None, batch: int = 64,
                    progress=None):
    """Rates of samples matching their caption (see ediffi_jax.data.shapes.caption_accuracy),
    on the held-out split (ediffi_jax.eval.sweep.held_out_shapes). One sampler serves every
    batch and the last is padded, so the plan compiles once. `progress(step, num_steps)`
    hears of every sampler step (PlanRunner's)."""
    from ediffi_jax.data.shapes import caption_accuracy, parse_caption
    from ediffi_jax.diffusion.sampling import PlanRunner
    from ediffi_jax.eval.sweep import held_out_shapes, sample_images
    from ediffi_jax.models.experts import unet_denoise_fn
    from ediffi_jax.models.unet import UNet

    source = held_out_shapes(run)
    captions = [source[i]["caption"] for i in range(num)]
    runner = PlanRunner(unet_denoise_fn(UNet(run.stage.model)), progress)
    images = sample_images(run, ensemble, captions, seed=seed, sampling=sampling, batch=batch,
                           runner=runner)
    rates = caption_accuracy(images, [parse_caption(c) for c in captions])
    return rates, images, captions


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
    from ediffi_jax.diffusion.sampling import check_seed
    from ediffi_jax.eval.sweep import held_out_shapes
    from sample.generate import StepProgress, grid, load_ensemble, sampling_with_overrides

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
