"""A diffusers pipeline folder (SD 1.x / 2.x, SDXL, DeepFloyd IF) sampled by this project's
samplers: the U-Net and VAE ported to Flax (models/diffusers_unet.py, models/vae.py), the
checkpoint's discrete-time schedule bridged to EDM sigmas (diffusion/discrete.py), and the
project's PlanRunner, plans, CFG and sharding on top.

    pipe = load_pretrained("stable-diffusion-v1-5")          # model_index.json, unet/, vae/, ...
    plan = pipe.plan(num_steps=25, sampler="euler", guidance_scale=7.5)
    images = pipe.sample(plan, cond, seed=0, size=(512, 512))    # cond: a PromptConditioning

PretrainedCascade chains a pipeline with super-resolution stages (DeepFloyd IF stage I, then
stage II); read_pretrained_cascade reads a cascade file of such folders.

Weights are read with encoders/hf.py's rules (every tensor checked for presence and shape,
none left over; fp16 / bf16 variant files; each tensor placed straight onto its sharding).
"""
from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.diffusion import discrete
from ediffi_jax.diffusion.plan import Plan, build_plan
from ediffi_jax.diffusion.sampling import PlanRunner, example_keys, initial_noise
from ediffi_jax.encoders import hf
from ediffi_jax.highres.plans import HighResPlan
from ediffi_jax.models import diffusers_unet, vae as vae_lib, vae_tiled
from ediffi_jax.parallel.mesh import batch_sharding, logical_shardings
from ediffi_jax.pipeline.denoise import diffusers_denoise_fn
from ediffi_jax.rng import Stream, root, sampling_key

WEIGHTS = "diffusion_pytorch_model"
# model_index.json classes this port reads, by component; others are refused by name.
PORTED = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",)}
# Components a sampling run does not need (safety checker, watermarker, feature extractor...)
# and flags the prompt encoder reads itself (encoders/prompt.py).
NOT_NEEDED = ("safety_checker", "feature_extractor", "watermarker", "image_encoder",
              "requires_safety_checker", "force_zeros_for_empty_prompt", "add_watermarker",
              "requires_aesthetics_score")
SCHEDULES = ("discrete", "karras")


