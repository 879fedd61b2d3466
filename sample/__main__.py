"""python -m sample --ensemble runs/tiny/ensemble.json --prompt "a red circle" [--prompt ...]
       [--num 4] [--seed 0] [--out samples/] [--config.sampling.num_steps=32 ...]
       [--resolution 128 --highres scalecrafter [--config.highres.disperse=True ...]]
       [--paint colors.png --paint-words words.json | --paint-mask "phrase=mask.png:1.0" ...]

Writes one PNG per sample and grid.png (a row per prompt). --ensemble takes an ensemble.json,
a single run's workdir or an export. --resolution samples at another size than the training
one: directly (--highres none) or with ScaleCrafter's re-dilation (--highres scalecrafter; the
`highres` section's fields tune it, see ediffi_jax/highres/plans.py).

Paint-with-words: --paint takes a colour-map PNG and --paint-words a JSON mapping its colours to
"phrase,strength" (or "background"); --paint-mask gives one phrase's mask PNG (repeatable).
Every prompt must contain every phrase. Each sample is saved with a *_masks.png beside it.
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
    p.add_argument("--paint", help="paint-with-words colour map (PNG)")
    p.add_argument("--paint-words", help="JSON: colour -> 'phrase,strength' (with --paint)")
    p.add_argument("--paint-mask", action="append", default=[], metavar="PHRASE=PNG[:STRENGTH]")
    p.add_argument("--paint-scale", type=float, default=1.0, help="global paint strength w'")
    p.add_argument("--paint-weight", default="std", help="max (the paper), std or std_sq")
    p.add_argument("--paint-layers", default="", help="comma-separated attention blocks (all)")
    p.add_argument("--style-image", help="a reference image: its CLIP image embedding conditions "
                   "every sample (needs encoders.clip_vision); its own guidance scale is "
                   "sampling.style_guidance_scale (default: guided with the text)")
    args = p.parse_args(rest)
    configure_cpu_host()

    import numpy as np
    from PIL import Image

    from ediffi_jax.config import ConfigError
    from ediffi_jax.encoders.conditioner import make_conditioner
    from sample.generate import (generate, grid, load_ensemble, mask_overlay, sample_settings,
                                 sampling_plan)

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
        prompts = [q for q in args.prompt for _ in range(args.num)]
        paint = read_paint(args, resolution)
        conditioner = make_conditioner(run.encoders, model)
        if paint is not None:  # every phrase in every prompt: checked before any sampling
            paint.conditioning(conditioner, model, args.prompt)
        style = None
        if args.style_image:
            style = np.asarray(Image.open(args.style_image).convert("RGB"))
            if conditioner.clip_vision is None:
                raise ConfigError("--style-image needs a CLIP vision tower: this run's "
                                  "encoders.clip_vision is not set")
        plan = sampling_plan(model, ensemble, sampling, resolution, highres,
                             paint.settings if paint else None)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(ensemble)} expert(s) at {resolution}x{resolution}; plan:\n{plan.describe()}")
    images = generate(run, ensemble, prompts, seed=args.seed, sampling=sampling,
                      resolution=resolution, highres=highres, paint=paint,
                      conditioner=conditioner,
                      style_images=[style] * len(prompts) if style is not None else None)
    os.makedirs(args.out, exist_ok=True)
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        name = f"{i:04d}_{'_'.join(prompt.split())[:60]}"
        Image.fromarray(img).save(os.path.join(args.out, name + ".png"))
        if paint is not None:
            Image.fromarray(mask_overlay(img, paint.masks)).save(
                os.path.join(args.out, name + "_masks.png"))
    Image.fromarray(grid(images, args.num)).save(os.path.join(args.out, "grid.png"))
    print(f"wrote {len(images)} samples and grid.png to {args.out}")
    return 0


def read_paint(args, resolution: int):
    """The paint-with-words inputs of the command line, at the output size (or None)."""
    from ediffi_jax.paint.bias import PaintSettings
    from ediffi_jax.paint.masks import PaintError, from_color_map, from_mask_specs, read_words
    from sample.generate import Paint

    if bool(args.paint) != bool(args.paint_words):
        raise PaintError("--paint (a colour map) and --paint-words (its JSON) go together")
    masks = []
    if args.paint:
        masks += from_color_map(args.paint, read_words(args.paint_words), resolution, resolution)
    masks += from_mask_specs(args.paint_mask, resolution, resolution)
    if not masks:
        return None
    layers = tuple(n.strip() for n in args.paint_layers.split(",") if n.strip())
    return Paint(tuple(masks), args.paint_scale, PaintSettings(args.paint_weight, layers))


if __name__ == "__main__":
    sys.exit(main())
