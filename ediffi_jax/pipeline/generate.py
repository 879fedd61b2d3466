"""Load trained experts and generate images from prompts.

An ensemble is described by `ensemble.json`: {"experts": ["<workdir>", ...]} (paths relative to
the file). Each workdir holds one training run whose saved config gives its architecture and its
noise interval (train.sigma_quantiles); the intervals must tile (0, inf). A single workdir
trained on the whole interval is an ensemble of one.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ediffi_jax.config import ConfigError, apply_override, section
from ediffi_jax.diffusion.plan import Plan, SamplingConfig
from ediffi_jax.diffusion.sampling import PlanRunner
from ediffi_jax.encoders.conditioner import make_conditioner
from ediffi_jax.highres.plans import HighResConfig
from ediffi_jax.models.experts import ExpertEnsemble
from ediffi_jax.models.unet import UNet, attention_block_names, conv3x3_levels
from ediffi_jax.paint.bias import PaintSettings
from ediffi_jax.paint.masks import PhraseMask, paint_conditioning
from ediffi_jax.pipeline.denoise import unet_denoise_fn
from ediffi_jax.runs.data import training_vocabulary
from ediffi_jax.runs.spec import RunSpec


def sampling_conditioner(run: RunSpec, mesh=None):
    """The run's conditioner, told the training vocabulary (its `check_words` warns)."""
    return make_conditioner(run.encoders, run.stage.model, mesh, training_vocabulary(run))


def to_uint8(images) -> np.ndarray:
    return np.asarray(jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255), np.uint8)


def generate(run: RunSpec, ensemble: ExpertEnsemble, prompts: Sequence[str], *, seed: int = 0,
             sampling: SamplingConfig | None = None, resolution: int | None = None,
             first_index: int = 0, runner: PlanRunner | None = None,
             conditioner=None, style_images=None,
             highres: HighResConfig | None = None, paint: Paint | None = None) -> np.ndarray:
    """One image per prompt (uint8 [N, H, W, 3]); example i of the run is prompt i. Prompts
    are encoded by `conditioner` (default: the run's encoders); `style_images` (one per
    prompt) give the CLIP image embedding; `highres` applies at a `resolution` past the
    training one (ScaleCrafter); `paint` gives phrase masks (paint-with-words)."""
    model = run.stage.model
    conditioner = conditioner or sampling_conditioner(run)
    conditioner.check_words(prompts)
    cond = conditioner.encode(list(prompts), style_images)
    if paint is not None:
        cond = cond.replace(paint=paint.conditioning(conditioner, model, prompts))
    images = denoise_batch(run, ensemble, jax.tree.map(jnp.asarray, cond),
                           np.arange(first_index, first_index + len(prompts)), seed=seed,
                           sampling=sampling, resolution=resolution, runner=runner,
                           highres=highres, paint=paint.settings if paint is not None else None)
    return to_uint8(images)


def denoise_batch(run: RunSpec, ensemble: ExpertEnsemble, cond, example_indices, *, seed=0,
                  sampling: SamplingConfig | None = None, resolution: int | None = None,
                  native_resolution: int | None = None, runner: PlanRunner | None = None,
                  highres: HighResConfig | None = None, paint: PaintSettings | None = None,
                  batch_sharding=None, plan: Plan | None = None) -> jax.Array:
    """Sample the examples `example_indices` of run `seed` (an int or a stage's key,
    rng.sampling_key) from encoded conditioning: float images in about [-1, 1],
    [N, res, res, C]. `native_resolution` is the size the stage was made for (default the
    model's): ScaleCrafter applies past it. `plan`: one already built for these settings (a
    caller sampling many batches builds it once); the runner derives every guidance branch."""
    model = run.stage.model
    res = resolution or native_resolution or model.resolution
    runner = runner or PlanRunner(unet_denoise_fn(UNet(model)))
    if plan is None:
        plan = sampling_plan(model, ensemble, sampling or run.stage.sampling, res, highres,
                             paint, native_resolution)
    return runner.sample(plan, ensemble.params, (res, res, model.out_channels), seed=seed,
                         example_indices=example_indices, cond=cond,
                         batch_sharding=batch_sharding)


