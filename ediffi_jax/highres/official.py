"""The official ScaleCrafter settings (YingqingHe/ScaleCrafter: configs/*.yaml and the
assets/*_settings/*.txt files they name) as a HighResPlan for a diffusers U-Net, so its
published configs drive this project's samplers as they are.

    config = read_config("ScaleCrafter/configs/sd2.1_2048x2048.yaml")
    plan = config.plan(diffusers_unet.conv3x3_levels(unet_config), schedule, scheduler_config)

The official code gates every setting on the step index of its own run, a `num_inference_steps`
DDIM run (text2image.py: re-dilation for steps i < dilate_tau, NDCFG's second pass for
i < ndcfg_tau, dispersed kernels for i < inflate_tau). Here each tau becomes a sigma of the
checkpoint's schedule: the sigma of the last active DDIM timestep (DDIMScheduler as
from_pretrained builds it from the checkpoint's scheduler_config: its timestep_spacing,
"leading" where unset, and steps_offset; SD's 50 steps are t = 981, 961, ..., 1, so dilate_tau
30 is t >= 401). A step of any sampler and step count is then active iff its sigma >= that
sigma, which for the official 50-step spacing is exactly i < tau.

Unlike the official code, a settings name that is not a 3x3 conv of the U-Net is an error
naming the closest one; `skip_missing` drops such names with a warning instead (the official
SDXL files name down_blocks.3, down_blocks.2.downsamplers.0 and up_blocks.2.upsamplers.0, which
SDXL does not have, and the official code skips them silently). Combinations a HighResPlan
cannot reproduce (NDCFG longer than, or progressive with a different tau from, re-dilation;
dispersion together with NDCFG, which the official code also disperses) are errors too.

official_presets.py holds every official config's settings built in (no copy of the official
repository needed), with their choice by U-Net family and output size.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
from typing import Any, Mapping

import numpy as np
import yaml

from ediffi_jax.diffusion.discrete import DiscreteSchedule
from ediffi_jax.highres.plans import HighResPlan

log = logging.getLogger(__name__)

DEFAULT_STEPS = 50  # the official runs' num_inference_steps
DISPERSE_TRANSFORM = "R20to1_new.mat"  # the only R the configs name; disperse.DISPERSED solves it
_NAME = re.compile(r"[A-Za-z_]\w*(\.\w+)*$")
# Official config fields: read, or accepted and not needed here (batching, image sizes).
_PATHS = ("dilate_settings", "ndcfg_dilate_settings", "disperse_settings", "disperse_transform")
_INTS = ("dilate_tau", "ndcfg_tau", "inflate_tau", "num_inference_steps", "latent_height",
         "latent_width")
_NOT_NEEDED = ("inference_batch_size", "num_iters_per_prompt", "pixel_height", "pixel_width",
               "sdedit_scale")
# Older names some official configs and scripts use (sdxl_vanilla.yaml, predict.py).
_ALIASES = {"inflate_settings": "disperse_settings", "inflate_transform": "disperse_transform"}
FIELDS = _PATHS + _INTS + ("progressive", "sdedit_tau") + _NOT_NEEDED + tuple(_ALIASES)


def _lines(path: str):
    """(line number, stripped line) of a text file's non-blank lines."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 text file ({e})") from e
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield n, line.strip()


def _name(path: str, n: int, name: str, seen: set) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{path}:{n}: {name!r} is not a module name like "
                         "'down_blocks.1.resnets.0.conv1'")
    if name in seen:
        raise ValueError(f"{path}:{n}: {name!r} is given twice")
    seen.add(name)
    return name


def read_dilate_settings(path: str) -> dict[str, float]:
    """A dilation settings file: `module name:factor` per line (diffusers module names, the
    perception-field factor >= 1, as assets/dilate_settings/*.txt); blank lines are skipped.
    Anything else is a ValueError naming the file and line."""
    out: dict[str, float] = {}
    for n, line in _lines(path):
        name, sep, value = line.partition(":")
        if not sep or ":" in value:
            raise ValueError(f"{path}:{n}: expected 'module name:factor', got {line!r}")
        try:
            factor = float(value)
        except ValueError:
            factor = math.nan
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"{path}:{n}: the factor of {name.strip()!r} must be a number >= 1, "
                             f"got {value.strip()!r}")
        out[_name(path, n, name.strip(), set(out))] = factor
    return out


