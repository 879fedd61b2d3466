"""python -m sample --pretrained DIR --prompt ... [--negative-prompt ...] [--num 1] [--seed 0]
       [--steps 25] [--sampler euler|heun|dpmpp_2m] [--guidance-scale 7.5]
       [--schedule discrete|karras] [--resolution 512 | --size HxW] [--clip-skip K] [--dtype float32|bfloat16]
       [--variant fp16]

Samples a local diffusers Stable Diffusion 1.x / 2.x or SDXL pipeline folder (model_index.json
with unet/, vae/, text_encoder*/, tokenizer*/, scheduler/) with this project's samplers. One PNG per
sample and grid.png in --out.
"""
from __future__ import annotations

import os
import sys

import numpy as np


def add_arguments(p) -> None:
    g = p.add_argument_group("--pretrained (a diffusers pipeline folder)")
    g.add_argument("--negative-prompt", action="append", default=None,
                   help="one for every prompt, or one for all (default: '')")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--sampler", default="euler", choices=("euler", "heun", "dpmpp_2m"))
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--schedule", default="discrete", choices=("discrete", "karras"),
                   help="the checkpoint's own timestep spacing, or Karras sigmas over its range")
    g.add_argument("--size", help="HxW output size (default: --resolution, else the U-Net's "
                   "sample_size x the VAE factor)")
    g.add_argument("--clip-skip", type=int, help="text encoder layers skipped from the end "
                   "(diffusers' clip_skip)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--variant", help="weights variant files, e.g. fp16")


UNSUPPORTED = ("paint", "paint_words", "style_image", "highres", "cascade", "stages")


def run(args, overrides) -> int:
    from PIL import Image

    from ediffi_jax.config import ConfigError
    from ediffi_jax.encoders.hf import CheckpointError
    from ediffi_jax.encoders.prompt import PromptEncoder
    from ediffi_jax.pipeline.generate import to_uint8
    from ediffi_jax.pipeline.pretrained import load_pretrained
    from ediffi_jax.rng import check_seed
    from sample.__main__ import file_stem, write_grids

    try:
        given = [f"--{k.replace('_', '-')}" for k in UNSUPPORTED if getattr(args, k, None)]
        if args.paint_mask:
            given.append("--paint-mask")
        if given or overrides:
            raise ConfigError(f"{', '.join(given + overrides)}: not available with --pretrained yet")
        check_seed(args.seed, "--seed")
        if args.num < 1 or args.steps < 1:
            raise ConfigError(f"--num and --steps must be >= 1, got {args.num} and {args.steps}")
        prompts = [q for q in args.prompt for _ in range(args.num)]
        negative = args.negative_prompt  # None: "" (or zeros where the pipeline forces them)
        if negative is not None:
            if len(negative) == 1:
                negative = negative * len(args.prompt)
            if len(negative) != len(args.prompt):
                raise ConfigError(f"{len(negative)} --negative-prompt for {len(args.prompt)} "
                                  "--prompt: give one for each, or one for all")
            negative = [n for n in negative for _ in range(args.num)]
        pipe = load_pretrained(args.pretrained, dtype=args.dtype, variant=args.variant)
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae else 1
        if args.size:
            try:
                h, w = (int(v) for v in args.size.lower().split("x"))
            except ValueError:
                raise ConfigError(f"--size must be HxW, got {args.size!r}") from None
        else:
            h = w = args.resolution or pipe.unet.config.sample_size * factor
        plan = pipe.plan(args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                         schedule=args.schedule)
        if h % factor or w % factor:
            raise ConfigError(f"size {h}x{w} is not a multiple of the VAE's factor {factor}")
        encoder = PromptEncoder(args.pretrained, args.dtype, clip_skip=args.clip_skip)
        cond = encoder.encode(prompts, negative, size=(h, w))
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.pretrained}: {h}x{w}, plan:\n{plan.describe()}")
    os.makedirs(args.out, exist_ok=True)
    images = to_uint8(pipe.sample(plan, cond, seed=args.seed, size=(h, w)))
    for i, (prompt, img) in enumerate(zip(prompts, images)):
        Image.fromarray(np.asarray(img)).save(os.path.join(args.out, f"{i:04d}_{file_stem(prompt)}.png"))
    print(f"wrote {write_grids([args.out], [[images]], args.num)}")
    return 0
