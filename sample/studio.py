"""A model behind the sampling page (`python -m sample.serve`): what it can do (`info`), a
request checked whole before any sampling (`check`), sampling with progress per step and the
expert in use (`run`), and the `python -m sample` command line that makes the same images.

Two kinds, one interface: `ProjectStudio` over the project's own models (an ensemble, a
cascade, a run or an export, through pipeline.CascadeSampler) and `PretrainedStudio` over a
diffusers pipeline folder or a cascade file of them (pipeline.pretrained). The page's steps,
sampler and guidance scale set the first stage (the one that composes the image); a cascade's
later stages keep their own settings. A region of the canvas is painted in one colour bound to
a phrase of the prompt; white is background.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import shlex
from typing import Callable, Sequence

import numpy as np

from ediffi_jax.diffusion.plan import SAMPLERS

MAX_NUM = 16  # samples per call
MAX_STEPS = 250
MAX_UPSCALE = 4  # output side <= 4x the native side (16x the pixels: ScaleCrafter's range)
BACKGROUND = (255, 255, 255)


class RequestError(ValueError):
    """A request the user must change; the message says what and how."""


@dataclasses.dataclass(frozen=True)
class Region:
    colour: tuple[int, int, int]
    phrase: str
    strength: float = 1.0

    @property
    def hex(self) -> str:
        return "#%02x%02x%02x" % self.colour


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    num: int = 1
    steps: int = 20
    sampler: str = "euler"
    guidance_scale: float = 3.0
    paint_scale: float = 1.0
    height: int = 0  # 0: the model's own size
    width: int = 0
    regions: tuple[Region, ...] = ()
    colour_map: np.ndarray | None = None  # uint8 [H, W, 3], any size (resized to the output)
    style_image: np.ndarray | None = None

    def words(self) -> dict[str, str]:
        """The colour map's JSON for `python -m sample --paint-words` (white: background)."""
        out = {"#ffffff": "background"}
        out.update({r.hex: f"{r.phrase},{r.strength:g}" for r in self.regions})
        return out


