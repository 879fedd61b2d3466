"""ScaleCrafter plans: which conv layers widen their perception field, by how much, and while
which noise levels; plus dispersion and noise-damped classifier-free guidance (NDCFG).

A `HighResPlan` maps U-Net conv paths to a perception-field factor pf and is active while
sigma >= `sigma_tau` (ScaleCrafter's step threshold tau, expressed in sigma so any sampler and
step count work; tau = the number of steps of the schedule with sigma_i >= sigma_tau).
Progressive mode shrinks the dilation over the active steps: d_i = max(ceil(pf (tau - i) / tau), 2)
(never above pf). Dispersed layers use the 5x5 dispersed kernel with pf / 2. NDCFG takes the
unconditional base term from a milder plan (`ndcfg`), the guidance difference from this one.

The plan turns into per-step static conv settings (`layer_settings(sigmas)`); the sampling plan
makes every distinct setting a segment, so each compiles once. Nothing touches conv_in,
conv_out, 1x1 convs, attention or the outermost encoder level: a plan naming one of those, or a
path the U-Net does not have, is an error (the official code silently skips unknown names). The
outermost decoder level may be re-dilated, as the official SD 2.1 2048^2 setting does
(up_blocks.3 by 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Mapping

import numpy as np

from ediffi_jax.highres.disperse import DISPERSED
from ediffi_jax.models.layers import ConvSetting

METHODS = ("none", "scalecrafter")
MIN_FACTOR = 1.25  # the least side factor the preset re-dilates for (below: direct sampling)


def conv_setting_for_factor(pf: float, dispersed: bool = False) -> ConvSetting:
    """The setting that widens a 3x3 conv's perception field by `pf` (ScaleCrafter):
    d = ceil(pf), s = d / pf. A dispersed 5x5 kernel already spans twice the field, so it
    takes half the factor."""
    if dispersed:
        pf = pf / 2
    if not pf >= 1.0:
        raise ValueError(f"perception-field factor {pf * (2 if dispersed else 1)} is below "
                         f"{'2 (dispersed layers halve it)' if dispersed else '1'}")
    d = math.ceil(pf - 1e-9)
    return ConvSetting(dilation=d, scale=1.0 if d == pf else d / pf,
                       kernel_map=DISPERSED if dispersed else None)


@dataclasses.dataclass(frozen=True)
class HighResPlan:
    dilation: Mapping[str, float]  # conv path -> perception-field factor (>= 1)
    sigma_tau: float = 1.0  # re-dilation while sigma >= sigma_tau
    progressive: bool = False
    disperse: tuple[str, ...] = ()  # paths (a subset of `dilation`) with dispersed kernels
    disperse_sigma: float | None = None  # dispersion while sigma >= this (default sigma_tau)
    ndcfg: Mapping[str, float] | None = None  # the milder plan of the unconditional base term
    ndcfg_sigma: float | None = None  # NDCFG while sigma >= this (default sigma_tau)

    def __post_init__(self):
        object.__setattr__(self, "dilation", dict(self.dilation))
        object.__setattr__(self, "disperse", tuple(self.disperse))
        if self.ndcfg is not None:
            object.__setattr__(self, "ndcfg", dict(self.ndcfg))
        for name, table in (("dilation", self.dilation), ("ndcfg", self.ndcfg or {})):
            for path, pf in table.items():
                if not pf >= 1:
                    raise ValueError(f"highres {name}: {path} has factor {pf}; factors are >= 1")
        extra = sorted(set(self.disperse) - set(self.dilation))
        if extra:
            raise ValueError(f"highres disperse names layers without a dilation factor: {extra}")
        for path in self.disperse:
            if self.dilation[path] < 2:
                raise ValueError(f"highres disperse: {path} has factor {self.dilation[path]}; a "
                                 "dispersed 5x5 kernel already doubles the field, so it needs >= 2")

    def validate(self, levels: Mapping[str, int]) -> None:
        """Against a U-Net's `conv3x3_levels`: every path exists and is an inner-level 3x3 conv."""
        for name, table in (("dilation", self.dilation), ("ndcfg", self.ndcfg or {})):
            for path in table:
                if path not in levels:
                    close = difflib.get_close_matches(path, sorted(levels), n=3)
                    raise ValueError(f"highres {name} names {path!r}, not a 3x3 conv of this U-Net"
                                     + (f"; did you mean {close}?" if close else ""))
                if levels[path] < 0 or (levels[path] == 0 and not path.startswith("up")):
                    raise ValueError(f"highres {name} names {path!r}: conv_in, conv_out and the "
                                     "outermost encoder level's convs are never re-dilated")

    def _steps(self, sigmas, threshold) -> int:
        return int(np.sum(np.asarray(sigmas[:-1]) >= threshold))

    def _settings(self, table, sigmas, i, sigma, with_dispersion: bool) -> tuple:
        tau = self._steps(sigmas, self.sigma_tau)
        if i >= tau:
            return ()
        disperse_tau = self._steps(sigmas, self.sigma_tau if self.disperse_sigma is None
                                   else self.disperse_sigma)
        out = []
        for path, pf in sorted(table.items()):
            if self.progressive:
                pf = min(pf, max(math.ceil(pf * (tau - i) / tau), 2))
            dispersed = with_dispersion and path in self.disperse and i < disperse_tau
            setting = conv_setting_for_factor(pf, dispersed=dispersed)
            if setting != ConvSetting():
                out.append((path, setting))
        return tuple(out)

    def layer_settings(self, sigmas):
        """(step i, sigma) -> the static conv settings of step i (for build_plan)."""
        return lambda i, sigma: self._settings(self.dilation, sigmas, i, sigma, True)

    def uncond_layer_settings(self, sigmas):
        """(step i, sigma) -> NDCFG's milder settings for the unconditional base term, or None
        where NDCFG is off (plain CFG)."""
        if self.ndcfg is None:
            return None
        ndcfg_tau = self._steps(sigmas, self.sigma_tau if self.ndcfg_sigma is None
                                else self.ndcfg_sigma)

        def fn(i, sigma):
            if i >= ndcfg_tau:
                return None
            return self._settings(self.ndcfg, sigmas, i, sigma, False)

        return fn


