"""python -m sample --pretrained DIR --prompt ... [--negative-prompt ...] [--num 1] [--seed 0]
       [--batch N] [--mesh data,fsdp,tensor] [--steps 25] [--sampler euler|heun|dpmpp_2m]
       [--guidance-scale 7.5] [--schedule discrete|karras] [--resolution 512 | --size HxW]
       [--clip-skip K] [--dtype float32|bfloat16] [--variant fp16]
       [--highres scalecrafter ([--scalecrafter-preset sd1|sd2|sdxl|RUN] --size HxW
        | --scalecrafter-config sd2.1_2048x2048.yaml [--scalecrafter-root DIR]
        | --dilate-settings FILE --dilate-tau N [--ndcfg-dilate-settings FILE] [--ndcfg-tau N]
          [--disperse-settings FILE] [--inflate-tau N] [--progressive] [--tau-steps 50])
        [--highres-skip-missing]]
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

--highres scalecrafter samples the last stage with ScaleCrafter (highres/official.py): with
neither a config nor settings files, by the built-in copy of the official settings
(highres/official_presets.py): the run for the output size (--size / --resolution, required)
of the U-Net's family (SD 1.x, SD 2.x, SDXL base) or --scalecrafter-preset's (sd1, sd2, sdxl),
the official run of that size, else the one of the closest pixel count relative to the U-Net's
own (from 0.9 x 4x it; below, sample directly), or --scalecrafter-preset's run as named (e.g.
sd1.5_2048x1024, as its config would be); from the official
repository's files as they are (YingqingHe/ScaleCrafter: configs/*.yaml, whose assets/ paths
are read relative to --scalecrafter-root, by default the yaml folder's parent); or from
settings files (`module:factor` per line; one module per line for dispersion) and taus given
here. Flags given with a preset or a config override its fields. Taus count steps of the
official --tau-steps (50) step DDIM run and become noise levels of the checkpoint's schedule,
so any --steps and --sampler work. The config's latent size sets the output size unless --size
or --resolution does. Names that are not 3x3 convs of the U-Net are an error naming the
closest; --highres-skip-missing drops them with a warning, as the official code does silently
(its SDXL files name blocks SDXL does not have).
"""
from __future__ import annotations

import argparse
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
    g.add_argument("--vae-tile-rows", type=int, metavar="N", help="decode strip by strip, N "
                   "latent rows a strip: the same images in device memory bounded by the strip "
                   "(for 4096^2 outputs; default: one decode of the whole latent)")
    g.add_argument("--attention-entropy", action="store_true", help="past the U-Net's own "
                   "size: rescale self-attention logits to keep their entropy (Attn-SF, Jin "
                   "et al. 2023; ScaleCrafter's baseline), on the last stage")
    h = p.add_argument_group("--pretrained --highres scalecrafter (ScaleCrafter's settings)")
    h.add_argument("--scalecrafter-preset", metavar="NAME", help="built-in official settings: "
                   "a family (sd1, sd2, sdxl: the run for the output size) or a run ("
                   "sd1.5_1024x1024, ..., sdxl_4096x4096; W x H as the official configs) "
                   "(default, without --scalecrafter-config / --dilate-settings: the U-Net's "
                   "family)")
    h.add_argument("--scalecrafter-config", metavar="FILE.yaml",
                   help="an official ScaleCrafter config (its configs/*.yaml)")
    h.add_argument("--scalecrafter-root", metavar="DIR", help="the official repository's root, "
                   "which the config's paths are relative to (default: the yaml folder's parent)")
    h.add_argument("--dilate-settings", metavar="FILE", help="'module:factor' per line")
    h.add_argument("--ndcfg-dilate-settings", metavar="FILE",
                   help="noise-damped CFG's milder settings")
    h.add_argument("--disperse-settings", metavar="FILE", help="modules to disperse, one a line")
    h.add_argument("--dilate-tau", type=int, help="re-dilate steps i < N of --tau-steps")
    h.add_argument("--ndcfg-tau", type=int, help="NDCFG for steps i < N (default: the "
                   "config's; without one --dilate-tau where --ndcfg-dilate-settings is given)")
    h.add_argument("--inflate-tau", type=int, help="dispersed kernels for steps i < N (default: "
                   "the config's; without one --dilate-tau where --disperse-settings is given)")
    h.add_argument("--progressive", action=argparse.BooleanOptionalAction, default=None,
                   help="shrink the factors over the active steps")
    h.add_argument("--tau-steps", type=int, help="the step count the taus count in (default: "
                   "the config's num_inference_steps, else 50)")
    h.add_argument("--highres-skip-missing", action="store_true", help="drop (with a warning) "
                   "settings names that are not 3x3 convs of the U-Net")