def _typed(body: dict, key: str, kind, default):
    value = body.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RequestError(f"{key} must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise RequestError(f"{key} must be a finite number, got {value!r}")
    return value


def decode_image(data_url: str, what: str) -> np.ndarray:
    """uint8 [H, W, 3] from a data URL or bare base64 of a PNG / JPEG."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data_url.split(",", 1)[-1], validate=True)
        image = Image.open(io.BytesIO(raw))
        return np.asarray(image.convert("RGB"))
    except (ValueError, UnidentifiedImageError, OSError) as e:
        raise RequestError(f"{what} is not a readable image ({e})") from None


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def parse_request(body: dict, defaults: dict) -> Request:
    """A Request from the page's JSON; an unknown key or a wrong type is an error naming it."""
    if not isinstance(body, dict):
        raise RequestError("the request must be a JSON object")
    fields = {f.name for f in dataclasses.fields(Request)} - {"colour_map", "style_image"}
    known = fields | {"canvas", "style"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown request keys {unknown} (known: {sorted(known)})")
    prompt = _typed(body, "prompt", str, "").strip()
    if not prompt:
        raise RequestError("write a prompt")
    regions = []
    for i, r in enumerate(_typed(body, "regions", list, [])):
        if not isinstance(r, dict) or set(r) - {"colour", "phrase", "strength"}:
            raise RequestError(f"region {i} must be {{colour, phrase, strength}}, got {r!r}")
        colour = _typed(r, "colour", str, "")
        try:
            rgb = bytes.fromhex(colour.removeprefix("#"))
            assert len(rgb) == 3
        except (ValueError, AssertionError):
            raise RequestError(f"region {i}: colour must be '#rrggbb', got {colour!r}") from None
        if tuple(rgb) == BACKGROUND:
            raise RequestError(f"region {i}: white is the background; pick another colour")
        phrase = _typed(r, "phrase", str, "").strip()
        if not phrase:
            raise RequestError(f"region {i} ({colour}) has no phrase: bind it to words of the "
                               "prompt, or remove it")
        regions.append(Region(tuple(rgb), phrase, _typed(r, "strength", float, 1.0)))
    if len({r.colour for r in regions}) != len(regions):
        raise RequestError("two regions share a colour; give each its own")
    canvas, style = body.get("canvas"), body.get("style")
    if regions and not canvas:
        raise RequestError("regions are bound but no canvas was sent")
    return Request(
        prompt=prompt, negative_prompt=_typed(body, "negative_prompt", str, "").strip(),
        seed=_typed(body, "seed", int, 0), num=_typed(body, "num", int, 1),
        steps=_typed(body, "steps", int, defaults["steps"]),
        sampler=_typed(body, "sampler", str, defaults["sampler"]),
        guidance_scale=_typed(body, "guidance_scale", float, defaults["guidance_scale"]),
        paint_scale=_typed(body, "paint_scale", float, defaults["paint_scale"]),
        height=_typed(body, "height", int, 0), width=_typed(body, "width", int, 0),
        regions=tuple(regions),
        colour_map=decode_image(canvas, "the canvas") if regions else None,
        style_image=decode_image(style, "the style image") if style else None)


@dataclasses.dataclass
class Checked:
    """A request with everything a sampling call needs, built before any sampling."""

    request: Request
    size: tuple[int, int]
    paint: object  # a pipeline.Paint, or None
    plans: list
    call: object  # the backend's own state for `run`


class Studio:
    """The interface the page needs; the subclasses give `_check`, `run`, `_setting_args` and
    the attributes below."""

    name: str
    source: list[str]  # the command line's model arguments, e.g. ["--ensemble", "runs/x"]
    native: tuple[int, int]
    multiple: int  # the output side's required divisor
    defaults: dict
    can_paint: bool
    has_negative: bool
    has_style: bool
    stage_names: list[str]

    def info(self) -> dict:
        h, w = self.native
        return dict(name=self.name, native=[h, w], multiple=self.multiple,
                    max_side=MAX_UPSCALE * max(h, w), max_num=MAX_NUM, max_steps=MAX_STEPS,
                    samplers=list(SAMPLERS), defaults=self.defaults, can_paint=self.can_paint,
                    has_negative=self.has_negative, has_style=self.has_style,
                    stages=self.stage_names, highres=self.highres_method, square=self.square)

    highres_method = "none"  # how a side past the native one is sampled
    square = False  # makes square images only

    def check(self, request: Request) -> Checked:
        """Every input checked (phrases against the prompt's tokens, mask sizes, limits, the
        plans built), so that `run` only samples."""
        from ediffi_jax.paint.masks import from_color_map
        from ediffi_jax.rng import check_seed

        r = request
        if not 1 <= r.num <= MAX_NUM:
            raise RequestError(f"number of samples must be 1-{MAX_NUM}, got {r.num}")
        if not 1 <= r.steps <= MAX_STEPS:
            raise RequestError(f"steps must be 1-{MAX_STEPS}, got {r.steps}")
        if r.sampler not in SAMPLERS:
            raise RequestError(f"sampler must be one of {list(SAMPLERS)}, got {r.sampler!r}")
        try:
            check_seed(r.seed)
        except ValueError as e:
            raise RequestError(str(e)) from None
        size = (r.height or self.native[0], r.width or self.native[1])
        limit = MAX_UPSCALE * max(self.native)
        if max(size) > limit or min(size) < self.multiple:
            raise RequestError(f"output {size[0]}x{size[1]} is outside what this model makes: "
                               f"sides from {self.multiple} to {limit} px ({MAX_UPSCALE}x its "
                               f"native {self.native[0]}x{self.native[1]})")
        if self.square and size[0] != size[1]:
            raise RequestError(f"output {size[0]}x{size[1]}: this model makes square images")
        if size[0] % self.multiple or size[1] % self.multiple:
            raise RequestError(f"output {size[0]}x{size[1]}: each side must be a multiple of "
                               f"{self.multiple} for this model")
        if r.negative_prompt and not self.has_negative:
            raise RequestError("this model has no negative prompt (its unconditional branch is "
                               "the dropped condition)")
        if r.style_image is not None and not self.has_style:
            raise RequestError("this model has no CLIP vision tower: it cannot take a style "
                               "image")
        paint = None
        if r.regions:
            if not self.can_paint:
                raise RequestError("this model cannot paint: it has no cross-attention on the "
                                   "prompt's tokens")
            from ediffi_jax.pipeline.generate import Paint

            masks = from_color_map(r.colour_map, r.words(), *size)
            unpainted = [f"{m.phrase!r}" for m in masks if not m.mask.any()]
            if unpainted:
                raise RequestError(f"region(s) {', '.join(unpainted)} are bound to a colour "
                                   "that is not on the canvas: paint them, or remove them")
            paint = Paint(tuple(masks), r.paint_scale)
        return self._check(r, size, paint)

    def _check(self, request: Request, size, paint) -> Checked:
        raise NotImplementedError

    def run(self, checked: Checked, progress: Callable[[dict], None] | None = None
            ) -> np.ndarray:
        """The last stage's uint8 images [num, H, W, 3]. `progress` hears as each step runs:
        {stage, stage_index, stages, step, steps, segment, segments, experts, sigma}."""
        raise NotImplementedError

    def _reporter(self, checked: Checked, k: int, progress):
        """A PlanRunner progress callback for stage k, in the page's terms."""
        plan = checked.plans[k]

        def report(i: int, num_steps: int) -> None:
            j = next(n for n, s in enumerate(plan.segments) if s.start <= i < s.stop)
            progress(dict(stage=self.stage_names[k], stage_index=k,
                          stages=len(self.stage_names), step=i + 1, steps=num_steps,
                          segment=j, segments=len(plan.segments),
                          experts=list(plan.segments[j].experts),
                          sigma=float(plan.sigmas[i])))
        return report if progress is not None else None

    def plan_segments(self, checked: Checked) -> list[list[dict]]:
        """Each stage's plan as the page draws it: per segment its steps, sigmas, experts."""
        return [[dict(start=s.start, stop=s.stop, experts=list(s.experts),
                      sigma_start=float(p.sigmas[s.start]), sigma_stop=float(p.sigmas[s.stop]),
                      guidance_scale=s.guidance_scale) for s in p.segments]
                for p in checked.plans]

    def command(self, request: Request, out: str = "samples") -> list[str]:
        """The `python -m sample` arguments that make this call's images (the colour map
        saved as colors.png and its words as words.json, a style image as style.png)."""
        r = request
        args = ["python", "-m", "sample", *self.source, "--prompt", r.prompt, "--num",
                str(r.num), "--seed", str(r.seed), "--out", out]
        args += self._setting_args(r)
        if r.regions:
            args += ["--paint", "colors.png", "--paint-words", "words.json", "--paint-scale",
                     repr(r.paint_scale)]
        if r.style_image is not None:
            args += ["--style-image", "style.png"]
        return args

    def _setting_args(self, request: Request) -> list[str]:
        raise NotImplementedError

    def bundle(self, request: Request, images: Sequence[np.ndarray]) -> bytes:
        """A zip of the call: the PNGs as `python -m sample` names them, colors.png +
        words.json, style.png, and command.txt (run it in the folder the zip unpacks to)."""
        import zipfile

        from sample.__main__ import file_stem

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for i, img in enumerate(images):
                z.writestr(f"samples/{i:04d}_{file_stem(request.prompt)}.png", encode_png(img))
            if request.regions:
                z.writestr("colors.png", encode_png(request.colour_map))
                z.writestr("words.json", json.dumps(request.words(), indent=1) + "\n")
            if request.style_image is not None:
                z.writestr("style.png", encode_png(request.style_image))
            z.writestr("command.txt", shlex.join(self.command(request)) + "\n")
        return buf.getvalue()


class ProjectStudio(Studio):
    """The project's own models: pipeline.load's ensembles, cascades, runs and exports."""

    def __init__(self, path: str, stages: Sequence[str] = (), mesh=None):
        import os

        from ediffi_jax import pipeline
        from ediffi_jax.models.unet import attention_block_names

        self.sampler = pipeline.load(path, stages=stages or None, mesh=mesh)
        is_cascade = pipeline.is_cascade_file(path)
        self.source = ["--cascade" if is_cascade else "--ensemble", path]
        if stages:
            self.source += ["--stages", ",".join(stages)]
        all_stages = self.sampler.stages
        first, last = all_stages[0], all_stages[-1]
        self.is_cascade = is_cascade
        self.name = os.path.basename(os.path.normpath(path))
        self.stage_names = [s.name for s in all_stages]
        self.native = (last.resolution,) * 2
        self.multiple = 2 ** (len(last.run.stage.model.channel_mult) - 1)
        self.can_paint = any(s.paint and attention_block_names(s.run.stage.model)
                             for s in all_stages)
        self.has_negative = False
        self.has_style = any(s.style and self.sampler.conditioner(s)[1].clip_vision is not None
                             for s in all_stages)
        g = first.sampling.guidance_scale
        self.defaults = dict(steps=first.sampling.num_steps, sampler=first.sampling.sampler,
                             guidance_scale=float(g if np.isscalar(g) else g[0]),
                             paint_scale=1.0)
        self.highres_method = "scalecrafter"  # from highres.plans.MIN_FACTOR x the side
        self.square = True

    def _check(self, r: Request, size, paint) -> Checked:
        from ediffi_jax.config import ConfigError

        first = self.sampler.stages[0]
        scale = first.sampling.guidance_scale if self._keeps_expert_scales(r) else r.guidance_scale
        try:
            sampling = dataclasses.replace(first.sampling, num_steps=r.steps, sampler=r.sampler,
                                           guidance_scale=scale)
            if r.sampler == "dpmpp_2m":
                sampling = dataclasses.replace(sampling, s_churn=0.0)
            last = len(self.sampler.stages) - 1
            sampler = self.sampler.with_settings(0, sampling)
            highres = dataclasses.replace(sampler.stages[last].highres,
                                          method=self.highres_for(size[0]))
            sampler = sampler.with_settings(last, highres=highres)
            plans = [sampler.plan(k, size[0] if k == last else None,
                                  paint.settings if paint is not None else None, "output side")
                     for k in range(len(sampler.stages))]
            if paint is not None:
                for k, stage in enumerate(sampler.stages):
                    if stage.paint:
                        sampler.paint_conditioning(k, paint, [r.prompt])
        except (ConfigError, ValueError) as e:
            raise RequestError(str(e)) from None
        return Checked(r, size, paint, plans, sampler)

    def _keeps_expert_scales(self, r: Request) -> bool:
        """Per-expert guidance scales stay the model's unless the page changed the first one."""
        g = self.sampler.stages[0].sampling.guidance_scale
        return not np.isscalar(g) and r.guidance_scale == self.defaults["guidance_scale"]

    def highres_for(self, side: int) -> str:
        """ScaleCrafter from its smallest factor past the native side, else direct sampling."""
        from ediffi_jax.highres.plans import MIN_FACTOR

        return "scalecrafter" if side >= MIN_FACTOR * self.native[0] else "none"

    def run(self, checked: Checked, progress=None) -> np.ndarray:
        sampler, r = checked.call, checked.request
        for k, runner in enumerate(sampler.runners):
            runner.progress = self._reporter(checked, k, progress)
        try:
            return sampler.sample(
                [r.prompt] * r.num, seed=r.seed, paint=checked.paint,
                style_images=[r.style_image] * r.num if r.style_image is not None else None,
                resolution=checked.size[0])
        finally:
            sampler.set_progress(None)

    def _setting_args(self, r: Request) -> list[str]:
        first = f"{self.stage_names[0]}." if self.is_cascade else ""
        args = [f"--config.{first}sampling.num_steps={r.steps}",
                f"--config.{first}sampling.sampler={r.sampler}"]
        if not self._keeps_expert_scales(r):
            args.append(f"--config.{first}sampling.guidance_scale={r.guidance_scale!r}")
        if r.sampler == "dpmpp_2m" and self.sampler.stages[0].sampling.s_churn:
            args.append(f"--config.{first}sampling.s_churn=0.0")
        if r.height and r.height != self.native[0]:
            args += ["--resolution", str(r.height), "--highres", self.highres_for(r.height)]
        return args


class PretrainedStudio(Studio):
    """A diffusers pipeline folder (SD 1.x / 2.x, SDXL, DeepFloyd IF) or a cascade file of
    them, through pipeline.pretrained; negative prompts, no style tower, direct sampling at
    other sizes."""

    def __init__(self, path: str, *, cascade: bool = False, dtype: str = "float32",
                 variant: str | None = None, mesh=None):
        import os

        from ediffi_jax.pipeline.pretrained import (PretrainedCascade, PretrainedStage,
                                                    read_pretrained_cascade)
        from ediffi_jax.pipeline.pretrained_experts import load_pipeline, prompt_encoder
        from sample.pretrained import native_size, stage_name, vae_factor

        self.stages = read_pretrained_cascade(path) if cascade else (PretrainedStage(path),)
        self.pipes = [load_pipeline(s.pretrained, dtype=dtype, variant=variant, mesh=mesh)
                      for s in self.stages]
        self.cascade = PretrainedCascade(self.pipes, [s.noise_level for s in self.stages])
        self.encoder = prompt_encoder(self.stages[0].pretrained, dtype)
        self.source = ["--cascade" if cascade else "--pretrained", path]
        if dtype != "float32":
            self.source += ["--dtype", dtype]
        if variant:
            self.source += ["--variant", variant]
        self.name = os.path.basename(os.path.normpath(path))
        self.stage_names = []
        for k, s in enumerate(self.stages):
            self.stage_names.append(stage_name(s.pretrained, k, self.stage_names))
        self.native = native_size(self.pipes[-1])
        self.multiple = vae_factor(self.pipes[-1])
        self.can_paint, self.has_negative, self.has_style = True, True, False
        self.defaults = dict(steps=25, sampler="euler", guidance_scale=7.5, paint_scale=1.0)

    def _check(self, r: Request, size, paint) -> Checked:
        from ediffi_jax.config import ConfigError
        from sample.pretrained import encode, stage_plans, stage_sizes

        try:
            sizes = stage_sizes(self.stages, self.pipes, size)
            plans = stage_plans(self.stages, self.pipes, r.steps, r.sampler, r.guidance_scale,
                                "discrete", paint.settings if paint is not None else None)
            negative = [r.negative_prompt] * r.num if r.negative_prompt else None
            masks = None if paint is None else np.repeat(
                self.encoder.paint_masks([r.prompt], paint.masks, paint.scale), r.num, axis=0)
            cond = encode(self.encoder, [r.prompt] * r.num, negative, masks, 0, r.num, sizes[0])
            self.cascade.check(cond)
        except (ConfigError, ValueError) as e:
            raise RequestError(str(e)) from None
        return Checked(r, size, paint, plans, (cond, sizes))

    def run(self, checked: Checked, progress=None) -> np.ndarray:
        from ediffi_jax.pipeline.generate import to_uint8

        cond, sizes = checked.call
        for k, pipe in enumerate(self.pipes):
            pipe.set_progress(self._reporter(checked, k, progress))
        try:
            *_, last = self.cascade.each_stage(checked.plans, cond, sizes=sizes,
                                               seed=checked.request.seed)
            return np.asarray(to_uint8(last))[:checked.request.num]
        finally:
            for pipe in self.pipes:
                pipe.set_progress(None)

    def _setting_args(self, r: Request) -> list[str]:
        args = ["--steps", str(r.steps), "--sampler", r.sampler, "--guidance-scale",
                repr(r.guidance_scale)]
        if r.negative_prompt:
            args += ["--negative-prompt", r.negative_prompt]
        if (r.height, r.width) != (0, 0) and (r.height, r.width) != self.native:
            args += ["--size", f"{r.height or self.native[0]}x{r.width or self.native[1]}"]
        return args
