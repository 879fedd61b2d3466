"""The cascade as one text-to-image pipeline: a base stage, then super-resolution stages, each
an ensemble of experts with its own sampling settings.

A cascade file lists the stages in order; each names an ensemble (ensemble.json, a run's
workdir or an export), whose config gives the stage's name:

    {"stages": [
        {"ensemble": "base/ensemble.json"},
        {"ensemble": "sr32", "sampling": {"num_steps": 12, "noise_aug_sigma": 0.002}},
        {"ensemble": "sr64", "paint": false, "style": true}]}

`paint` / `style` (default true) carry paint-with-words masks and the style image to a stage.
Conditioning is encoded once per distinct encoder setup and shared by the stages; each stage's
plan and paint-with-words masks are built once per sampler. Stage k draws its noise from
rng.sampling_key(seed, k), so the base stage's images equal a base-only run's (stage 0).
Each SR stage receives the previous stage's images, clipped to [-1, 1], upsampled (bicubic) to
its size and noise-augmented to its `sampling.noise_aug_sigma`.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.config import ConfigError, read_json
from ediffi_jax.diffusion import lowres
from ediffi_jax.diffusion.plan import SamplingConfig
from ediffi_jax.diffusion.sampling import PlanRunner, example_keys
from ediffi_jax.encoders.conditioner import make_conditioner
from ediffi_jax.highres.plans import HighResConfig
from ediffi_jax.models.experts import ExpertEnsemble
from ediffi_jax.models.unet import UNet
from ediffi_jax.paint.bias import PaintSettings
from ediffi_jax.parallel.mesh import batch_sharding, replicated
from ediffi_jax.pipeline.denoise import unet_denoise_fn
from ediffi_jax.pipeline.generate import (Paint, denoise_batch, sample_settings, sampling_plan,
                                         to_uint8)
from ediffi_jax.rng import sampling_key
from ediffi_jax.runs.data import training_vocabulary
from ediffi_jax.runs.spec import RunSpec, image_resolution, parse_run
from ediffi_jax.runs.store import expert_workdirs, load_ensemble, run_config

STAGE_KEYS = ("ensemble", "sampling", "paint", "style")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: RunSpec
    ensemble: ExpertEnsemble
    sampling: SamplingConfig
    highres: HighResConfig
    resolution: int  # the side it makes (an SR stage: its input's side x lowres_scale)
    paint: bool = True
    style: bool = True

    @property
    def lowres_scale(self) -> int:
        return self.run.stage.model.lowres_scale


def load_stage(path: str, overrides: Sequence[str] = (), paint: bool = True,
               style: bool = True) -> Stage:
    """One stage from an ensemble path, with `section.key=value` sampling/highres overrides."""
    run, ensemble = load_ensemble(path)
    sampling, highres = sample_settings(run, overrides)
    return Stage(run.stage.name, run, ensemble, sampling, highres, image_resolution(run),
                 paint, style)


def check_chain(stages: Sequence[Stage], from_images: bool = False) -> None:
    """The first stage makes images from text alone (unless `from_images`: it is fed images);
    each later one upsamples its predecessor's output by its lowres_scale."""
    if not stages:
        raise ConfigError("a cascade needs at least one stage")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names repeat in {names}: give each run its own config name")
    if stages[0].lowres_scale and not from_images:
        raise ConfigError(f"the first stage {stages[0].name!r} is a super-resolution model "
                          f"(lowres_scale {stages[0].lowres_scale}): it needs a stage before it")
    for prev, stage in zip(stages, stages[1:]):
        if not stage.lowres_scale:
            raise ConfigError(f"stage {stage.name!r} is a base model (no lowres_scale); only "
                              "the first stage may be one")
        wants = stage.resolution // stage.lowres_scale
        if prev.resolution != wants:
            raise ConfigError(
                f"stages do not chain: {stage.name!r} upsamples {wants}x{wants} to "
                f"{stage.resolution}x{stage.resolution} but {prev.name!r} makes "
                f"{prev.resolution}x{prev.resolution}")