UNSUPPORTED = ("paint_layers", "style_image", "stages")
# --highres scalecrafter's flags, with the OfficialConfig field each sets.
HIGHRES_FLAGS = {"scalecrafter_preset": None, "scalecrafter_config": None,
                 "scalecrafter_root": None,
                 "dilate_settings": "dilation", "ndcfg_dilate_settings": "ndcfg_dilation",
                 "disperse_settings": "disperse", "dilate_tau": "dilate_tau",
                 "ndcfg_tau": "ndcfg_tau", "inflate_tau": "inflate_tau",
                 "progressive": "progressive", "tau_steps": "num_inference_steps",
                 "highres_skip_missing": None}


PRESET = "preset"  # read_highres without the preset: the built-in preset path, checked


def uses_preset(args) -> bool:
    """--highres scalecrafter by the built-in settings: --scalecrafter-preset, or neither an
    official config nor --dilate-settings."""
    return bool(getattr(args, "scalecrafter_preset", None)
                or not (args.scalecrafter_config or args.dilate_settings))


def read_highres(args, preset=None):
    """--highres scalecrafter's OfficialConfig (a config file or a built-in preset, the flags
    over it), read and checked before any model loads; None without --highres scalecrafter.
    The built-in preset depends on the U-Net: without `preset` (highres_preset's) that path
    checks its flags and returns PRESET; run() calls again with the preset once loaded."""
    import dataclasses

    from ediffi_jax.config import ConfigError
    from ediffi_jax.highres import official, official_presets

    given = {k: getattr(args, k, None) for k in HIGHRES_FLAGS}
    given = {k: v for k, v in given.items()
             if v is not None and not (k == "highres_skip_missing" and not v)}
    flags = ", ".join(f"--{k.replace('_', '-')}" for k in given)
    if getattr(args, "highres", None) != "scalecrafter":
        if given:
            raise ConfigError(f"{flags}: only with --highres scalecrafter")
        return None
    name = getattr(args, "scalecrafter_preset", None)
    if name and args.scalecrafter_config:
        raise ConfigError("--scalecrafter-preset or --scalecrafter-config: give one")
    if args.scalecrafter_root and not args.scalecrafter_config:
        raise ConfigError("--scalecrafter-root: only with --scalecrafter-config")
    if uses_preset(args):
        names = tuple(official_presets.FAMILIES) + tuple(official_presets.PRESETS)
        if name and name not in names:
            raise ConfigError(f"--scalecrafter-preset {name!r}: not one of {', '.join(names)}")
        if name not in official_presets.PRESETS and not (args.size or args.resolution):
            raise ConfigError(
                "--highres scalecrafter by the built-in presets picks the official settings for "
                "the output size: give --size HxW or --resolution N (or name a run with "
                "--scalecrafter-preset, or give --scalecrafter-config FILE.yaml / "
                "--dilate-settings FILE)")
        base = preset
    elif args.scalecrafter_config:
        base = official.read_config(args.scalecrafter_config, args.scalecrafter_root)
    else:
        if args.dilate_tau is None:
            raise ConfigError("--dilate-settings needs --dilate-tau N: steps i < N of a "
                              "--tau-steps (50) step run are re-dilated (the official configs "
                              "use 20-37 of 50)")
        base = official.OfficialConfig()
    changes, files = {}, dict(base.files) if base is not None else {}
    readers = {"dilate_settings": official.read_dilate_settings,
               "ndcfg_dilate_settings": official.read_dilate_settings,
               "disperse_settings": official.read_disperse_settings}
    for flag, field in HIGHRES_FLAGS.items():
        if field is None or flag not in given:
            continue
        value = given[flag]
        if flag in readers:
            value, files[flag] = readers[flag](value), value
        changes[field] = value
    if base is None:  # the preset, known once the U-Net is: the files above are checked
        return PRESET
    if not (args.scalecrafter_config or uses_preset(args)):
        # the settings files given here act within --dilate-tau
        if args.ndcfg_dilate_settings and args.ndcfg_tau is None:
            changes["ndcfg_tau"] = args.dilate_tau
        if args.disperse_settings and args.inflate_tau is None:
            changes["inflate_tau"] = args.dilate_tau
    try:
        return dataclasses.replace(base, files=files, **changes)
    except ValueError as e:
        raise ConfigError(f"--highres scalecrafter: {e}") from e


