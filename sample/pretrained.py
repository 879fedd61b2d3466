"""python -m sample --pretrained DIR --prompt ... [--negative-prompt ...] [--num 1] [--seed 0]
       [--batch N] [--mesh data,fsdp,tensor] [--steps 25] [--sampler euler|heun|dpmpp_2m]
       [--guidance-scale 7.5] [--schedule discrete|karras] [--resolution 512 | --size HxW]
       [--clip-skip K] [--dtype float32|bfloat16] [--variant fp16]
python -m sample --cascade if.json --prompt ...    (pretrained folders in a chain)

Samples a local diffusers Stable Diffusion 1.x / 2.x, SDXL or DeepFloyd IF pipeline folder
(model_index.json with unet/, vae/ where latent, text_encoder*/, tokenizer*/, scheduler/) with
this project's samplers; or a cascade file of such folders (pipeline/pretrained.py's
read_pretrained_cascade: IF stage I, then stage II fed its images), whose stages may set
steps / sampler / guidance_scale / schedule / noise_level over the command line's. The prompts
are encoded once, by the first stage's text encoder. --size / --resolution set the last
stage's output; earlier stages make their U-Net's own size. Prompts are sampled --batch at a
time, sharded over the mesh's data x fsdp devices; one PNG per sample and grid.png in --out
(a cascade: OUT/<stage folder name>/), written as each stage of each batch finishes. If
sampling fails part-way, what finished stays written and the command exits 1.
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


UNSUPPORTED = ("paint_layers", "style_image", "highres", "stages")


def stage_name(directory: str, k: int, names: list[str]) -> str:
    name = os.path.basename(os.path.normpath(directory)) or f"stage{k}"
    return f"{k}_{name}" if name in names else name


def native_size(pipe) -> tuple[int, int]:
    """The (height, width) a pipeline's U-Net was made for, in pixels."""
    return (pipe.unet.config.sample_size * vae_factor(pipe),) * 2


def vae_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae else 1


def stage_sizes(stages, pipes, size=None) -> list[tuple[int, int]]:
    """Each stage's (height, width): `size` for the last (default its own), the U-Net's own
    for the earlier ones. A size the VAE cannot encode is an error naming the folder."""
    from ediffi_jax.config import ConfigError

    sizes = []
    for k, (stage, pipe) in enumerate(zip(stages, pipes)):
        h, w = size if size and k == len(stages) - 1 else native_size(pipe)
        factor = vae_factor(pipe)
        if h % factor or w % factor:
            raise ConfigError(f"size {h}x{w} is not a multiple of the VAE's factor "
                              f"{factor} ({stage.pretrained})")
        sizes.append((h, w))
    return sizes


def stage_plans(stages, pipes, steps: int, sampler: str, guidance_scale: float, schedule: str,
                paint=None) -> list:
    """Each stage's plan: its own steps / sampler / guidance_scale / schedule from the cascade
    file where it sets them, else these."""
    return [pipe.plan(stage.steps or steps, sampler=stage.sampler or sampler,
                      guidance_scale=(guidance_scale if stage.guidance_scale is None
                                      else stage.guidance_scale),
                      schedule=stage.schedule or schedule, paint=paint)
            for stage, pipe in zip(stages, pipes)]


def encode(encoder, prompts, negative, paint_masks, start: int, batch: int, size):
    """The conditioning of prompts[start:start + batch] (with their paint masks)."""
    import jax.numpy as jnp

    part = slice(start, start + batch)
    cond = encoder.encode(prompts[part], None if negative is None else negative[part], size=size)
    return cond if paint_masks is None else cond.replace(paint=jnp.asarray(paint_masks[part]))