def split_stage_overrides(overrides: Sequence[str], names: Sequence[str]) -> dict[str, list[str]]:
    """`stage.section.key=value` goes to that stage; `section.key=value` to every stage."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for item in overrides:
        item = item.removeprefix("--config.")
        head, _, rest = item.partition(".")
        if head in out:
            out[head].append(rest)
        else:
            for n in names:
                out[n].append(item)
    return out


def read_cascade(path: str, names: Sequence[str] | None = None,
                 overrides: Sequence[str] = ()) -> tuple[Stage, ...]:
    """The stages of a cascade file (all, or those `names` in file order), checked to chain."""
    spec = read_json(path, "the cascade file")
    entries = spec.get("stages") if isinstance(spec, dict) else None
    if not entries or not all(isinstance(e, dict) and "ensemble" in e for e in entries):
        raise ConfigError(f'{path}: expected {{"stages": [{{"ensemble": PATH, ...}}, ...]}}')
    base = os.path.dirname(os.path.abspath(path))
    for entry in entries:
        unknown = set(entry) - set(STAGE_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown stage keys {sorted(unknown)} (allowed: "
                              f"{', '.join(STAGE_KEYS)})")
    paths = [os.path.join(base, e["ensemble"]) for e in entries]
    # Names come from the configs; only the chosen stages are loaded (an unchosen one may be
    # still untrained).
    known, unreadable = [], []
    for stage_path in paths:
        try:
            known.append(parse_run(run_config(expert_workdirs(stage_path)[0])).stage.name)
        except (ConfigError, OSError) as e:
            known.append(None)
            unreadable.append(e)
    missing = [n for n in names or () if n not in known]
    if unreadable and (missing or not names):
        raise unreadable[0]
    if missing:
        raise ConfigError(f"--stages {missing} not in {path} (its stages: {known})")
    by_name = split_stage_overrides(overrides, known)
    stages = []
    for name, entry, stage_path in zip(known, entries, paths):
        if names and name not in names:
            continue
        file_overrides = [f"sampling.{k}={v!r}" for k, v in entry.get("sampling", {}).items()]
        stages.append(load_stage(stage_path, file_overrides + by_name[name],
                                 bool(entry.get("paint", True)), bool(entry.get("style", True))))
    check_chain(stages)
    return tuple(stages)


class CascadeSampler:
    """Samples prompts through every stage, the batch sharded over all devices' data axis.
    `from_images`: the first stage is an SR stage fed given images (`run_stage`'s previous).
    `progress(step, num_steps)` hears of every sampler step of every stage (PlanRunner's)."""

    def __init__(self, stages: Sequence[Stage], mesh=None, from_images: bool = False,
                 progress=None):
        check_chain(stages, from_images)
        if mesh is not None:  # params replicated beside the sharded batch
            stages = [dataclasses.replace(s, ensemble=ExpertEnsemble(
                s.ensemble.intervals, jax.device_put(s.ensemble.params, replicated(mesh))))
                for s in stages]
        self.stages = tuple(stages)
        self.mesh = mesh
        self.runners = [PlanRunner(unet_denoise_fn(UNet(s.run.stage.model)), progress, mesh)
                        for s in stages]
        self._conditioners: dict = {}
        self._plans: dict = {}
        self._paint_rows: dict = {}

    def set_progress(self, progress) -> None:
        """`progress(step, num_steps)` hears of every sampler step of every stage from now on."""
        for runner in self.runners:
            runner.progress = progress

    def with_settings(self, k: int, sampling: SamplingConfig | None = None,
                      highres: HighResConfig | None = None) -> "CascadeSampler":
        """This sampler with stage k's sampling / highres settings replaced, sharing its
        compiled loops and encoders (a server answering requests of other step counts or
        samplers compiles each distinct segment once, not once per request)."""
        other = copy.copy(self)
        stages = list(self.stages)
        stages[k] = dataclasses.replace(stages[k], sampling=sampling or stages[k].sampling,
                                        highres=highres or stages[k].highres)
        other.stages, other._plans = tuple(stages), {}
        return other

    def conditioner(self, stage: Stage):
        """One conditioner (and one encoding per batch) per distinct encoders + token layout
        (+ training vocabulary, which only the word encoder's warnings read)."""
        m, vocabulary = stage.run.stage.model, training_vocabulary(stage.run)
        key = (stage.run.encoders, m.t5_length, m.t5_dim, m.clip_length, m.clip_dim,
               m.clip_pooled_dim, m.clip_image_dim, vocabulary)
        if key not in self._conditioners:
            self._conditioners[key] = (key, make_conditioner(stage.run.encoders, m,
                                                             vocabulary=vocabulary))
        return self._conditioners[key]

    def plan(self, k: int, resolution: int | None = None, paint: PaintSettings | None = None,
             what: str = "resolution"):
        """Stage k's sampling plan at `resolution` (default its own; the last stage may sample
        past it with its highres settings), built once per sampler and reused by every batch.
        A resolution the stage cannot make is a ConfigError naming it (as `what`)."""
        stage = self.stages[k]
        res = resolution or stage.resolution
        key = (k, res, paint if stage.paint else None)
        if key not in self._plans:
            try:
                self._plans[key] = sampling_plan(stage.run.stage.model, stage.ensemble,
                                                 stage.sampling, res, stage.highres, key[2],
                                                 stage.resolution)
            except ValueError as e:
                raise ConfigError(f"{what} {res} ({stage.name!r} makes "
                                  f"{stage.resolution}): {e}" if res != stage.resolution
                                  else str(e)) from None
        return self._plans[key]

    def paint_conditioning(self, k: int, paint: Paint, prompts: Sequence[str]) -> np.ndarray:
        """Stage k's paint-with-words token masks for `prompts` [N, Hm, Wm, L], each prompt's
        row built once per sampler (a phrase missing from a prompt is an error here, before
        any sampling)."""
        stage = self.stages[k]
        ckey, conditioner = self.conditioner(stage)
        missing = [q for q in dict.fromkeys(prompts) if (ckey, id(paint), q) not in self._paint_rows]
        if missing:
            rows = paint.conditioning(conditioner, stage.run.stage.model, missing)
            for q, row in zip(missing, rows):
                # The paint object is kept with its rows, so its id is not reused meanwhile.
                self._paint_rows[(ckey, id(paint), q)] = (paint, row)
        return np.stack([self._paint_rows[(ckey, id(paint), q)][1] for q in prompts])

    @property
    def batch_multiple(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def _sharding(self, ndim: int = 1):
        return None if self.mesh is None else batch_sharding(self.mesh, ndim)

    def _place(self, tree):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.tree.map(lambda x: jax.device_put(x, self._sharding(np.ndim(x))), tree)

    def __call__(self, prompts: Sequence[str], **kw) -> list[np.ndarray]:
        """uint8 images [N, H, W, 3] of every stage, in order (`each_stage`'s arguments)."""
        return list(self.each_stage(prompts, **kw))

    def sample(self, prompts: Sequence[str], **kw) -> np.ndarray:
        """The last stage's uint8 images [N, H, W, 3] (`each_stage`'s arguments)."""
        return self(prompts, **kw)[-1]

    def each_stage(self, prompts: Sequence[str], *, seed: int = 0, first_index: int = 0,
                   paint=None, style_images=None, resolution: int | None = None):
        """Yields each stage's uint8 images [N, H, W, 3] as it finishes (a later stage's failure
        leaves the earlier ones usable). `resolution` sets the last stage's output side
        (ScaleCrafter past its native size, by its highres settings)."""
        if isinstance(paint, dict):
            paint = Paint.from_masks(paint)
        n = len(prompts)
        pad = -n % self.batch_multiple  # repeat the last prompt to fill every device
        prompts = list(prompts) + [prompts[-1]] * pad
        if style_images is not None:
            style_images = list(style_images) + [style_images[-1]] * pad
        encoded: dict = {}
        previous = None
        for k in range(len(self.stages)):
            last = k == len(self.stages) - 1
            previous = self.run_stage(k, prompts, previous, seed=seed, first_index=first_index,
                                      paint=paint, style_images=style_images,
                                      resolution=resolution if last else None, encoded=encoded)
            yield to_uint8(gather(previous))[:n]

    def run_stage(self, k: int, prompts: Sequence[str], previous=None, *, seed: int = 0,
                  first_index: int = 0, paint=None, style_images=None,
                  resolution: int | None = None, encoded: dict | None = None) -> jax.Array:
        """Stage k's images (float, clipped to [-1, 1]) for `prompts`, from the previous
        stage's images `previous` ([N, h, w, 3] in [-1, 1]) for an SR stage. `encoded` caches
        the conditioning between stages of one batch."""
        stage, runner = self.stages[k], self.runners[k]
        key, conditioner = self.conditioner(stage)
        encoded = {} if encoded is None else encoded
        if key not in encoded:
            conditioner.check_words(prompts)
            encoded[key] = conditioner.encode(list(prompts), style_images)
        cond = encoded[key]
        if not stage.style:
            cond = cond.text_only()
        painted = paint is not None and stage.paint
        if painted:
            cond = cond.replace(paint=self.paint_conditioning(k, paint, prompts))
        res = resolution or stage.resolution
        plan = self.plan(k, res, paint.settings if painted else None)
        indices = np.arange(first_index, first_index + len(prompts))
        seed_key = sampling_key(seed, k)
        cond = self._place(cond)
        if stage.lowres_scale:
            if previous is None:
                raise ValueError(f"stage {stage.name!r} upsamples: give the previous images")
            cond = self._lowres(cond, self._place(jnp.asarray(previous)), res,
                                stage.sampling.noise_aug_sigma,
                                example_keys(seed_key, self._place(indices)))
        x = denoise_batch(stage.run, stage.ensemble, cond, indices, seed=seed_key,
                          resolution=res, native_resolution=stage.resolution, runner=runner,
                          batch_sharding=self._sharding(), plan=plan)
        return jnp.clip(x, -1.0, 1.0)

    @staticmethod
    def _lowres(cond, previous, size: int, sigma: float, keys):
        up = lowres.upsample(previous, size)
        sigmas = jnp.full((up.shape[0],), sigma, jnp.float32)
        return cond.replace(lowres=jax.vmap(lowres.augment)(keys, up, sigmas), lowres_sigma=sigmas)


def gather(x: jax.Array) -> np.ndarray:
    """The whole (batch-sharded) array on this host, multi-host included."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