@dataclasses.dataclass(frozen=True)
class Paint:
    """Paint-with-words for a sampling call: phrase masks at the output size, the global
    strength w' and the static settings (weight function, layers)."""

    masks: tuple
    scale: float = 1.0
    settings: PaintSettings = PaintSettings()

    @classmethod
    def from_masks(cls, masks: dict, scale: float = 1.0,
                   settings: PaintSettings = PaintSettings()) -> "Paint":
        """From {phrase: mask [H, W] in [0, 1]} (or {phrase: (mask, strength)}) at the output
        size; every prompt sampled with it must contain every phrase."""
        phrases = []
        for phrase, mask in masks.items():
            mask, strength = mask if isinstance(mask, tuple) else (mask, 1.0)
            phrases.append(PhraseMask(phrase, np.asarray(mask, np.float32), float(strength)))
        return cls(tuple(phrases), scale, settings)

    def check(self, model) -> None:
        known = attention_block_names(model)
        unknown = [name for name in self.settings.layers if name not in known]
        if unknown:
            raise ConfigError(f"paint layers {unknown} are not attention blocks of this U-Net "
                              f"(it has {list(known)})")

    def conditioning(self, conditioner, model, prompts) -> np.ndarray:
        self.check(model)
        return paint_conditioning(conditioner, model, prompts, self.masks, self.scale)

    def masks_at(self, size: int) -> list:
        """The masks resized to size x size (bilinear), for overlays on a stage's images."""
        from PIL import Image

        return [m if m.mask.shape == (size, size) else dataclasses.replace(
            m, mask=np.asarray(Image.fromarray(m.mask.astype(np.float32)).resize(
                (size, size), Image.BILINEAR))) for m in self.masks]


def sampling_plan(model, ensemble: ExpertEnsemble, sampling: SamplingConfig, resolution: int,
                  highres: HighResConfig | None = None, paint: PaintSettings | None = None,
                  native_resolution: int | None = None):
    """The segment plan: experts by noise interval, plus the ScaleCrafter schedule when
    `highres` asks for it at this resolution (against the stage's native one, by default the
    model's), and paint-with-words when `paint` is set."""
    native = native_resolution or model.resolution
    plan = highres.plan(conv3x3_levels(model), resolution / native) if highres else None
    if plan is None:
        return sampling.plan(ensemble.intervals, paint=paint)
    sigmas = sampling.sigmas()
    return sampling.plan(ensemble.intervals, plan.layer_settings(sigmas),
                         plan.uncond_layer_settings(sigmas), paint=paint)


def sampling_with_overrides(run: RunSpec, overrides: Sequence[str]) -> SamplingConfig:
    """The run's sampling section with `sampling.key=value` overrides applied."""
    return sample_settings(run, overrides)[0]


def sample_settings(run: RunSpec, overrides: Sequence[str]) -> tuple[SamplingConfig, HighResConfig]:
    """The run's `sampling` and `highres` sections with `section.key=value` overrides."""
    base = ml_collections.ConfigDict({"sampling": dataclasses.asdict(run.stage.sampling),
                                      "highres": dataclasses.asdict(HighResConfig())})
    for item in overrides:
        apply_override(base, item)
    return (section(SamplingConfig, base.sampling, "sampling"),
            section(HighResConfig, base.highres, "highres"))


class StepProgress:
    """Sampler steps on stderr, for PlanRunner(progress=...) over `total` steps (all batches
    and stages): on a terminal one line rewritten in place, elsewhere (a log) a line at each
    quarter, so a log gets four lines, not one per step."""

    def __init__(self, total: int, what: str = "sampling", stream=None):
        self.total, self.what, self.done = max(1, total), what, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start, self.shown = time.perf_counter(), -float("inf")
        self.pending = False  # a terminal line without its newline

    def __call__(self, step: int, num_steps: int) -> None:
        self.done += 1
        now = time.perf_counter()
        rate = self.done / max(now - self.start, 1e-9)
        line = (f"{self.what}: step {self.done}/{self.total}, {rate:.2g} steps/s, "
                f"ETA {max(self.total - self.done, 0) / rate:.0f} s")
        if self.tty:
            if now - self.shown >= 0.2 or self.done >= self.total:
                self.stream.write("\r" + line + "\x1b[K")
                self.shown, self.pending = now, True
        elif 4 * self.done // self.total > 4 * (self.done - 1) // self.total:
            self.stream.write(line + "\n")
        self.stream.flush()
        if self.done >= self.total:
            self.close()

    def close(self) -> None:
        if self.pending:
            self.stream.write("\n")
            self.stream.flush()
            self.pending = False


def grid(images: np.ndarray, columns: int, pad: int = 2) -> np.ndarray:
    n, h, w, c = images.shape
    rows = -(-n // columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return out


_OVERLAY_COLOURS = np.array([(255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0),
                             (220, 64, 255), (0, 220, 220)], np.float32)


def mask_overlay(image: np.ndarray, masks) -> np.ndarray:
    """The image beside itself with each phrase's mask tinted over it (paint-with-words)."""
    tinted = image.astype(np.float32)
    for i, m in enumerate(masks):
        alpha = 0.5 * np.clip(m.mask, 0, 1)[..., None]
        tinted = tinted * (1 - alpha) + _OVERLAY_COLOURS[i % len(_OVERLAY_COLOURS)] * alpha
    gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
    return np.concatenate([image, gap, tinted.astype(np.uint8)], axis=1)