def run(args, overrides) -> int:
    from ediffi_jax.config import ConfigError, parse_mesh, parse_size
    from ediffi_jax.encoders.hf import CheckpointError
    from ediffi_jax.encoders.prompt import PromptEncoder
    from ediffi_jax.parallel.mesh import make_mesh
    from ediffi_jax.pipeline.generate import StepProgress, to_uint8
    from ediffi_jax.pipeline.pretrained import (PretrainedCascade, PretrainedStage,
                                                load_pretrained, read_pretrained_cascade)
    from ediffi_jax.rng import check_seed
    from sample.__main__ import read_paint, write_batches

    try:
        given = [f"--{k.replace('_', '-')}" for k in UNSUPPORTED if getattr(args, k, None)]
        if given or overrides:
            raise ConfigError(f"{', '.join(given + overrides)}: not available with --pretrained yet")
        check_seed(args.seed, "--seed")
        if args.num < 1 or args.steps < 1 or args.batch < 0:
            raise ConfigError(f"--num and --steps must be >= 1 and --batch >= 0, got {args.num}, "
                              f"{args.steps} and {args.batch}")
        stages = (read_pretrained_cascade(args.cascade) if args.cascade
                  else (PretrainedStage(args.pretrained),))
        prompts = [q for q in args.prompt for _ in range(args.num)]
        negative = args.negative_prompt  # None: "" (or zeros where the pipeline forces them)
        if negative is not None:
            if len(negative) == 1:
                negative = negative * len(args.prompt)
            if len(negative) != len(args.prompt):
                raise ConfigError(f"{len(negative)} --negative-prompt for {len(args.prompt)} "
                                  "--prompt: give one for each, or one for all")
            negative = [n for n in negative for _ in range(args.num)]
        size = (parse_size(args.size) if args.size
                else (args.resolution,) * 2 if args.resolution else None)
        mesh = make_mesh(parse_mesh(args.mesh))
        pipes = [load_pretrained(s.pretrained, dtype=args.dtype, variant=args.variant, mesh=mesh)
                 for s in stages]
        cascade = PretrainedCascade(pipes, [s.noise_level for s in stages])
        sizes = stage_sizes(stages, pipes, size)
        encoder = PromptEncoder(stages[0].pretrained, args.dtype, clip_skip=args.clip_skip)
        # Paint-with-words: masks at the last stage's size, biasing every stage's
        # cross-attention; every prompt's phrases checked here.
        paint = read_paint(args, *sizes[-1])
        paint_masks = None
        if paint is not None:
            paint_masks = np.repeat(encoder.paint_masks(args.prompt, paint.masks, paint.scale),
                                    args.num, axis=0)
        plans = stage_plans(stages, pipes, args.steps, args.sampler, args.guidance_scale,
                            args.schedule, paint.settings if paint is not None else None)
        batch = args.batch or len(prompts)
        batch += -batch % cascade.batch_multiple  # whole batches on every device
        # Every input checked before any sampling: the first batch's prompts encode here.
        first = encode(encoder, prompts, negative, paint_masks, 0, batch, sizes[0])
        cascade.check(first)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names: list[str] = []
    for k, stage in enumerate(stages):
        names.append(stage_name(stage.pretrained, k, names))
    for stage, plan, (h, w) in zip(stages, plans, sizes):
        print(f"{stage.pretrained}: {h}x{w}, plan:\n{plan.describe()}")
    dirs = [args.out] if len(stages) == 1 else [os.path.join(args.out, n) for n in names]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    batches = range(0, len(prompts), batch)
    progress = StepProgress(sum(p.num_steps for p in plans) * len(batches))
    for pipe in pipes:
        pipe.runner.progress = progress

    def each_batch():
        for start in batches:
            cond = first if start == 0 else encode(encoder, prompts, negative, paint_masks,
                                                   start, batch, sizes[0])
            yield start, prompts[start:start + batch], (
                np.asarray(to_uint8(out)) for out in cascade.each_stage(
                    plans, cond, sizes=sizes, seed=args.seed, first_index=start))

    return write_batches(each_batch(), dirs, args.num, progress)
