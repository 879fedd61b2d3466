"""The sampling plan: a list of segments, built by a pure function that tests can inspect.

A segment is a stretch of consecutive steps that share everything static (the compiled loop's
settings) and everything that selects data (which experts' parameters, the guidance scale). Each
segment runs as one jitted loop; segments with equal `SegmentSettings` share one compiled
function, because expert parameters and guidance scales are passed in as data.

Expert routing is exact per denoiser evaluation: a Heun step evaluates D at sigma_hat_i and at
sigma_{i+1}, and each evaluation uses the expert that owns that sigma. A step whose two evaluations
fall to different experts becomes its own one-step segment (same compiled loop, two param sets).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from ediffi_jax.diffusion.intervals import SINGLE, ExpertInterval, owner, validate_layout
from ediffi_jax.diffusion.schedules import karras_sigmas

SAMPLERS = ("euler", "heun", "dpmpp_2m")


@dataclasses.dataclass(frozen=True)
class SegmentSettings:
    """Static settings of a segment: each distinct value compiles once.

    sampler: the integrator; use_cfg: whether the unconditional branch runs; stochastic: whether
    steps add churn noise (EDM Algorithm 2); layers: per-layer static overrides of the denoiser
    (e.g. conv dilation), as a sorted tuple of (layer path, setting) pairs; uncond_layers:
    noise-damped CFG's milder overrides for the unconditional base term (None: plain CFG).
    """

    sampler: str = "heun"
    use_cfg: bool = True
    stochastic: bool = False
    layers: tuple = ()
    uncond_layers: tuple | None = None
    paint: Any = None  # paint-with-words settings (paint/bias.py PaintSettings) or None
    style_cfg: bool = False  # a separate guidance scale for the style (CLIP image) condition
    # The sampled image's pixels over the training size's: self-attention logits rescaled to
    # keep their entropy (ScaleCrafter's Attn-SF baseline; diffusers U-Nets), None: off.
    attention_area_ratio: float | None = None

    def summary(self) -> str:
        """One line: sampler, guidance, churn, and per-layer overrides counted by setting."""
        def count(layers):
            kinds: dict[str, int] = {}
            for _, setting in layers:
                kinds[str(setting)] = kinds.get(str(setting), 0) + 1
            return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"

        parts = [self.sampler, "cfg" if self.use_cfg else "no-cfg"]
        if self.stochastic:
            parts.append("churn")
        if self.layers:
            parts.append(f"layers [{count(self.layers)}]")
        if self.uncond_layers is not None:
            parts.append(f"ndcfg base [{count(self.uncond_layers)}]")
        if self.paint is not None:
            parts.append(f"paint-with-words ({self.paint.weight})")
        if self.style_cfg:
            parts.append("style cfg")
        if self.attention_area_ratio is not None:
            parts.append(f"attention entropy x{self.attention_area_ratio:g}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int  # first step index
    stop: int  # one past the last step index
    experts: tuple[int, int]  # expert evaluating the first / the second denoiser call of a step
    guidance_scale: float
    settings: SegmentSettings
    style_scale: float = 0.0  # with settings.style_cfg: the style condition's guidance scale

    @property
    def num_steps(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class Plan:
    sigmas: np.ndarray  # [N + 1], decreasing, last entry 0
    gammas: np.ndarray  # [N], churn factor per step (sigma_hat = sigma * (1 + gamma))
    s_noise: float
    segments: tuple[Segment, ...]

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def distinct_settings(self) -> set[SegmentSettings]:
        return {s.settings for s in self.segments}

    def describe(self) -> str:
        lines = []
        for s in self.segments:
            lines.append(
                f"steps [{s.start:3d}, {s.stop:3d})  sigma {self.sigmas[s.start]:9.4g} -> "
                f"{self.sigmas[s.stop]:9.4g}  experts {s.experts}  w={s.guidance_scale:g}  "
                + (f"w_style={s.style_scale:g}  " if s.settings.style_cfg else "")
                + s.settings.summary()
            )
        return "\n".join(lines)


def churn_gammas(
    sigmas: np.ndarray, s_churn: float, s_tmin: float = 0.0, s_tmax: float = math.inf
) -> np.ndarray:
    """EDM Algorithm 2: gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax."""
    n = len(sigmas) - 1
    base = min(s_churn / n, math.sqrt(2.0) - 1.0) if s_churn > 0 else 0.0
    s = sigmas[:-1]
    return np.where((s >= s_tmin) & (s <= s_tmax), base, 0.0)


def evaluation_sigmas(sampler: str, sigma: float, sigma_next: float, gamma: float):
    """The sigmas at which one step evaluates the denoiser."""
    sigma_hat = sigma * (1.0 + gamma)
    if sampler == "heun" and sigma_next > 0:
        return (sigma_hat, sigma_next)
    return (sigma_hat,)


def build_plan(
    sigmas: np.ndarray,
    intervals: Sequence[ExpertInterval] = SINGLE,
    *,
    sampler: str = "heun",
    guidance_scale: float | Sequence[float] = 1.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    layer_settings: Callable[[int, float], tuple] | None = None,
    uncond_layer_settings: Callable[[int, float], tuple | None] | None = None,
    paint: Any = None,
    style_guidance_scale: float | None = None,
    attention_area_ratio: float | None = None,
) -> Plan:
    """Turn a sigma schedule and an expert layout into segments.

    guidance_scale: one value, or one per expert (like Wan's per-expert scales); a step uses the
      scale of the expert evaluating its first call. Scale 1 skips the unconditional branch.
    layer_settings: (step index, sigma) -> static per-layer settings (ScaleCrafter's dilation
      schedule plugs in here); steps with different settings land in different segments.
    uncond_layer_settings: (step index, sigma) -> the settings of noise-damped CFG's
      unconditional base term, or None for plain CFG at that step.
    paint: paint-with-words settings for every step (the masks themselves are conditioning data).
    style_guidance_scale: a separate scale for the style condition (the CLIP image embedding):
      D = D(none) + w (D(text) - D(none)) + w_style (D(text, style) - D(text)), three branches
      in one batched call; None guides text and style together with w.
    attention_area_ratio: output pixels / training pixels for every step's self-attention
      entropy scaling (SegmentSettings.attention_area_ratio), None: off.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or np.any(np.diff(sigmas) >= 0):
        raise ValueError("sigmas must be a strictly decreasing 1-D schedule ending in 0")
    intervals = tuple(intervals)
    validate_layout(intervals)
    scales = (
        [float(guidance_scale)] * len(intervals)
        if np.isscalar(guidance_scale)
        else [float(s) for s in guidance_scale]
    )
    if len(scales) != len(intervals):
        raise ValueError(
            f"guidance_scale has {len(scales)} entries but there are {len(intervals)} experts"
        )
    if attention_area_ratio is not None and not attention_area_ratio > 0:
        raise ValueError(f"attention_area_ratio must be > 0, got {attention_area_ratio}")
    if sampler == "dpmpp_2m" and s_churn > 0:
        raise ValueError("s_churn applies to euler/heun; dpmpp_2m is deterministic here")
    gammas = churn_gammas(sigmas, s_churn, s_tmin, s_tmax)

    steps = []
    for i in range(len(sigmas) - 1):
        evals = evaluation_sigmas(sampler, sigmas[i], sigmas[i + 1], gammas[i])
        who = [owner(intervals, s) for s in evals]
        experts = (who[0], who[-1])
        scale = scales[experts[0]]
        settings = SegmentSettings(
            sampler=sampler,
            use_cfg=scale != 1.0,
            stochastic=bool(gammas[i] > 0),
            layers=tuple(layer_settings(i, float(sigmas[i]))) if layer_settings else (),
            paint=paint,
            style_cfg=style_guidance_scale is not None and scale != 1.0,
            attention_area_ratio=attention_area_ratio,
        )
        mild = uncond_layer_settings(i, float(sigmas[i])) if uncond_layer_settings else None
        if mild is not None and settings.style_cfg:
            raise ValueError("noise-damped CFG and a separate style guidance scale do not combine")
        if mild is not None and settings.use_cfg:
            settings = dataclasses.replace(settings, uncond_layers=tuple(mild))
        steps.append((experts, scale, settings))

    segments = []
    start = 0
    for i in range(1, len(steps) + 1):
        if i == len(steps) or steps[i] != steps[start]:
            experts, scale, settings = steps[start]
            segments.append(Segment(start, i, experts, scale, settings,
                                    float(style_guidance_scale or 0.0)))
            start = i
    return Plan(sigmas=sigmas, gammas=gammas, s_noise=float(s_noise), segments=tuple(segments))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The `sampling` config section: a Karras schedule, a sampler and guidance."""

    sampler: str = "heun"
    num_steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    guidance_scale: float | tuple[float, ...] = 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 1e9
    s_noise: float = 1.0
    style_guidance_scale: float | None = None  # None: the style image is guided with the text
    # A super-resolution stage: the noise-augmentation level of its low-res input (small: the
    # previous stage's output is clean; raise it to hide that stage's artefacts).
    noise_aug_sigma: float = 0.002

    def __post_init__(self):
        if self.noise_aug_sigma <= 0:
            raise ValueError(f"noise_aug_sigma must be > 0, got {self.noise_aug_sigma}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if isinstance(self.guidance_scale, list):
            object.__setattr__(self, "guidance_scale", tuple(self.guidance_scale))

    def sigmas(self) -> np.ndarray:
        return karras_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho)

    def plan(self, intervals: Sequence[ExpertInterval] = SINGLE, layer_settings=None,
             uncond_layer_settings=None, paint=None) -> Plan:
        return build_plan(
            self.sigmas(), intervals, sampler=self.sampler, guidance_scale=self.guidance_scale,
            s_churn=self.s_churn, s_tmin=self.s_tmin, s_tmax=self.s_tmax, s_noise=self.s_noise,
            layer_settings=layer_settings, uncond_layer_settings=uncond_layer_settings,
            paint=paint, style_guidance_scale=self.style_guidance_scale,
        )