def preset(levels: Mapping[str, int], factor: float, *, sigma_tau: float | None = None,
           progressive: bool | None = None, disperse: bool | None = None,
           ndcfg: bool | None = None) -> HighResPlan | None:
    """The project's ScaleCrafter plan for a U-Net (its `conv3x3_levels`) at `factor` x its
    training side: every inner level's 3x3 convs re-dilated by `factor`, the encoder's outermost
    level never; from 4x side (16x area) also the outermost decoder level, by factor / 2, and the
    upsampler into it, by factor (the official SD 2.1 2048^2 pattern: up_blocks.3 by 2, the
    upsampler its block's value). Active while sigma >= sigma_tau (default 1.0). Dispersion (all
    re-dilated layers) is on from 4x side, progressive and NDCFG off unless asked: the choices
    measured best on the project's U-Net (BENCHMARKS.md), where the official SD configs also
    taper the inner factors towards the decoder and schedule them progressively. NDCFG's milder
    plan halves the factor at the outermost re-dilated level (at 4x side: the decoder's outermost
    level drops out, as in the official NDCFG sets). None below MIN_FACTOR (direct sampling)."""
    if factor < MIN_FACTOR:
        return None
    num_levels = max(levels.values()) + 1
    if num_levels < 2:
        raise ValueError("a U-Net with one level has no inner level to re-dilate")
    big = factor >= 4 - 1e-9
    dilation = {p: float(factor) for p, lvl in levels.items() if lvl >= 1}
    if big:
        for p, lvl in levels.items():
            if lvl == 0 and p.startswith("up"):
                dilation[p] = float(factor) if "upsample" in p else max(1.0, factor / 2)
    dispersed = tuple(sorted(p for p, pf in dilation.items() if pf >= 2)) if (
        big if disperse is None else disperse) else ()
    mild = None
    if ndcfg:
        outer = min(levels[p] for p in dilation)
        mild = {p: (max(1.0, pf / 2) if levels[p] == outer else pf) for p, pf in dilation.items()}
    return HighResPlan(
        dilation=dilation,
        sigma_tau=(1.0 if sigma_tau is None else sigma_tau),
        progressive=bool(progressive),
        disperse=dispersed if factor >= 2 else (),
        ndcfg=mild,
    )


@dataclasses.dataclass(frozen=True)
class HighResConfig:
    """The `highres` config section (sampling past the training resolution).

    method: "none" (direct sampling) or "scalecrafter". The preset for the output size is used
    unless `dilation` (conv path -> factor) gives a plan; `ndcfg_dilation` likewise gives NDCFG's
    milder plan. progressive / disperse / ndcfg: None takes the preset's default for the factor
    (a user plan: off).
    """

    method: str = "none"
    sigma_tau: float = 1.0
    progressive: bool | None = None
    disperse: bool | None = None
    disperse_sigma: float | None = None
    ndcfg: bool | None = None
    ndcfg_sigma: float | None = None
    dilation: Mapping[str, float] | None = None
    ndcfg_dilation: Mapping[str, float] | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"highres.method must be one of {METHODS}, got {self.method!r}")
        for name in ("sigma_tau", "disperse_sigma", "ndcfg_sigma"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float))
                                          and 0 <= value < math.inf):
                raise ValueError(f"highres.{name} must be a noise level sigma >= 0 (0: every "
                                 f"step), got {value!r}")

    def plan(self, levels: Mapping[str, int], factor: float) -> HighResPlan | None:
        """The plan for a U-Net at `factor` x its training side (None: direct sampling). The
        preset at a factor it cannot express (other than 1) is an error, not direct sampling."""
        if self.method == "none":
            return None
        if not self.dilation and factor != 1 and factor < MIN_FACTOR:
            raise ValueError(f"ScaleCrafter re-dilates for output sides of at least "
                             f"{MIN_FACTOR:g}x the native one, not {factor:.4g}x: sample this "
                             "size directly (highres.method='none') or give highres.dilation")
        if self.dilation:
            disperse = tuple(p for p, pf in self.dilation.items() if self.disperse and pf >= 2)
            mild = dict(self.ndcfg_dilation) if self.ndcfg_dilation else None
            plan = HighResPlan(dict(self.dilation), self.sigma_tau, bool(self.progressive),
                               disperse, self.disperse_sigma, mild, self.ndcfg_sigma)
        else:
            plan = preset(levels, factor, sigma_tau=self.sigma_tau, progressive=self.progressive,
                          disperse=self.disperse, ndcfg=self.ndcfg)
            if plan is not None:
                plan = dataclasses.replace(plan, disperse_sigma=self.disperse_sigma,
                                           ndcfg_sigma=self.ndcfg_sigma)
        if plan is not None:
            plan.validate(levels)
        return plan