def highres_preset(args, unet_config, native: tuple[int, int], size, factor: int):
    """The built-in preset for --highres scalecrafter (an OfficialConfig) and a line naming it:
    --scalecrafter-preset's run, or the run of its family (default the U-Net's: SD 1.x, SD
    2.x, SDXL base) for `size` (height, width) from the U-Net's own `native` size; `factor`:
    the VAE's."""
    import dataclasses

    from ediffi_jax.config import ConfigError
    from ediffi_jax.highres import official_presets as op

    name = getattr(args, "scalecrafter_preset", None)
    if name in op.PRESETS:
        config = op.PRESETS[name]
        if size:
            config = dataclasses.replace(config, latent_size=(size[0] // factor,
                                                              size[1] // factor))
    else:
        try:
            family = name or op.unet_family(unet_config)
        except ValueError as e:
            raise ConfigError(f"--highres scalecrafter: {e} (--scalecrafter-preset "
                              f"{' | '.join(op.FAMILIES)} | RUN chooses one, e.g. "
                              f"{op.OFFICIAL[0]}; --scalecrafter-config / --dilate-settings "
                              "give settings files)") from e
        try:
            name, config = op.preset_for(family, *size, native=native, vae_factor=factor)
        except ValueError as e:
            raise ConfigError(f"--highres scalecrafter: {e}") from e
    h, w = (v * factor for v in config.latent_size)
    height, width = op.run_size(name)
    side = op.FAMILIES[op.run_family(name)][1]
    origin = "the official run" if name in op.OFFICIAL else "an official run transposed"
    return config, (f"ScaleCrafter preset {name} ({origin}: {height} high, {width} wide, from "
                    f"{side}x{side}) for {h}x{w} from this U-Net's {native[0]}x{native[1]} "
                    f"({h * w / (native[0] * native[1]):.3g}x the pixels)")


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
                paint=None, highres=None, attention_area_ratio=None) -> list:
    """Each stage's plan: its own steps / sampler / guidance_scale / schedule from the cascade
    file where it sets them, else these; highres (a HighResPlan) and the attention entropy
    scaling for the last stage."""
    last = len(stages) - 1
    return [pipe.plan(stage.steps or steps, sampler=stage.sampler or sampler,
                      guidance_scale=(guidance_scale if stage.guidance_scale is None
                                      else stage.guidance_scale),
                      schedule=stage.schedule or schedule, paint=paint,
                      highres=highres if k == last else None,
                      attention_area_ratio=attention_area_ratio if k == last else None)
            for k, (stage, pipe) in enumerate(zip(stages, pipes))]


def encode(encoder, prompts, negative, paint_masks, start: int, batch: int, size,
           negative_masks=None):
    """The conditioning of prompts[start:start + batch] (with their paint masks, and those of
    their negative prompts)."""
    import jax.numpy as jnp

    part = slice(start, start + batch)
    cond = encoder.encode(prompts[part], None if negative is None else negative[part], size=size)
    painted = {name: jnp.asarray(masks[part]) for name, masks in
               (("paint", paint_masks), ("negative_paint", negative_masks)) if masks is not None}
    return cond.replace(**painted) if painted else cond


def layout_masks(encoder, prompts, negative, layouts, scale: float):
    """(paint, negative_paint) token masks, one row per prompt (or None where nothing is
    painted): each prompt's Layout on its prompt's tokens and on its negative prompt's
    (`negative`: one per prompt, None if none was given); the positive ones zeros where only
    negative phrases are painted, as CFG runs both branches as one batch."""
    from ediffi_jax.paint.masks import PaintError

    masks = negative_masks = None
    if any(layout.masks for layout in layouts):
        masks = encoder.paint_masks(prompts, [layout.masks for layout in layouts], scale)
    if any(layout.negative for layout in layouts):
        if negative is None:
            raise PaintError("negative phrases are painted (--negative-paint-words / "
                             "--negative-paint-mask / a layout's negative_*): give the "
                             "--negative-prompt they are phrases of")
        negative_masks = encoder.paint_masks(negative, [layout.negative for layout in layouts],
                                             scale, negative=True)
        masks = np.zeros_like(negative_masks) if masks is None else masks
    return masks, negative_masks


def run(args, overrides) -> int:
    from ediffi_jax.config import ConfigError, parse_mesh, parse_size
    from ediffi_jax.encoders.hf import CheckpointError
    from ediffi_jax.models.diffusers_unet import conv3x3_levels
    from ediffi_jax.parallel.mesh import make_mesh
    from ediffi_jax.pipeline.generate import StepProgress, to_uint8
    from ediffi_jax.pipeline.pretrained import (PretrainedCascade, PretrainedStage,
                                                read_pretrained_cascade)
    from ediffi_jax.pipeline.pretrained_experts import (is_pretrained_experts, load_pipeline,
                                                        prompt_encoder)
    from ediffi_jax.rng import check_seed
    from sample.__main__ import paint_settings, read_layouts, write_batches

    try:
        given = [f"--{k.replace('_', '-')}" for k in UNSUPPORTED if getattr(args, k, None)]
        if given or overrides:
            raise ConfigError(f"{', '.join(given + overrides)}: not available with --pretrained yet")
        check_seed(args.seed, "--seed")
        if args.num < 1 or args.steps < 1 or args.batch < 0:
            raise ConfigError(f"--num and --steps must be >= 1 and --batch >= 0, got {args.num}, "
                              f"{args.steps} and {args.batch}")
        if args.vae_tile_rows is not None and args.vae_tile_rows < 1:
            raise ConfigError(f"--vae-tile-rows must be >= 1, got {args.vae_tile_rows}")
        stages = (read_pretrained_cascade(args.cascade) if args.cascade
                  else (PretrainedStage(args.pretrained),))
        if len(stages) > 1 and any(is_pretrained_experts(s.pretrained) for s in stages):
            raise ConfigError(f"{args.cascade}: an experts file as a stage of a cascade is "
                              "not supported yet (sample it alone with --pretrained FILE)")
        prompts = [q for q in args.prompt for _ in range(args.num)]
        # one per --prompt; None: "" (or zeros where the pipeline forces them)
        negative_prompts = args.negative_prompt
        negative = None
        if negative_prompts is not None:
            if len(negative_prompts) == 1:
                negative_prompts = negative_prompts * len(args.prompt)
            if len(negative_prompts) != len(args.prompt):
                raise ConfigError(f"{len(negative_prompts)} --negative-prompt for "
                                  f"{len(args.prompt)} --prompt: give one for each, or one "
                                  "for all")
            negative = [n for n in negative_prompts for _ in range(args.num)]
        size = (parse_size(args.size) if args.size
                else (args.resolution,) * 2 if args.resolution else None)
        highres = read_highres(args)
        mesh = make_mesh(parse_mesh(args.mesh))
        pipes = [load_pipeline(s.pretrained, dtype=args.dtype, variant=args.variant, mesh=mesh)
                 for s in stages]
        for pipe in pipes:
            pipe.vae_tile_rows = args.vae_tile_rows
        cascade = PretrainedCascade(pipes, [s.noise_level for s in stages])
        highres_plan = preset_line = None
        if highres is not None:
            last = pipes[-1]
            if highres is PRESET:
                preset, preset_line = highres_preset(args, last.unet.config, native_size(last),
                                                     size, vae_factor(last))
                highres = read_highres(args, preset)
            if size is None and highres.latent_size:  # the official config's output size
                size = tuple(v * vae_factor(last) for v in highres.latent_size)
            highres_plan = highres.plan(conv3x3_levels(last.unet.config), last.schedule,
                                        last.scheduler_config,
                                        skip_missing=args.highres_skip_missing)
        sizes = stage_sizes(stages, pipes, size)
        encoder = prompt_encoder(stages[0].pretrained, args.dtype, clip_skip=args.clip_skip)
        # Paint-with-words: masks at the last stage's size, biasing every stage's
        # cross-attention; every prompt's (and negative prompt's) phrases checked here.
        settings = paint_settings(args)
        layouts = read_layouts(args, *sizes[-1], len(args.prompt))
        paint_masks = negative_masks = None
        if layouts is not None:
            paint_masks, negative_masks = (
                None if m is None else np.repeat(m, args.num, axis=0)
                for m in layout_masks(encoder, args.prompt, negative_prompts, layouts,
                                      args.paint_scale))
        ratio = None
        if args.attention_entropy:
            (h, w), (h0, w0) = sizes[-1], native_size(pipes[-1])
            if h * w <= h0 * w0:
                raise ConfigError(f"--attention-entropy: {h}x{w} is not past the U-Net's own "
                                  f"{h0}x{w0}")
            ratio = h * w / (h0 * w0)
        plans = stage_plans(stages, pipes, args.steps, args.sampler, args.guidance_scale,
                            args.schedule, settings if layouts is not None else None,
                            highres_plan, ratio)
        batch = args.batch or len(prompts)
        batch += -batch % cascade.batch_multiple  # whole batches on every device
        # Every input checked before any sampling: the first batch's prompts encode here.
        first = encode(encoder, prompts, negative, paint_masks, 0, batch, sizes[0],
                       negative_masks)
        cascade.check(first)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names: list[str] = []
    for k, stage in enumerate(stages):
        names.append(stage_name(stage.pretrained, k, names))
    for stage, plan, (h, w) in zip(stages, plans, sizes):
        print(f"{stage.pretrained}: {h}x{w}, plan:\n{plan.describe()}")
    if preset_line:
        print(preset_line)
    if highres is not None:
        taus = (f"dilate_tau {highres.dilate_tau}, ndcfg_tau {highres.ndcfg_tau}, inflate_tau "
                f"{highres.inflate_tau} of {highres.num_inference_steps} steps, progressive "
                f"{'on' if highres.progressive else 'off'}")
        print("ScaleCrafter: " + (f"{taus}: re-dilation while sigma >= "
                                  f"{highres_plan.sigma_tau:.4g}" if highres_plan
                                  else "dilate_tau 0, direct sampling"))
    dirs = [args.out] if len(stages) == 1 else [os.path.join(args.out, n) for n in names]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    batches = range(0, len(prompts), batch)
    progress = StepProgress(sum(p.num_steps for p in plans) * len(batches))
    for pipe in pipes:
        pipe.set_progress(progress)

    def each_batch():
        for start in batches:
            cond = first if start == 0 else encode(encoder, prompts, negative, paint_masks,
                                                   start, batch, sizes[0], negative_masks)
            yield start, prompts[start:start + batch], (
                np.asarray(to_uint8(out)) for out in cascade.each_stage(
                    plans, cond, sizes=sizes, seed=args.seed, first_index=start))

    return write_batches(each_batch(), dirs, args.num, progress)
