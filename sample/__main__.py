"""python -m sample --ensemble runs/tiny/ensemble.json --prompt "a red circle" [--prompt ...]
       [--num 4] [--seed 0] [--out samples/] [--batch N] [--config.sampling.num_steps=32 ...]
       [--resolution 128 --highres scalecrafter [--config.highres.disperse=True ...]]
       [--paint colors.png --paint-words words.json | --paint-mask "phrase=mask.png:1.0" ...]
python -m sample --pretrained DIR --prompt ... [--negative-prompt ...]  (sample/pretrained.py)
python -m sample --cascade if.json --prompt ...   (a cascade file of pretrained folders, e.g.
       DeepFloyd IF stage I then stage II: sample/pretrained.py)
python -m sample --cascade cascade.json [--stages base,sr32,sr64] --prompt ... 
       [--config.sr32.sampling.num_steps=12 --config.sr64.sampling.noise_aug_sigma=0.02 ...]

Writes one PNG per sample, named by its index and prompt (letters, digits and '-' kept), and
grid.png (a row per prompt); a cascade writes each stage's images to OUT/<stage>/. If sampling
fails part-way, what finished stays written (with a grid of it) and the command exits 1.
--ensemble takes an ensemble.json, a single run's workdir or an export; --cascade a file
listing the stages (see ediffi_jax/pipeline/cascade.py), --stages picks a chain of them.
Overrides `--config.<stage>.section.key=value` go to one stage, `--config.section.key=value`
to every stage. Prompts are sampled --batch at a time, sharded over every device; each batch's
PNGs are written as each stage finishes. Progress (sampler steps, all batches and stages) goes
to stderr.

--resolution sets the last stage's output side: directly (--highres none) or with
ScaleCrafter's re-dilation (--highres scalecrafter; the `highres` section's fields tune it, see
ediffi_jax/highres/plans.py) past the size the stage was made for.

Paint-with-words: --paint takes a colour-map PNG and --paint-words a JSON mapping its colours to
"phrase,strength" (or "background"); --paint-mask gives one phrase's mask PNG (repeatable).
Every prompt must contain every phrase. Each sample is saved with a *_masks.png beside it.
With --pretrained also: negative phrases, painted regions pushed away from phrases of the
--negative-prompt (required; they bias CFG's negative branch): --negative-paint-words maps
colours of the --paint colour map to them (colours it does not name get none),
--negative-paint-mask "phrase=mask.png[:strength]" (repeatable); and --paint-layout FILE.json,
one layout per --prompt in order (instead of --paint / --paint-mask / --negative-paint-*):
[{"paint": "a.png", "words": "a.json", "masks": {"phrase": "m.png:1.0"}, "negative_words":
{...}, "negative_masks": {...}}, ...], paths relative to the file (ediffi_jax/paint/masks.py).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

import numpy as np

from ediffi_jax.config import parse_mesh, split_overrides
from ediffi_jax.parallel.host import configure_cpu_host
from sample import pretrained


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ensemble", help="ensemble.json, a run's workdir or an export")
    source.add_argument("--cascade", help="a cascade file: a base stage, then SR stages")
    source.add_argument("--pretrained", help="a local diffusers pipeline folder (SD 1.x / 2.x, "
                        "SDXL, DeepFloyd IF)")
    p.add_argument("--stages", help="comma-separated stage names of --cascade (default: all)")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--num", type=int, default=4, help="samples per prompt")
    p.add_argument("--batch", type=int, default=0,
                   help="samples per sampling call (default: all in one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples")
    p.add_argument("--mesh", default="-1,1,1",
                   help="data,fsdp,tensor device mesh (-1: the rest; write --mesh=-1,1,1); the "
                   "batch is sharded over data x fsdp")
    p.add_argument("--resolution", type=int, help="output side (default: the last stage's own)")
    p.add_argument("--highres", choices=("none", "scalecrafter"),
                   help="how to sample past the training resolution (default: highres.method)")
    p.add_argument("--paint", help="paint-with-words colour map (PNG)")
    p.add_argument("--paint-words", help="JSON: colour -> 'phrase,strength' (with --paint)")
    p.add_argument("--paint-mask", action="append", default=[], metavar="PHRASE=PNG[:STRENGTH]")
    p.add_argument("--negative-paint-words", metavar="JSON", help="--pretrained: colour of the "
                   "--paint map -> 'phrase,strength' of the --negative-prompt")
    p.add_argument("--negative-paint-mask", action="append", default=[],
                   metavar="PHRASE=PNG[:STRENGTH]", help="--pretrained: a --negative-prompt "
                   "phrase's region (repeatable)")
    p.add_argument("--paint-layout", metavar="FILE.json", help="--pretrained: one paint layout "
                   "per --prompt, in order (see above)")
    p.add_argument("--paint-scale", type=float, default=1.0, help="global paint strength w'")
    p.add_argument("--paint-weight", default="std", help="max (the paper), std or std_sq")
    p.add_argument("--paint-layers", default="", help="comma-separated attention blocks (all)")
    p.add_argument("--style-image", help="a reference image: its CLIP image embedding conditions "
                   "every sample (needs encoders.clip_vision); its own guidance scale is "
                   "sampling.style_guidance_scale (default: guided with the text)")
    pretrained.add_arguments(p)
    args = p.parse_args(rest)
    configure_cpu_host()
    from ediffi_jax.pipeline.pretrained import is_pretrained_cascade

    if args.pretrained or (args.cascade and is_pretrained_cascade(args.cascade)):
        return pretrained.run(args, overrides)

    from PIL import Image

    from ediffi_jax.config import ConfigError
    from ediffi_jax.parallel.mesh import make_mesh
    from ediffi_jax.pipeline.cascade import CascadeSampler, load_stage, read_cascade
    from ediffi_jax.pipeline.generate import StepProgress, mask_overlay
    from ediffi_jax.rng import check_seed

    try:
        if args.attention_entropy:
            raise ConfigError("--attention-entropy: a --pretrained option (the project's "
                              "models sample larger sizes with --highres scalecrafter)")
        if args.num < 1 or args.batch < 0:
            raise ConfigError(f"--num must be >= 1 and --batch >= 0, got --num {args.num} and "
                              f"--batch {args.batch}")
        check_seed(args.seed, "--seed")
        if args.resolution is not None and args.resolution < 1:
            raise ConfigError(f"--resolution must be a positive side in pixels, got "
                              f"{args.resolution}")
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
        multiple = 2 ** (len(model.channel_mult) - 1)
        if resolution % multiple:
            raise ConfigError(f"--resolution {resolution} cannot be halved "
                              f"{len(model.channel_mult) - 1} time(s) by this U-Net: the side "
                              f"must be a multiple of {multiple}")
        prompts = [q for q in args.prompt for _ in range(args.num)]
        batch = args.batch or len(prompts)
        batches = range(0, len(prompts), batch)
        paint = read_paint(args, resolution)
        sampler = CascadeSampler(stages, make_mesh(parse_mesh(args.mesh)))
        # Every input checked before any sampling; the plans and paint masks built here are
        # the ones every batch uses.
        plans = [sampler.plan(k, resolution if stage is final else None,
                              paint.settings if paint is not None else None, "--resolution")
                 for k, stage in enumerate(stages)]
        progress = StepProgress(sum(p.num_steps for p in plans) * len(batches))
        sampler.set_progress(progress)
        style = None
        if args.style_image:
            style = np.asarray(Image.open(args.style_image).convert("RGB"))
        for k, stage in enumerate(stages):
            if paint is not None and stage.paint:
                sampler.paint_conditioning(k, paint, args.prompt)
            if (style is not None and stage.style
                    and sampler.conditioner(stage)[1].clip_vision is None):
                raise ConfigError(f"--style-image needs a CLIP vision tower: stage {stage.name!r}"
                                  "'s encoders.clip_vision is not set")
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for stage, plan in zip(stages, plans):
        print(f"stage {stage.name}: {len(stage.ensemble)} expert(s); plan:\n{plan.describe()}")
    dirs = [args.out if len(stages) == 1 else os.path.join(args.out, s.name) for s in stages]
    for d in dirs:
        os.makedirs(d, exist_ok=True)

    def saved_with_masks(k, img, stem):
        if paint is not None and stages[k].paint:
            Image.fromarray(mask_overlay(img, paint.masks_at(img.shape[0]))).save(
                stem + "_masks.png")

    def each_batch():
        for start in batches:
            chunk = prompts[start:start + batch]
            yield start, chunk, sampler.each_stage(
                chunk, seed=args.seed, first_index=start, paint=paint,
                style_images=[style] * len(chunk) if style is not None else None,
                resolution=resolution)

    return write_batches(each_batch(), dirs, args.num, progress, saved_with_masks)


def write_batches(batches, dirs, columns: int, progress, also=None) -> int:
    """Saves the PNGs of each stage of each batch as it finishes (`batches` yields (first
    index, prompts, each stage's uint8 images)); `also(stage, image, path stem)` writes more
    per image. Ends with grid.png per stage; if sampling fails part-way, with the grids of
    what finished, exit status 1."""
    from PIL import Image

    images = [[] for _ in dirs]  # per stage, its finished batches
    try:
        for start, chunk, outputs in batches:
            for k, out in enumerate(outputs):  # each stage saved as it ends
                for i, (prompt, img) in enumerate(zip(chunk, out), start):
                    stem = os.path.join(dirs[k], f"{i:04d}_{file_stem(prompt)}")
                    Image.fromarray(img).save(stem + ".png")
                    if also is not None:
                        also(k, img, stem)
                images[k].append(out)
            print(f"wrote samples {start}-{start + len(chunk) - 1}", flush=True)
    except (Exception, KeyboardInterrupt) as e:
        progress.close()
        traceback.print_exc()
        print(f"error: sampling failed ({type(e).__name__}: {e}); kept what was finished: "
              f"{write_grids(dirs, images, columns)}", file=sys.stderr)
        return 1
    progress.close()
    print(f"wrote {write_grids(dirs, images, columns)}")
    return 0


def file_stem(prompt: str, limit: int = 60) -> str:
    """A prompt as a file name: letters, digits and '-' kept, every other run one '_', at most
    `limit` characters, never empty (so no '/', '..' or hidden file)."""
    stem = re.sub(r"[^A-Za-z0-9-]+", "_", prompt)[:limit].strip("_")
    return stem or "prompt"


def write_grids(dirs, images, columns: int) -> str:
    """grid.png of each stage's finished samples (a row per prompt); says what each folder
    holds."""
    from PIL import Image

    from ediffi_jax.pipeline.generate import grid

    said = []
    for d, parts in zip(dirs, images):
        n = sum(len(p) for p in parts)
        if not n:
            said.append(f"no samples in {d}")
            continue
        Image.fromarray(grid(np.concatenate(parts), columns)).save(os.path.join(d, "grid.png"))
        said.append(f"samples 0-{n - 1} and grid.png in {d}")
    return "; ".join(said)


# Paint flags the project's own models do not take (their conditioning has no negative
# prompt, and Paint gives every prompt one layout).
PRETRAINED_PAINT = ("negative_paint_words", "negative_paint_mask", "paint_layout")
LAYOUT_FLAGS = ("paint", "paint_words", "paint_mask") + PRETRAINED_PAINT[:2]


def _flags(args, names) -> list[str]:
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None)]


def paint_settings(args):
    """The static paint-with-words settings of the command line, checked."""
    from ediffi_jax.paint.bias import PaintSettings
    from ediffi_jax.paint.masks import PaintError

    if not np.isfinite(args.paint_scale):
        raise PaintError(f"--paint-scale must be a finite number, got {args.paint_scale}")
    layers = tuple(n.strip() for n in args.paint_layers.split(",") if n.strip())
    return PaintSettings(args.paint_weight, layers)


def read_layouts(args, height: int, width: int, prompts: int):
    """One paint Layout per --prompt at the output size: --paint-layout's, or the one of the
    --paint / --paint-mask / --negative-paint-* flags for every prompt; None unpainted."""
    from ediffi_jax.paint.masks import (Layout, PaintError, from_color_map, from_mask_specs,
                                        read_layouts as read_layout_file, read_words)

    if args.paint_layout:
        given = _flags(args, LAYOUT_FLAGS)
        if given:
            raise PaintError(f"--paint-layout gives each prompt its layout: not with "
                             f"{', '.join(given)}")
        layouts = read_layout_file(args.paint_layout, height, width)
        if len(layouts) != prompts:
            raise PaintError(f"--paint-layout {args.paint_layout}: {len(layouts)} layouts for "
                             f"{prompts} --prompt: give one for each, in order")
        return layouts
    if bool(args.paint) != bool(args.paint_words or args.negative_paint_words):
        raise PaintError("--paint (a colour map) goes with --paint-words and/or "
                         "--negative-paint-words (its colours' phrases)")
    masks, negative = [], []
    if args.paint_words:
        masks += from_color_map(args.paint, read_words(args.paint_words), height, width)
    if args.negative_paint_words:
        negative += from_color_map(args.paint, read_words(args.negative_paint_words), height,
                                   width, partial=True)
    masks += from_mask_specs(args.paint_mask, height, width)
    negative += from_mask_specs(args.negative_paint_mask, height, width,
                                "--negative-paint-mask")
    if not (masks or negative):
        return None
    return [Layout(tuple(masks), tuple(negative))] * prompts


def read_paint(args, height: int, width: int | None = None):
    """The paint-with-words inputs of the command line for the project's models, at the output
    size (or None)."""
    from ediffi_jax.paint.masks import PaintError
    from ediffi_jax.pipeline.generate import Paint

    given = _flags(args, PRETRAINED_PAINT)
    if given:
        raise PaintError(f"{', '.join(given)}: only with --pretrained (the project's models "
                         "paint one layout of the prompt's phrases: --paint / --paint-mask)")
    settings = paint_settings(args)
    layouts = read_layouts(args, height, height if width is None else width, 1)
    return None if layouts is None else Paint(layouts[0].masks, args.paint_scale, settings)


if __name__ == "__main__":
    sys.exit(main())
