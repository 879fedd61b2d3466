"""python -m sample --ensemble runs/tiny/ensemble.json --prompt "a red circle" [--prompt ...]
       [--num 4] [--seed 0] [--out samples/] [--batch N] [--config.sampling.num_steps=32 ...]
       [--resolution 128 --highres scalecrafter [--config.highres.disperse=True ...]]
       [--paint colors.png --paint-words words.json | --paint-mask "phrase=mask.png:1.0" ...]
python -m sample --cascade cascade.json [--stages base,sr32,sr64] --prompt ... 
       [--config.sr32.sampling.num_steps=12 --config.sr64.sampling.noise_aug_sigma=0.02 ...]

Writes one PNG per sample and grid.png (a row per prompt); a cascade writes each stage's images
to OUT/<stage>/. --ensemble takes an ensemble.json, a single run's workdir or an export;
--cascade a file listing the stages (see sample/cascade.py), --stages picks a chain of them.
Overrides `--config.<stage>.section.key=value` go to one stage, `--config.section.key=value`
to every stage. Prompts are sampled --batch at a time, sharded over every device; each batch's
PNGs are written as it finishes.

--resolution sets the last stage's output side: directly (--highres none) or with
ScaleCrafter's re-dilation (--highres scalecrafter; the `highres` section's fields tune it, see
ediffi_jax/highres/plans.py) past the size the stage was made for.

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
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ensemble", help="ensemble.json, a run's workdir or an export")
    source.add_argument("--cascade", help="a cascade file: a base stage, then SR stages")
    p.add_argument("--stages", help="comma-separated stage names of --cascade (default: all)")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--num", type=int, default=4, help="samples per prompt")
    p.add_argument("--batch", type=int, default=0,
                   help="samples per sampling call (default: all in one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples")
    p.add_argument("--resolution", type=int, help="output side (default: the last stage's own)")
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
    from ediffi_jax.parallel.mesh import make_mesh
    from sample.cascade import CascadeSampler, load_stage, read_cascade
    from sample.generate import grid, mask_overlay, sampling_plan

    try:
        if args.highres:
            overrides.append(f"--config.highres.method={args.highres}")
        overrides = [o.replace("--config.", "", 1) for o in overrides]
        if args.cascade:
            names = [n.strip() for n in (args.stages or "").split(",") if n.strip()]
            stages = read_cascade(args.cascade, names, overrides)
        else:
            if args.stages:
                raise ConfigError("--stages selects stages of a --cascade file")
            stages = (load_stage(args.ensemble, overrides),)
        final = stages[-1]
        model = final.run.stage.model
        resolution = args.resolution or final.resolution
        if resolution % 2 ** (len(model.channel_mult) - 1):
            raise ConfigError(f"--resolution {resolution} cannot be halved "
                              f"{len(model.channel_mult) - 1} times by this U-Net")
        if args.batch < 0 or args.num < 1:
            raise ConfigError("--num must be >= 1 and --batch >= 0")
        prompts = [q for q in args.prompt for _ in range(args.num)]
        paint = read_paint(args, resolution)
        mesh = make_mesh((-1, 1, 1))
        sampler = CascadeSampler(stages, mesh)
        style = None
        if args.style_image:
            style = np.asarray(Image.open(args.style_image).convert("RGB"))
        plans = []
        for k, stage in enumerate(stages):  # every input checked before any sampling
            conditioner = sampler.conditioner(stage)[1]
            painted = paint is not None and stage.paint
            if painted:
                paint.conditioning(conditioner, stage.run.stage.model, args.prompt)
            if style is not None and stage.style and conditioner.clip_vision is None:
                raise ConfigError(f"--style-image needs a CLIP vision tower: stage {stage.name!r}"
                                  "'s encoders.clip_vision is not set")
            res = resolution if k == len(stages) - 1 else stage.resolution
            plans.append(sampling_plan(stage.run.stage.model, stage.ensemble, stage.sampling, res,
                                       stage.highres, paint.settings if painted else None,
                                       stage.resolution))
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for stage, plan in zip(stages, plans):
        print(f"stage {stage.name}: {len(stage.ensemble)} expert(s); plan:\n{plan.describe()}")
    dirs = [args.out if len(stages) == 1 else os.path.join(args.out, s.name) for s in stages]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    batch = args.batch or len(prompts)
    images = [[] for _ in stages]
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        outputs = sampler(chunk, seed=args.seed, first_index=start, paint=paint,
                          style_images=[style] * len(chunk) if style is not None else None,
                          resolution=resolution)
        for k, (d, out) in enumerate(zip(dirs, outputs)):
            images[k].append(out)
            for i, (prompt, img) in enumerate(zip(chunk, out), start):
                name = f"{i:04d}_{'_'.join(prompt.split())[:60]}"
                Image.fromarray(img).save(os.path.join(d, name + ".png"))
                if paint is not None and stages[k].paint:
                    Image.fromarray(mask_overlay(img, paint.masks_at(img.shape[0]))).save(
                        os.path.join(d, name + "_masks.png"))
        print(f"wrote samples {start}-{start + len(chunk) - 1}", flush=True)
    for d, parts in zip(dirs, images):
        Image.fromarray(grid(np.concatenate(parts), args.num)).save(os.path.join(d, "grid.png"))
    print(f"wrote {len(prompts)} samples per stage and grid.png to {', '.join(dirs)}")
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