def read_disperse_settings(path: str) -> tuple[str, ...]:
    """A dispersion settings file: one module name per line (assets/disperse_settings/*.txt);
    blank lines are skipped, anything else is a ValueError naming the file and line."""
    seen: set = set()
    return tuple(_name(path, n, line, seen) for n, line in _lines(path))


@dataclasses.dataclass(frozen=True)
class OfficialConfig:
    """An official ScaleCrafter run's settings: the tables read from its settings files, the
    taus as step counts of its `num_inference_steps`-step DDIM run (0: never), and the latent
    size it samples at. `files` names the table's files for messages."""

    dilation: Mapping[str, float] = dataclasses.field(default_factory=dict)
    ndcfg_dilation: Mapping[str, float] | None = None  # None: the plain U-Net (official: {})
    disperse: tuple[str, ...] = ()
    dilate_tau: int = 0
    ndcfg_tau: int = 0
    inflate_tau: int = 0
    progressive: bool = False
    num_inference_steps: int = DEFAULT_STEPS
    latent_size: tuple[int, int] | None = None  # (latent_height, latent_width)
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "dilation", dict(self.dilation))
        if self.ndcfg_dilation is not None:
            object.__setattr__(self, "ndcfg_dilation", dict(self.ndcfg_dilation))
        object.__setattr__(self, "disperse", tuple(self.disperse))
        n = self.num_inference_steps
        if not (_is_int(n) and n >= 1):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {n!r}")
        for field in ("dilate_tau", "ndcfg_tau", "inflate_tau"):
            tau = getattr(self, field)
            if not (_is_int(tau) and 0 <= tau <= n):
                raise ValueError(f"{field} must be a step count in [0, num_inference_steps = "
                                 f"{n}] (0: never), got {tau!r}")
        if not isinstance(self.progressive, bool):
            raise ValueError(f"progressive must be true or false, got {self.progressive!r}")
        if self.dilate_tau and not self.dilation:
            raise ValueError(f"dilate_tau {self.dilate_tau} needs dilate_settings")
        # What a HighResPlan (one tau for re-dilation and its progressive schedule, NDCFG and
        # dispersion within it, NDCFG's pass never dispersed) cannot reproduce.
        for field in ("ndcfg_tau", "inflate_tau"):
            if getattr(self, field) > self.dilate_tau:
                raise ValueError(f"{field} {getattr(self, field)} > dilate_tau "
                                 f"{self.dilate_tau} is not supported (the official code would "
                                 "run those settings past re-dilation)")
        if self.progressive and self.ndcfg_tau and self.ndcfg_tau != self.dilate_tau:
            raise ValueError(f"progressive mode with ndcfg_tau {self.ndcfg_tau} != dilate_tau "
                             f"{self.dilate_tau} is not supported (the official code schedules "
                             "NDCFG's factors over ndcfg_tau, this port over dilate_tau)")
        if self.progressive:
            for field, table in (("dilate_settings", self.dilation),
                                 ("ndcfg_dilate_settings", self.ndcfg_dilation or {})):
                odd = sorted(p for p, pf in table.items() if pf != int(pf) or pf < 2)
                if odd:
                    raise ValueError(f"{self.files.get(field, field)}: progressive mode needs "
                                     f"integer factors >= 2 (the official max(ceil(pf (tau - i) "
                                     f"/ tau), 2) raises the others), not those of {odd}")
        if self.inflate_tau:
            if not self.disperse:
                raise ValueError(f"inflate_tau {self.inflate_tau} needs disperse_settings")
            if self.ndcfg_tau:
                raise ValueError("dispersion (inflate_tau > 0) with NDCFG (ndcfg_tau > 0) is not "
                                 "supported: the official code also disperses NDCFG's pass")
            extra = sorted(set(self.disperse) - set(self.dilation))
            if extra:
                raise ValueError(f"{self.files.get('disperse_settings', 'disperse_settings')}: "
                                 f"dispersed layers without a dilation factor are not supported: "
                                 f"{extra}")

    def _checked(self, field: str, names, levels: Mapping[str, int], skip_missing: bool) -> set:
        """The names that are 3x3 convs of the U-Net; the others are an error naming the
        closest real one, or with skip_missing dropped with a warning."""
        source = self.files.get(field, field)
        missing = [p for p in names if p not in levels]
        if missing and not skip_missing:
            close = difflib.get_close_matches(missing[0], sorted(levels), n=1)
            raise ValueError(
                f"{source}: {missing[0]!r} is not a 3x3 conv of this U-Net"
                + (f"; the closest is {close[0]!r}" if close else "")
                + (f" ({len(missing)} such names: {missing})" if len(missing) > 1 else "")
                + ". skip_missing=True (--highres-skip-missing) drops such names, as the "
                "official code silently does")
        if missing:
            log.warning("%s: dropped %d names that are not 3x3 convs of this U-Net (the "
                        "official code skips them silently): %s", source, len(missing),
                        ", ".join(missing))
        return set(names) - set(missing)

    def plan(self, levels: Mapping[str, int], schedule: DiscreteSchedule,
             scheduler_config: Mapping[str, Any] | None = None, *,
             skip_missing: bool = False) -> HighResPlan | None:
        """The HighResPlan for a U-Net (its `conv3x3_levels`) sampled on `schedule` (the
        checkpoint's; scheduler_config: its scheduler_config.json, whose spacing the official
        DDIM run uses), thresholds in its sigmas; None where nothing is ever re-dilated
        (dilate_tau 0: direct sampling, as sdxl_vanilla.yaml)."""
        if not self.dilate_tau:
            return None
        keep = self._checked("dilate_settings", self.dilation, levels, skip_missing)
        dilation = {p: pf for p, pf in self.dilation.items() if p in keep}
        ndcfg = None
        if self.ndcfg_tau:
            table = self.ndcfg_dilation or {}
            keep = self._checked("ndcfg_dilate_settings", table, levels, skip_missing)
            ndcfg = {p: pf for p, pf in table.items() if p in keep}
        disperse: tuple[str, ...] = ()
        if self.inflate_tau:  # (the shipped configs never disperse: inflate_tau 0)
            keep = self._checked("disperse_settings", self.disperse, levels, skip_missing)
            disperse = tuple(p for p in self.disperse if p in keep and p in dilation)
        steps = self.num_inference_steps
        sigma = lambda tau: tau_sigma(schedule, scheduler_config, tau, steps)  # noqa: E731
        plan = HighResPlan(
            dilation=dilation, sigma_tau=sigma(self.dilate_tau), progressive=self.progressive,
            disperse=disperse, disperse_sigma=sigma(self.inflate_tau) if disperse else None,
            ndcfg=ndcfg, ndcfg_sigma=sigma(self.ndcfg_tau) if ndcfg is not None else None)
        plan.validate(levels)
        return plan


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def read_config(path: str, assets_root: str | None = None) -> OfficialConfig:
    """An official config YAML (configs/*.yaml) with the settings files it names read. Their
    paths are relative to the official repository's root: `assets_root`, by default the
    parent of the YAML's folder (the repository's layout). Unknown fields, a settings file
    that does not exist, an SDEdit start (sdedit_tau > 0) and dispersion with a transform other
    than R20to1_new.mat (the one the project's solver reproduces) are ValueErrors."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({e})") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of ScaleCrafter config fields")
    unknown = sorted(str(k) for k in raw if k not in FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown} (known: {', '.join(FIELDS)})")
    for old, new in _ALIASES.items():
        if old in raw:
            if raw.get(new) is not None and raw[old] is not None and raw[new] != raw[old]:
                raise ValueError(f"{path}: {old} and {new} (the same field) disagree")
            value = raw.pop(old)
            if raw.get(new) is None:
                raw[new] = value
    for field in _INTS:
        if raw.get(field) is not None and not _is_int(raw[field]):
            raise ValueError(f"{path}: {field} must be an integer, got {raw[field]!r}")
    if raw.get("sdedit_tau"):
        raise ValueError(f"{path}: sdedit_tau {raw['sdedit_tau']} (text2image_xl.py's "
                         "low-res start) is not supported; set it to 0")
    root = (os.path.dirname(os.path.dirname(os.path.abspath(path))) if assets_root is None
            else assets_root)
    files = {}
    for field in _PATHS:
        value = raw.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{path}: {field} must be a path, got {value!r}")
        file = os.path.normpath(os.path.join(root, os.path.expanduser(value)))
        if field != "disperse_transform" and not os.path.isfile(file):
            raise ValueError(f"{path}: {field} {file} does not exist (its paths are relative to "
                             f"the official repository's root, here {root}; set assets_root / "
                             "--scalecrafter-root)")
        files[field] = file
    inflate_tau = raw.get("inflate_tau") or 0
    transform = raw.get("disperse_transform")
    if inflate_tau and (transform is None or os.path.basename(transform) != DISPERSE_TRANSFORM):
        raise ValueError(f"{path}: inflate_tau {inflate_tau} disperses with disperse_transform "
                         f"{transform!r}; only {DISPERSE_TRANSFORM} (the project's solver's R) "
                         "is supported")
    latent = None
    if raw.get("latent_height") is not None or raw.get("latent_width") is not None:
        latent = (raw.get("latent_height"), raw.get("latent_width"))
        if not all(_is_int(v) and v > 0 for v in latent):
            raise ValueError(f"{path}: latent_height and latent_width must both be positive "
                             f"integers, got {latent}")
    try:
        return OfficialConfig(
            dilation=(read_dilate_settings(files["dilate_settings"])
                      if "dilate_settings" in files else {}),
            ndcfg_dilation=(read_dilate_settings(files["ndcfg_dilate_settings"])
                            if "ndcfg_dilate_settings" in files else None),
            disperse=(read_disperse_settings(files["disperse_settings"])
                      if "disperse_settings" in files else ()),
            dilate_tau=raw.get("dilate_tau") or 0, ndcfg_tau=raw.get("ndcfg_tau") or 0,
            inflate_tau=inflate_tau, progressive=bool(raw.get("progressive") or False),
            num_inference_steps=(DEFAULT_STEPS if raw.get("num_inference_steps") is None
                                 else raw["num_inference_steps"]),
            latent_size=latent, files={k: v for k, v in files.items() if k != "disperse_transform"})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def ddim_timesteps(scheduler_config: Mapping[str, Any] | None, num_steps: int) -> np.ndarray:
    """The timesteps (descending) of the official run's DDIMScheduler.from_pretrained(the
    checkpoint's scheduler)'s set_timesteps(num_steps): its timestep_spacing ("leading" where
    the config has none: DDIM's default) and steps_offset (default 0)."""
    config = dict(scheduler_config or {})
    T = int(config.get("num_train_timesteps") or 1000)
    spacing = config.get("timestep_spacing") or "leading"
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1] + int(
            config.get("steps_offset") or 0)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / num_steps)) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not one of DDIM's (linspace, "
                         "leading, trailing)")
    return np.clip(ts.astype(np.int64), 0, T - 1)


def tau_sigma(schedule: DiscreteSchedule, scheduler_config: Mapping[str, Any] | None, tau: int,
              num_steps: int = DEFAULT_STEPS) -> float:
    """The sigma threshold of "steps i < tau of the official num_steps-step DDIM run": the
    sigma of its last active timestep (inf for tau 0: never; 0 for every step)."""
    if tau <= 0:
        return math.inf
    if tau >= num_steps:
        return 0.0
    t = ddim_timesteps(scheduler_config, num_steps)[tau - 1]
    return float(schedule.sigmas_train()[t])
