"""The official ScaleCrafter settings built in: every published run of YingqingHe/ScaleCrafter
(its configs/*.yaml and the assets/ tables they name) written here, in this project's words, as
per-block data, so sampling at those sizes needs no copy of that repository (which ships no
license, so none of its files are shipped here).

    preset = preset_for(unet_family(unet_config), 2048, 2048)   # (height, width) in pixels
    plan = preset.config.plan(conv3x3_levels(unet_config), schedule, scheduler_config)

Each preset is an `official.OfficialConfig`: the dilation table, NDCFG's table, dilate_tau /
ndcfg_tau / progressive of the 50-step run and its latent size, named as the official config is
(width x height, as its files: "sd1.5_2048x1024" is 1024 high, 2048 wide; latent 128 x 256).

    run (W x H)       latent (h x w)  dilate_tau  progressive  ndcfg_tau
    sd1.5_1024x1024   128 x 128       30          no           0
    sd1.5_1280x1280   160 x 160       35          no           0
    sd1.5_2048x1024   128 x 256       35          yes          35
    sd1.5_2048x2048   256 x 256       35          yes          35
    sd2.1_1024x1024   128 x 128       20          no           0
    sd2.1_1280x1280   160 x 160       30          no           0
    sd2.1_2048x1024   128 x 256       37          yes          0 (its NDCFG table unused)
    sd2.1_2048x2048   256 x 256       37          yes          37
    sdxl_2048x2048    256 x 256       30          no           0
    sdxl_2560x2560    320 x 320       30          no           0
    sdxl_4096x2048    256 x 512       35          yes          35
    sdxl_4096x4096    512 x 512       35          yes          35

The wide runs also come transposed (sd1.5_1024x2048, sd2.1_1024x2048, sdxl_2048x4096: the same
settings at the portrait latent; not official files): the official code treats height and
width alike (its latent is (latent_height, latent_width), every conv dilated equally along
both). The _disperse configs equal their plain ones here (their inflate_tau is 0,
so their dispersion lists are never used; not carried), and sdxl_vanilla is direct sampling
(no --highres).

SDXL: the official SDXL files list blocks as SD's four-level U-Net has them, naming
down_blocks.3, down_blocks.2.downsamplers.0.conv and up_blocks.2.upsamplers.0.conv, which SDXL
(three levels) does not have and the official code silently skips. The SDXL presets hold the effective set, the
official names that exist in SDXL, so they plan on SDXL without skip_missing.

Other sizes follow the authors' recipe (ScaleCrafter issue #14: reuse the settings of the
config with a similar pixel count, latent_height/width set to the new size): `preset_for` picks
the run whose pixel count is closest (by ratio), both counted relative to the U-Net's own
size (the settings are for that upscale: 4x to 16x the pixels of SD's 512^2 and SDXL's 1024^2,
so an SD 2.x 768 model at 1536^2 takes the 1024^2 run), then the closest aspect ratio.
Below the smallest run (4x the pixels; MIN_PIXELS of it, as the authors' own example is just
below) is an error: sample directly or give settings files.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, NamedTuple

from ediffi_jax.highres.official import OfficialConfig

# family -> (the official runs' name prefix, the side in pixels of the model they ran on:
# runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base,
# stabilityai/stable-diffusion-xl-base-1.0)
FAMILIES = {"sd1": ("sd1.5", 512), "sd2": ("sd2.1", 512), "sdxl": ("sdxl", 1024)}
LAYERS = 2  # resnets per down block (an up block has one more), SD's and SDXL's
# The least pixel count, as a fraction of the smallest run's, that preset_for takes: the authors'
# recipe reuses a run for a "similar pixel number" (their example in issue #14: 768x1344 with
# the 1024^2 settings, 98% of its pixels); below, sampling directly is the answer.
MIN_PIXELS = 0.9


def block_convs(levels: int) -> dict[str, tuple[str, ...]]:
    """Each block of SD's (4 levels) or SDXL's (3) U-Net -> its 3x3 convs as the official files
    list them: a down block's resnets' conv1 and conv2, then its downsampler's conv (not the
    innermost block's), an up block's LAYERS + 1 resnets and its upsampler's conv (not the
    outermost block's), the mid block's two resnets."""
    def resnets(block, n):
        return tuple(f"{block}.resnets.{j}.conv{k}" for j in range(n) for k in (1, 2))

    out = {}
    for i in range(levels):
        block = f"down_blocks.{i}"
        out[block] = resnets(block, LAYERS) + (
            (f"{block}.downsamplers.0.conv",) if i < levels - 1 else ())
    out["mid_block"] = resnets("mid_block", 2)
    for i in range(levels):
        block = f"up_blocks.{i}"
        out[block] = resnets(block, LAYERS + 1) + (
            (f"{block}.upsamplers.0.conv",) if i < levels - 1 else ())
    return out


def expand(down: tuple, mid: float, up: tuple, modules: Mapping[str, float] | None = None
           ) -> dict[str, float]:
    """A table per block -> {3x3 conv: factor}: down / up give down_blocks.0.. / up_blocks.0..
    (0: not dilated; their length is the U-Net's levels), mid the mid block; every conv of a
    block (block_convs) takes its factor, then `modules` sets single convs (the exceptions)."""
    if len(down) != len(up):
        raise ValueError(f"expand: {len(down)} down blocks, {len(up)} up blocks")
    convs = block_convs(len(down))
    factors = {f"down_blocks.{i}": pf for i, pf in enumerate(down)}
    factors["mid_block"] = mid
    factors.update({f"up_blocks.{i}": pf for i, pf in enumerate(up)})
    out = {name: float(pf) for block, pf in factors.items() if pf for name in convs[block]}
    for name, pf in (modules or {}).items():
        if not any(name in names for names in convs.values()):
            raise ValueError(f"expand: {name!r} is not a 3x3 conv of this layout")
        out[name] = float(pf)
    return out


_DOWNSAMPLER_4 = {"down_blocks.2.downsamplers.0.conv": 4}  # SD 2.1 2048^2's one exception
# Per block: down_blocks.0-3, mid_block, up_blocks.0-3 (SDXL: 0-2).
SD_2X = expand((0, 2, 2, 2), 2, (2, 2, 2, 0))  # sd1.5 and sd2.1 1024^2
SD_2_5X = expand((0, 2.5, 2.5, 2.5), 2.5, (2.5, 2.5, 2.5, 0))  # 1280^2
SD_4X = expand((0, 2, 3, 4), 4, (4, 3, 2, 0))  # sd1.5 2048x1024 and 2048^2, sd2.1 2048x1024
SD21_4X = expand((0, 0, 3, 4), 4, (4, 4, 3, 2), _DOWNSAMPLER_4)  # sd2.1 2048^2
SD15_NDCFG = expand((0, 0, 3, 4), 4, (4, 3, 0, 0))  # sd1.5 2048x1024 and 2048^2
SD21_NDCFG = expand((0, 0, 3, 4), 4, (4, 4, 3, 0), _DOWNSAMPLER_4)  # sd2.1 2048x1024 and 2048^2
SDXL_2X = expand((0, 0, 0), 2, (2, 0, 0))  # 2048^2
SDXL_2_5X = expand((0, 0, 0), 2.5, (2.5, 0, 0))  # 2560^2
SDXL_4X_WIDE = expand((0, 0, 3), 4, (4, 3, 2))  # 4096x2048
SDXL_4X = expand((0, 0, 4), 4, (4, 3, 2))  # 4096^2
SDXL_NDCFG = expand((0, 0, 0), 2, (2, 0, 0))  # 4096x2048 and 4096^2

# name (W x H), latent (height, width), dilation, NDCFG's table, dilate_tau, ndcfg_tau,
# progressive; every run 50 steps, inflate_tau 0.
_RUNS = (
    ("sd1.5_1024x1024", (128, 128), SD_2X, None, 30, 0, False),
    ("sd1.5_1280x1280", (160, 160), SD_2_5X, None, 35, 0, False),
    ("sd1.5_2048x1024", (128, 256), SD_4X, SD15_NDCFG, 35, 35, True),
    ("sd1.5_2048x2048", (256, 256), SD_4X, SD15_NDCFG, 35, 35, True),
    ("sd2.1_1024x1024", (128, 128), SD_2X, None, 20, 0, False),
    ("sd2.1_1280x1280", (160, 160), SD_2_5X, None, 30, 0, False),
    # (NDCFG's table given, its tau 0: never used, as published)
    ("sd2.1_2048x1024", (128, 256), SD_4X, SD21_NDCFG, 37, 0, True),
    ("sd2.1_2048x2048", (256, 256), SD21_4X, SD21_NDCFG, 37, 37, True),
    ("sdxl_2048x2048", (256, 256), SDXL_2X, None, 30, 0, False),
    ("sdxl_2560x2560", (320, 320), SDXL_2_5X, None, 30, 0, False),
    ("sdxl_4096x2048", (256, 512), SDXL_4X_WIDE, SDXL_NDCFG, 35, 35, True),
    ("sdxl_4096x4096", (512, 512), SDXL_4X, SDXL_NDCFG, 35, 35, True),
)


def _config(name, latent, dilation, ndcfg, dilate_tau, ndcfg_tau, progressive):
    files = {"dilate_settings": f"preset {name}"}
    if ndcfg is not None:
        files["ndcfg_dilate_settings"] = f"preset {name} (NDCFG)"
    return OfficialConfig(dilation=dilation, ndcfg_dilation=ndcfg, dilate_tau=dilate_tau,
                          ndcfg_tau=ndcfg_tau, progressive=progressive, num_inference_steps=50,
                          latent_size=latent, files=files)


def _presets() -> dict[str, OfficialConfig]:
    out = {}
    for name, (h, w), *rest in _RUNS:
        out[name] = _config(name, (h, w), *rest)
        if h != w:  # the same run transposed
            family, size = name.split("_")
            width, height = size.split("x")
            turned = f"{family}_{height}x{width}"
            out[turned] = _config(turned, (w, h), *rest)
    return out


PRESETS: dict[str, OfficialConfig] = _presets()  # name -> settings
OFFICIAL = tuple(run[0] for run in _RUNS)  # the names of the official configs (the rest: turned)


class Preset(NamedTuple):
    name: str  # the run's name, as PRESETS
    config: OfficialConfig  # its settings, latent_size the requested one


def family_presets(family: str) -> dict[str, OfficialConfig]:
    if family not in FAMILIES:
        raise ValueError(f"unknown ScaleCrafter preset family {family!r} (one of "
                         f"{', '.join(FAMILIES)})")
    prefix = FAMILIES[family][0] + "_"
    return {n: c for n, c in PRESETS.items() if n.startswith(prefix)}


def run_family(name: str) -> str:
    """The family of a PRESETS name: "sd1.5_1024x1024" -> "sd1"."""
    prefix = name.split("_")[0]
    return next(f for f, (p, _) in FAMILIES.items() if p == prefix)


def run_size(name: str) -> tuple[int, int]:
    """The (height, width) in pixels a PRESETS run was made for (its name is W x H)."""
    width, height = (int(v) for v in name.split("_")[1].split("x"))
    return height, width


def _side(value, what) -> tuple[int, int]:
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise ValueError(f"{what} must be positive pixel counts, got {value!r}")
    return h, w


def preset_for(family: str, height: int, width: int, *, native=None,
               vae_factor: int = 8) -> Preset:
    """The built-in settings for a `family` U-Net ("sd1", "sd2", "sdxl": unet_family) sampling
    height x width pixels. `native`: the U-Net's own side (or (height, width)) in pixels,
    by default the official runs' model's (SD 512, SDXL 1024). An official run's size (at that
    native) is that run; another size takes the run with the closest pixel count as a ratio to
    native (then the closest aspect ratio; on a tie the first of PRESETS), its latent size
    set to height x width / vae_factor (ScaleCrafter issue #14). Below MIN_PIXELS of the
    smallest run's pixel ratio (4x) is a ValueError."""
    presets = family_presets(family)
    side = FAMILIES[family][1]
    nh, nw = _side(side if native is None else native, "native")
    h, w = _side((height, width), "height and width")
    if h % vae_factor or w % vae_factor:
        raise ValueError(f"{h}x{w} is not a multiple of the VAE's factor {vae_factor}")
    scale = h * w / (nh * nw)  # the upscale asked for, in pixels

    def run_scale(name):  # the run's, from its model's side
        rh, rw = run_size(name)
        return rh * rw / side ** 2

    def key(item):
        k, name = item
        rh, rw = run_size(name)
        return (round(abs(math.log(scale / run_scale(name))), 9),
                round(abs(math.log((h / w) / (rh / rw))), 9), k)

    smallest = min(presets, key=run_scale)
    if scale < run_scale(smallest) * MIN_PIXELS * (1 - 1e-9):
        raise ValueError(
            f"{h}x{w} is {scale:.3g}x the pixels of the U-Net's own {nh}x{nw}; the smallest "
            f"built-in ScaleCrafter setting ({smallest}) is for {run_scale(smallest):g}x "
            f"(taken from {MIN_PIXELS * run_scale(smallest):.3g}x): sample this size directly "
            "(no --highres), or give settings files (--scalecrafter-config FILE.yaml, "
            "--dilate-settings FILE)")
    _, name = min(enumerate(presets), key=key)
    return Preset(name, dataclasses.replace(presets[name], latent_size=(h // vae_factor,
                                                                        w // vae_factor)))


def unet_family(config) -> str:
    """The preset family of a DiffusersUNetConfig: "sd1" (cross_attention_dim 768: SD 1.x),
    "sd2" (1024: SD 2.x) or "sdxl" (addition_embed_type "text_time" with 2048: SDXL base).
    Anything else is a ValueError naming what it read: DeepFloyd IF (the official code has no
    settings for it), the SDXL refiner (text_time with 1280: four levels, on which the SDXL
    presets' names would mean other layers), other U-Nets."""
    dims = config.cross_attention_dim
    dims = set(dims) if isinstance(dims, (tuple, list)) else {dims}
    dim = dims.pop() if len(dims) == 1 else tuple(sorted(dims))
    what = (f"cross_attention_dim {dim}, addition_embed_type {config.addition_embed_type!r}")
    if config.addition_embed_type == "text" or config.encoder_hid_dim_type is not None:
        raise ValueError(f"a DeepFloyd IF U-Net ({what}): ScaleCrafter has no official "
                         "settings for IF; give settings files")
    if config.addition_embed_type == "text_time":
        if dim == 2048:
            return "sdxl"
        raise ValueError(f"an SDXL-style U-Net that is not SDXL base ({what}; SDXL base has "
                         "2048, the refiner 1280): the SDXL presets are for SDXL base's layout; "
                         "give settings files or choose a preset")
    family = {768: "sd1", 1024: "sd2"}.get(dim) if isinstance(dim, int) else None
    if family is None:
        raise ValueError(f"no built-in ScaleCrafter preset for this U-Net ({what}): the presets "
                         "are for SD 1.x (768), SD 2.x (1024) and SDXL base (text_time, 2048); "
                         "give settings files or choose a preset")
    return family