def read_json_file(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise hf.CheckpointError(f"{os.path.dirname(path) or '.'}: no {os.path.basename(path)} "
                                 f"({what})")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise hf.CheckpointError(f"{path} is not valid JSON ({e})") from e


def read_pipeline(directory: str) -> dict[str, str]:
    """{component: class name} of a pipeline folder's model_index.json; each ported
    component's folder must exist and its class be one this port reads."""
    index = read_json_file(os.path.join(directory, "model_index.json"), "a diffusers pipeline")
    components = {}
    for name, value in index.items():
        if name.startswith("_") or name in NOT_NEEDED or value is None:
            continue
        if not (isinstance(value, list) and len(value) == 2):
            raise hf.CheckpointError(f"{directory}/model_index.json: {name!r} should be "
                                     f"[library, class], got {value!r}")
        cls = value[1]
        if cls is None:
            continue
        if name in PORTED and cls not in PORTED[name]:
            raise hf.CheckpointError(f"{directory}/model_index.json: {name} is a {cls}; this port "
                                     f"reads {PORTED[name]}")
        if not os.path.isdir(os.path.join(directory, name)):
            raise hf.CheckpointError(f"{directory}: model_index.json lists {name}/, which is missing")
        components[name] = cls
    if "unet" not in components:
        raise hf.CheckpointError(f"{directory}/model_index.json names no unet")
    return components


def read_component_config(directory: str, config_cls):
    return config_cls.from_hf(read_json_file(os.path.join(directory, "config.json"),
                                             "a diffusers model config"))


def load_component(directory: str, config_cls, boxed_fn, variant, mesh=None):
    """(config, params) of one diffusers model folder (config.json + weights), float32; with
    a mesh each tensor is placed straight onto its shard of the one sharding rules table
    (parallel/mesh.py), as the project's own models are."""
    config = read_component_config(directory, config_cls)
    boxed = boxed_fn(config)
    abstract = nn.meta.unbox(boxed)
    shardings = None if mesh is None else logical_shardings(boxed, mesh)
    params = hf.load(directory, hf.diffusers_names(abstract), abstract, shardings=shardings,
                     dtype=np.float32, stem=WEIGHTS, variant=variant, whole_file=True)
    return config, params


@dataclasses.dataclass
class PretrainedPipeline:
    """The U-Net (+ VAE) of a diffusers pipeline with its schedule, as EDM denoisers."""

    directory: str
    unet: "diffusers_unet.DiffusersUNet"
    unet_params: dict
    schedule: "discrete.DiscreteSchedule"
    vae: "vae_lib.AutoencoderKL | None" = None
    vae_params: dict | None = None
    mesh: object = None
    # DeepFloyd IF stage II: the schedule that noise-augments its upsampled low-res input.
    noising_schedule: "discrete.DiscreteSchedule | None" = None
    # scheduler_config.json as written: the official ScaleCrafter configs count steps of a
    # DDIM run, whose spacing defaults differ from the schedule's (highres/official.py).
    scheduler_config: dict | None = None
    # Decode strip by strip, this many latent rows a strip (models/vae_tiled.py: the same
    # images, device memory bounded by the strip, for 4096^2 outputs); None: one jitted decode.
    vae_tile_rows: int | None = None

    def __post_init__(self):
        self.runner = PlanRunner(diffusers_denoise_fn(self.unet, self.schedule), mesh=self.mesh,
                                 guided_transform=discrete.guided_transform(self.schedule))
        self._decode = None

    @property
    def latent_channels(self) -> int:
        """The sampled image's channels (IF stage II's U-Net input also holds the low-res)."""
        c = self.unet.config.in_channels
        return c // 2 if self.noising_schedule is not None else c

    def with_lowres(self, cond, images, *, noise_level: int = 250, seed: int | jax.Array = 0,
                    size=None, noise=None, first_index: int = 0):
        """cond with IF stage II's input: stage-I `images` [B, h, w, C] in [-1, 1] upsampled
        bilinearly to `size` (default the U-Net's sample_size; corners aligned, as
        IFSuperResolutionPipeline does) and noised to timestep `noise_level` of the
        pipeline's image_noising_scheduler, with `noise` or noise drawn from `seed` (example i
        of the batch is example first_index + i of the run)."""
        if self.noising_schedule is None:
            raise ValueError(f"{self.directory} has no image_noising_scheduler: not a "
                             "super-resolution stage")
        if not 0 <= noise_level < self.noising_schedule.num_train_timesteps:
            raise ValueError(f"noise_level {noise_level} outside [0, "
                             f"{self.noising_schedule.num_train_timesteps})")
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[0] != cond.batch_size:
            raise ValueError(f"low-res images {images.shape}: expected [{cond.batch_size}, h, w, "
                             "C], one per prompt")
        size = size or (self.unet.config.sample_size,) * 2
        upscaled = resize_bilinear_aligned(images, size)
        if noise is None:  # each example's own augmentation stream, as sample() keys it
            key = sampling_key(seed) if isinstance(seed, int) else root(seed)
            keys = example_keys(key, jnp.arange(first_index, first_index + images.shape[0],
                                                dtype=jnp.uint32))
            noise = jax.vmap(lambda k: jax.random.normal(
                jax.random.fold_in(k, int(Stream.LOWRES_AUG)), upscaled.shape[1:]))(keys)
        t = jnp.full((images.shape[0],), noise_level, jnp.int32)
        lowres, _ = discrete.vp_training_pair(self.noising_schedule, upscaled,
                                              jnp.asarray(noise, jnp.float32), t)
        return cond.replace(lowres=lowres, noise_level=t.astype(jnp.float32))

    def sigmas(self, num_steps: int, schedule: str = "discrete",
               sampler: str = "euler") -> np.ndarray:
        """The checkpoint's own discrete spacing for `sampler` (diffusers' Euler spacing, or
        DPM-Solver's for dpmpp_2m), or Karras sigmas over its range as diffusers spaces them."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        return self.schedule.discrete_sigmas(num_steps, _solver(sampler),
                                             karras=schedule == "karras")

    def plan(self, num_steps: int = 25, *, sampler: str = "euler", guidance_scale: float = 7.5,
             schedule: str = "discrete", sigmas=None, highres: HighResPlan | None = None,
             **plan_kw) -> Plan:
        """A one-expert plan on the checkpoint's schedule (or explicit `sigmas`). highres: a
        ScaleCrafter plan (thresholds in this schedule's sigmas, e.g. highres/official.py's
        from an official config), checked against this U-Net's convs, whose per-step conv
        settings (and NDCFG's) the plan's segments carry."""
        sigmas = (self.sigmas(num_steps, schedule, sampler) if sigmas is None
                  else np.asarray(sigmas, np.float64))
        if highres is not None:
            given = sorted({"layer_settings", "uncond_layer_settings"} & set(plan_kw))
            if given:
                raise ValueError(f"give highres or {', '.join(given)}, not both")
            highres.validate(diffusers_unet.conv3x3_levels(self.unet.config))
            plan_kw = dict(plan_kw, layer_settings=highres.layer_settings(sigmas),
                           uncond_layer_settings=highres.uncond_layer_settings(sigmas))
        return build_plan(sigmas, sampler=sampler, guidance_scale=guidance_scale, **plan_kw)

    def denoise(self, plan: Plan, cond, x) -> jax.Array:
        """Integrate x (at plan.sigmas[0]'s scale, NHWC latents) through the plan."""
        return self.integrate(plan, cond, None, x)

    def integrate(self, plan: Plan, cond, keys, x) -> jax.Array:
        return self.runner.run(plan, [self.unet_params], cond, keys, x)

    def set_progress(self, progress) -> None:
        """progress(step, num_steps) as each step runs (PlanRunner.progress), None: off."""
        self.runner.progress = progress

    def check_cond(self, cond) -> None:
        """The U-Net reads the conditioning's token width."""
        width = cond.context.shape[-1]
        if self.unet.config.context_dim != width:
            raise ValueError(f"{self.directory}: its U-Net reads "
                             f"{self.unet.config.context_dim}-wide text tokens, the prompts "
                             f"were encoded {width} wide")

    def decode(self, latents) -> jax.Array:
        """Latents -> images NHWC in about [-1, 1] (the VAE's scaling and shift undone); with
        vae_tile_rows, a numpy array from the strip-by-strip decode."""
        if self.vae is None:
            return latents
        if self.vae_tile_rows is not None:
            config = self.vae.config
            return vae_tiled.decode_tiled(config, self.vae_params,
                                          vae_lib.from_latents(config, latents),
                                          rows=self.vae_tile_rows, dtype=self.vae.dtype)
        if self._decode is None:
            config = self.vae.config
            self._decode = jax.jit(lambda p, z: self.vae.apply(
                {"params": p}, vae_lib.from_latents(config, z), method="decode"))
        return self._decode(self.vae_params, latents)

    def sample(self, plan: Plan, cond, *, seed: int | jax.Array = 0, size=(512, 512),
               first_index: int = 0) -> jax.Array:
        """Images [B, H, W, 3] in [-1, 1] for `cond` (a PromptConditioning of B prompts)."""
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        h, w = size
        if h % scale or w % scale:
            raise ValueError(f"size {h}x{w} is not a multiple of the VAE's factor {scale}")
        if self.noising_schedule is not None and cond.lowres is None:
            raise ValueError(f"{self.directory} is a super-resolution stage: give its low-res "
                             "input (cond = pipe.with_lowres(cond, images))")
        b = cond.batch_size
        key = sampling_key(seed) if isinstance(seed, int) else root(seed)
        indices = jnp.arange(first_index, first_index + b, dtype=jnp.uint32)
        if self.mesh is not None:  # the batch over data x fsdp, and with it every step's work
            multiple = batch_multiple(self.mesh)
            if b % multiple:
                raise ValueError(f"a batch of {b} does not split over the mesh's data x fsdp "
                                 f"= {multiple} devices (PretrainedCascade pads it)")
            indices = jax.device_put(indices, batch_sharding(self.mesh))
            cond = jax.tree.map(lambda a: jax.device_put(a, batch_sharding(self.mesh, a.ndim)),
                                cond)
        keys = example_keys(key, indices)
        # The first sample's scale as diffusers draws it for this sampler, so that a run
        # here starts where diffusers' would (sqrt(sigma_max^2 + 1) for leading spacing).
        sigma0 = self.schedule.init_noise_sigma(np.asarray(plan.sigmas), _solver(plan.segments[0].settings.sampler))
        x = initial_noise(keys, (h // scale, w // scale, self.latent_channels), sigma0)
        return self.decode(self.integrate(plan, cond, keys, x))


def batch_multiple(mesh) -> int:
    """The batch sizes a mesh shards evenly: multiples of its data x fsdp devices."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


@dataclasses.dataclass(frozen=True)
class PretrainedStage:
    """One stage of a pretrained cascade file: its folder and the sampling settings it sets
    (None: the command line's)."""

    pretrained: str
    steps: int | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    schedule: str | None = None
    noise_level: int = 250  # a super-resolution stage's low-res augmentation timestep


def read_pretrained_cascade(path: str) -> tuple[PretrainedStage, ...]:
    """The stages of a cascade file of pretrained folders (paths relative to the file), e.g.
    DeepFloyd IF's two stages:

        {"stages": [{"pretrained": "IF-I-XL-v1.0", "steps": 50, "guidance_scale": 7.0},
                    {"pretrained": "IF-II-L-v1.0", "steps": 25, "guidance_scale": 4.0,
                     "noise_level": 250}]}
    """
    spec = read_json_file(path, "the cascade file")
    entries = spec.get("stages") if isinstance(spec, dict) else None
    if not entries or not all(isinstance(e, dict) and "pretrained" in e for e in entries):
        raise hf.CheckpointError(f'{path}: expected {{"stages": [{{"pretrained": DIR, ...}}, '
                                 '...]}')
    keys = [f.name for f in dataclasses.fields(PretrainedStage)]
    base = os.path.dirname(os.path.abspath(path))
    stages = []
    for i, entry in enumerate(entries):
        unknown = sorted(set(entry) - set(keys))
        if unknown:
            raise hf.CheckpointError(f"{path}: stage {i} has unknown keys {unknown} (allowed: "
                                     f"{', '.join(keys)})")
        stages.append(PretrainedStage(**{**entry, "pretrained": os.path.normpath(
            os.path.join(base, entry["pretrained"]))}))
    return tuple(stages)


def lists_pretrained(path: str, key: str) -> bool:
    """Whether `path` is a JSON file whose `key` list names pretrained folders."""
    if not os.path.isfile(path):
        return False
    try:
        spec = read_json_file(path, f"the {key} file")
    except hf.CheckpointError:
        return False
    entries = spec.get(key) if isinstance(spec, dict) else None
    return bool(entries) and isinstance(entries[0], dict) and "pretrained" in entries[0]


def is_pretrained_cascade(path: str) -> bool:
    """Whether a cascade file lists pretrained folders (else: the project's ensembles)."""
    return lists_pretrained(path, "stages")


class PretrainedCascade:
    """Pretrained pipelines in a chain: the first makes images from text (an SD pipeline, or
    IF stage I), each later one is a super-resolution stage (IF stage II) fed the previous
    stage's images clipped to [-1, 1]. One conditioning serves every stage (IF's stages all
    read T5-XXL; each U-Net's token width is checked). Stage k draws from
    rng.sampling_key(seed, k), so stage 0 equals its pipeline sampled alone. The batch is
    padded (the last prompt repeated) to a multiple of the mesh's data x fsdp and sharded."""

    def __init__(self, pipes, noise_levels=None):
        self.pipes = list(pipes)
        if not self.pipes:
            raise ValueError("a cascade needs at least one pipeline")
        self.noise_levels = list(noise_levels or [250] * len(self.pipes))
        first, *rest = self.pipes
        if first.noising_schedule is not None:
            raise ValueError(f"{first.directory} is a super-resolution stage: it needs a stage "
                             "before it")
        for pipe in rest:
            if pipe.noising_schedule is None:
                raise ValueError(f"{pipe.directory} is not a super-resolution stage (no "
                                 "image_noising_scheduler): only the first stage makes images "
                                 "from text alone")
        if len({id(p.mesh) for p in self.pipes}) > 1:
            raise ValueError("the cascade's pipelines must be loaded on one mesh")
        self.mesh = first.mesh

    @property
    def batch_multiple(self) -> int:
        return batch_multiple(self.mesh)

    def check(self, cond) -> None:
        """Each U-Net reads the conditioning's token width."""
        for pipe in self.pipes:
            pipe.check_cond(cond)

    def each_stage(self, plans, cond, *, sizes, seed: int = 0, first_index: int = 0):
        """Yields each stage's images [N, H, W, 3] in [-1, 1] (numpy) as it finishes, for a
        plan and a size (H, W) per stage; examples are first_index.. of run `seed`."""
        self.check(cond)
        n = cond.batch_size
        pad = -n % self.batch_multiple
        if pad:
            cond = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, 0)]),
                                cond)
        images = None
        for k, (pipe, plan, size) in enumerate(zip(self.pipes, plans, sizes)):
            key = sampling_key(seed, k)
            staged = cond
            if k:
                staged = pipe.with_lowres(cond, images, noise_level=self.noise_levels[k],
                                          seed=key, size=size, first_index=first_index)
            images = jnp.clip(pipe.sample(plan, staged, seed=key, size=size,
                                          first_index=first_index), -1.0, 1.0)
            yield np.asarray(images)[:n]


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation weights with the corner samples aligned
    (torch's interpolate(mode="bilinear", align_corners=True))."""
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (src - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] += 1.0 - w
    m[np.arange(n_out), hi] += w
    return m


def resize_bilinear_aligned(images, size):
    """NHWC images resized bilinearly with aligned corners (IF's upsampling of its low-res
    input), as two small matmuls."""
    rows = _align_corners_matrix(images.shape[1], size[0])
    cols = _align_corners_matrix(images.shape[2], size[1])
    return jnp.einsum("oh,bhwc,pw->bopc", rows, images, cols)


def _solver(sampler: str) -> str:
    """diffusers' scheduler whose spacing a project sampler takes: DPM-Solver's for the
    multistep solver, Euler's otherwise."""
    return "dpmsolver" if sampler.startswith("dpmpp") else "euler"


def load_pretrained(directory: str, *, dtype: str = "float32", variant: str | None = None,
                    mesh=None) -> PretrainedPipeline:
    """A pipeline folder (model_index.json) or a single U-Net folder (config.json of a
    UNet2DConditionModel, with a scheduler_config.json beside it or in ../scheduler); an
    experts file of such folders loads with pipeline/pretrained_experts.py's load_pipeline."""
    if os.path.isfile(os.path.join(directory, "model_index.json")):
        components = read_pipeline(directory)
        unet_dir = os.path.join(directory, "unet")
        scheduler_dir = os.path.join(directory, "scheduler")
        vae_dir = os.path.join(directory, "vae") if "vae" in components else None
    else:
        unet_dir, vae_dir = directory, None
        scheduler_dir = next((d for d in (directory, os.path.join(directory, "..", "scheduler"))
                              if os.path.isfile(os.path.join(d, "scheduler_config.json"))), None)
        if scheduler_dir is None:
            raise hf.CheckpointError(f"{directory}: a single U-Net folder needs its "
                                     "scheduler_config.json beside it or in ../scheduler")
    scheduler_config = read_json_file(os.path.join(scheduler_dir, "scheduler_config.json"),
                                      "the checkpoint's noise schedule")
    schedule = discrete.DiscreteSchedule.from_scheduler_config(scheduler_config)
    noising = None
    noising_dir = os.path.join(directory, "image_noising_scheduler")
    if os.path.isfile(os.path.join(noising_dir, "scheduler_config.json")):
        noising = discrete.DiscreteSchedule.from_scheduler_config(read_json_file(
            os.path.join(noising_dir, "scheduler_config.json"), "IF stage II's augmentation"))
    compute = jnp.dtype(dtype)
    unet_config, unet_params = load_component(
        unet_dir, diffusers_unet.DiffusersUNetConfig, diffusers_unet.abstract_boxed, variant, mesh)
    unet = diffusers_unet.DiffusersUNet(unet_config, dtype=compute)
    vae = vae_params = None
    if vae_dir is not None:
        vae_config, vae_params = load_component(vae_dir, vae_lib.VAEConfig,
                                                vae_lib.abstract_boxed, variant, mesh)
        vae = vae_lib.AutoencoderKL(vae_config, dtype=compute)
    return PretrainedPipeline(directory, unet, unet_params, schedule, vae, vae_params, mesh,
                              noising, scheduler_config)
