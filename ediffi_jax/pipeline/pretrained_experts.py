"""Noise-interval experts across checkpoints: one sampling run whose steps are split by noise
level between diffusers pipelines, even of different architectures (SDXL base for high
noise, the SDXL refiner for low noise, as diffusers' `denoising_end` / `denoising_start` do;
Wan 2.2's `boundary_ratio` is the same idea), each expert with its own sampling settings.

An experts file lists the folders in order of increasing noise with the interval each owns,
as mass quantiles of the training distribution of timesteps (uniform over 0..T-1 for these
checkpoints, so `(q_lo, q_hi]` is t in [q_lo T, q_hi T)); diffusers' denoising_end = e is
the boundary 1 - e:

    {"experts": [
      {"pretrained": "sdxl-refiner", "quantiles": ["0", "1/5"], "guidance_scale": 7.5},
      {"pretrained": "sdxl-base", "quantiles": ["1/5", "1"], "guidance_scale": 5.0}]}

The quantiles become sigma thresholds of the highest-noise expert's schedule, and each step
goes to the expert owning its sigma (switching by noise level, not by step count, so any
step count or spacing splits where the file says). Fields per expert: `pretrained`,
`quantiles`, and optionally `guidance_scale`, `sampler` (euler / heun / dpmpp_2m; a
DPM-Solver++ expert after another continues the multistep history), `clip_skip`. Each expert
compiles its own loops once; the plan's segments hand the sampler state from one to the next.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from fractions import Fraction
from typing import Sequence

import jax
import numpy as np

from ediffi_jax.diffusion.plan import SAMPLERS, Plan, Segment
from ediffi_jax.diffusion.sampling import initial_state
from ediffi_jax.encoders import hf
from ediffi_jax.encoders.prompt import PromptEncoder
from ediffi_jax.pipeline.pretrained import (PretrainedPipeline, lists_pretrained,
                                            load_pretrained, read_json_file)

FIELDS = ("pretrained", "quantiles", "guidance_scale", "sampler", "clip_skip")


@dataclasses.dataclass(frozen=True)
class PretrainedExpert:
    """One entry of an experts file: a folder and the timestep-mass interval it owns."""

    pretrained: str
    q_lo: Fraction
    q_hi: Fraction
    guidance_scale: float | None = None
    sampler: str | None = None
    clip_skip: int | None = None


def is_pretrained_experts(path: str) -> bool:
    """Whether `path` is an experts file of pretrained folders."""
    return lists_pretrained(path, "experts")


def read_pretrained_experts(path: str) -> tuple[PretrainedExpert, ...]:
    """The experts of a file (folders relative to it), checked: known fields, quantiles that
    tile (0, 1] in order of increasing noise, samplers that exist."""
    spec = read_json_file(path, "the experts file")
    entries = spec.get("experts") if isinstance(spec, dict) else None
    if not entries or not all(isinstance(e, dict) and "pretrained" in e for e in entries):
        raise hf.CheckpointError(f'{path}: expected {{"experts": [{{"pretrained": DIR, '
                                 '"quantiles": [Q_LO, Q_HI], ...}}, ...]}')
    base = os.path.dirname(os.path.abspath(path))
    experts, cursor = [], Fraction(0)
    for i, entry in enumerate(entries):
        where = f"{path}: expert {i} ({entry['pretrained']})"
        unknown = sorted(set(entry) - set(FIELDS))
        if unknown:
            raise hf.CheckpointError(f"{where} has unknown keys {unknown} (allowed: "
                                     f"{', '.join(FIELDS)})")
        try:
            q_lo, q_hi = (Fraction(str(q)) for q in entry["quantiles"])
        except (KeyError, TypeError, ValueError):
            raise hf.CheckpointError(f'{where}: "quantiles" must be [Q_LO, Q_HI], e.g. '
                                     '["0", "1/5"]') from None
        if q_lo != cursor or not q_lo < q_hi <= 1:
            raise hf.CheckpointError(
                f"{where}: quantiles ({q_lo}, {q_hi}] do not continue the layout at {cursor}; "
                "list the experts by increasing noise, tiling (0, 1] without gap or overlap")
        if entry.get("sampler") is not None and entry["sampler"] not in SAMPLERS:
            raise hf.CheckpointError(f"{where}: sampler {entry['sampler']!r} is not one of "
                                     f"{', '.join(SAMPLERS)}")
        experts.append(PretrainedExpert(
            os.path.normpath(os.path.join(base, entry["pretrained"])), q_lo, q_hi,
            entry.get("guidance_scale"), entry.get("sampler"), entry.get("clip_skip")))
        cursor = q_hi
    if cursor != 1:
        raise hf.CheckpointError(f"{path}: nothing owns quantiles ({cursor}, 1]")
    return tuple(experts)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["conds"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ExpertConditioning:
    """One PromptConditioning per expert (each encoded by its own folder's text encoders);
    what a single pipeline's cond is, for an ensemble of them. A plain dataclass pytree: a
    flax struct would overwrite the `replace` below with its own."""

    conds: tuple

    @property
    def batch_size(self) -> int:
        return self.conds[0].batch_size

    @property
    def lowres(self):
        return self.conds[0].lowres

    def replace(self, **changes) -> "ExpertConditioning":
        """Every expert's cond changed alike, except `paint` and `negative_paint`
        [B, E, H, W, L]: expert k's masks at [:, k], cut to its context length."""
        stacked = {name: changes.pop(name) for name in ("paint", "negative_paint")
                   if changes.get(name) is not None}
        conds = []
        for k, cond in enumerate(self.conds):
            own = dict(changes)
            for name, masks in stacked.items():
                own[name] = masks[:, k, ..., :cond.context.shape[1]]
            conds.append(cond.replace(**own))
        return ExpertConditioning(tuple(conds))


class ExpertsPromptEncoder:
    """The experts' text sides: each expert's prompts encoded by its folder's towers (one
    encoder per distinct folder and clip_skip), in the PromptEncoder interface."""

    def __init__(self, experts: Sequence[PretrainedExpert], dtype: str = "float32",
                 clip_skip: int | None = None, mesh=None):
        made: dict = {}
        self.encoders = []
        for e in experts:
            key = (e.pretrained, clip_skip if e.clip_skip is None else e.clip_skip)
            if key not in made:
                made[key] = PromptEncoder(e.pretrained, dtype, mesh, clip_skip=key[1])
            self.encoders.append(made[key])

    def encode(self, prompts, negative_prompts=None, size=None) -> ExpertConditioning:
        return ExpertConditioning(tuple(e.encode(prompts, negative_prompts, size=size)
                                        for e in self.encoders))

    def context_length(self) -> int:
        return max(e.context_length() for e in self.encoders)

    def paint_masks(self, prompts, masks, scale: float = 1.0, negative: bool = False
                    ) -> np.ndarray:
        """[B, E, H, W, L]: each expert's token masks (its own tokenizer's reading of every
        phrase), padded to the longest context; `negative` as PromptEncoder.paint_masks'."""
        per = [e.paint_masks(prompts, masks, scale, negative) for e in self.encoders]
        width = max(m.shape[-1] for m in per)
        return np.stack([np.pad(m, [(0, 0)] * 3 + [(0, width - m.shape[-1])]) for m in per], 1)


def prompt_encoder(path: str, dtype: str = "float32", clip_skip: int | None = None, mesh=None):
    """The text side of a pipeline folder, or of every expert of an experts file."""
    if is_pretrained_experts(path):
        return ExpertsPromptEncoder(read_pretrained_experts(path), dtype, clip_skip, mesh)
    return PromptEncoder(path, dtype, mesh, clip_skip=clip_skip)


@dataclasses.dataclass
class PretrainedExperts(PretrainedPipeline):
    """Pipelines as noise-interval experts of one sampling run. The pipeline fields are the
    highest-noise expert's (it starts from noise: sigma spacing, sizes, initial scale), the
    VAE the lowest-noise one's (it makes the final latents); `cond` is an
    ExpertConditioning."""

    experts: tuple = ()  # PretrainedPipeline per expert, by increasing noise
    specs: tuple = ()  # their PretrainedExpert entries

    @classmethod
    def from_pipelines(cls, path: str, pipes, specs) -> "PretrainedExperts":
        pipes, specs = tuple(pipes), tuple(specs)
        decoders = [p for p in pipes if p.vae is not None]
        for p in pipes:
            if p.latent_channels != pipes[0].latent_channels:
                raise ValueError(f"{path}: {p.directory} samples {p.latent_channels} channels, "
                                 f"{pipes[0].directory} {pipes[0].latent_channels}: experts "
                                 "must share one latent space")
            if p.vae is not None and p.vae.config != decoders[0].vae.config:
                raise ValueError(f"{path}: {p.directory}'s VAE differs from "
                                 f"{decoders[0].directory}'s: experts must share one latent "
                                 "space")
            if (p.noising_schedule is None) != (pipes[0].noising_schedule is None):
                raise ValueError(f"{path}: super-resolution and text-to-image experts do not "
                                 "mix")
        top, decoder = pipes[-1], (decoders[0] if decoders else None)
        return cls(path, top.unet, top.unet_params, top.schedule,
                   vae=decoder.vae if decoder else None,
                   vae_params=decoder.vae_params if decoder else None, mesh=top.mesh,
                   noising_schedule=top.noising_schedule,
                   scheduler_config=top.scheduler_config, experts=pipes, specs=specs)

    @property
    def progress(self):
        return self.experts[0].runner.progress

    def set_progress(self, progress) -> None:
        for pipe in self.experts:
            pipe.runner.progress = progress

    def owners(self, sigmas) -> np.ndarray:
        """The expert of each step: the one whose interval holds the step's sigma, the
        boundaries being the highest-noise expert's sigma at t = q T (a step exactly at a
        boundary goes to the noisier expert, as diffusers' `t >= cutoff` does)."""
        train = self.schedule.sigmas_train()
        bounds = [np.interp(float(s.q_hi) * self.schedule.num_train_timesteps,
                            np.arange(len(train)), train) for s in self.specs[:-1]]
        steps = np.asarray(sigmas, np.float64)[:-1]
        return np.array([sum(s >= b * (1 - 1e-6) for b in bounds) for s in steps], int)

    def plan(self, num_steps: int = 25, *, sampler: str = "euler", guidance_scale: float = 7.5,
             schedule: str = "discrete", sigmas=None, highres=None, **plan_kw) -> Plan:
        """The plan on the highest-noise expert's schedule, its steps split by owner, each
        with its expert's guidance scale and sampler (the file's, else these)."""
        if highres is not None and any(p.unet.config != self.unet.config
                                       for p in self.experts):
            raise ValueError(f"{self.directory}: ScaleCrafter's settings name one U-Net's "
                             "convs; these experts' U-Nets differ")
        whole = super().plan(num_steps, sampler=sampler, guidance_scale=guidance_scale,
                             schedule=schedule, sigmas=sigmas, highres=highres, **plan_kw)
        who = self.owners(whole.sigmas)
        steps = []
        for seg in whole.segments:
            for i in range(seg.start, seg.stop):
                spec = self.specs[who[i]]
                scale = guidance_scale if spec.guidance_scale is None else spec.guidance_scale
                settings = dataclasses.replace(
                    seg.settings, sampler=spec.sampler or seg.settings.sampler,
                    use_cfg=scale != 1.0,
                    uncond_layers=seg.settings.uncond_layers if scale != 1.0 else None)
                steps.append(Segment(i, i + 1, (int(who[i]),) * 2, float(scale), settings))
        merged = [steps[0]]
        for s in steps[1:]:
            last = merged[-1]
            if (s.experts, s.guidance_scale, s.settings) == (
                    last.experts, last.guidance_scale, last.settings):
                merged[-1] = dataclasses.replace(last, stop=s.stop)
            else:
                merged.append(s)
        return dataclasses.replace(whole, segments=tuple(merged))

    def check_cond(self, cond) -> None:
        for pipe, c in zip(self.experts, cond.conds):
            pipe.check_cond(c)

    def integrate(self, plan: Plan, cond: ExpertConditioning, keys, x):
        """Each segment on its expert's runner, the sampler state handed on between them."""
        for pipe in self.experts:
            pipe.runner.start(plan)
        state = initial_state(x)
        for seg in plan.segments:
            k = seg.experts[0]
            pipe = self.experts[k]
            state = pipe.runner.run_segment(plan, dataclasses.replace(seg, experts=(0, 0)),
                                            [pipe.unet_params], state, cond.conds[k], keys)
        return state.x


def load_pretrained_experts(path: str, *, dtype: str = "float32", variant: str | None = None,
                            mesh=None) -> PretrainedExperts:
    """Every expert's folder loaded onto one mesh, checked to share a latent space."""
    specs = read_pretrained_experts(path)
    made: dict = {}
    pipes = []
    for s in specs:  # a folder named twice is loaded once
        if not os.path.isdir(s.pretrained):
            raise hf.CheckpointError(f"{path}: expert {s.pretrained} is not a folder (a "
                                     "pipeline or U-Net folder; experts files do not nest)")
        if s.pretrained not in made:
            made[s.pretrained] = load_pretrained(s.pretrained, dtype=dtype, variant=variant,
                                                 mesh=mesh)
        pipes.append(made[s.pretrained])
    return PretrainedExperts.from_pipelines(path, pipes, specs)


def load_pipeline(path: str, *, dtype: str = "float32", variant: str | None = None,
                  mesh=None) -> PretrainedPipeline:
    """A pipeline or U-Net folder (load_pretrained), or an experts file of them."""
    if is_pretrained_experts(path):
        return load_pretrained_experts(path, dtype=dtype, variant=variant, mesh=mesh)
    return load_pretrained(path, dtype=dtype, variant=variant, mesh=mesh)


__all__ = ["ExpertConditioning", "ExpertsPromptEncoder", "PretrainedExpert",
           "PretrainedExperts", "is_pretrained_experts", "load_pipeline",
           "load_pretrained_experts", "prompt_encoder", "read_pretrained_experts"]
