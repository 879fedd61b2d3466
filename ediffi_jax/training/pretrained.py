"""Growing noise-interval experts from a pretrained shared model: a diffusers checkpoint's U-Net
fine-tuned on one interval of its own training distribution by the project's trainer (the same
loop, checkpoints, resume, non-finite skips and sharding as training/trainer.py's runs).

The loss is the checkpoint's own: timesteps t drawn uniformly from the expert's interval
[q_lo T, q_hi T) (mass quantiles of the uniform training distribution of t, as the experts file
of pipeline/pretrained_experts.py counts them), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise and
the MSE to the model's target (epsilon, v or x0; IF's learned-variance half is not trained).
Images are encoded by the frozen VAE (the posterior mean x the scaling factor) and captions by
the pipeline's frozen text encoders per batch; a caption is replaced by the negative (empty)
prompt's encoding with probability train.drop_clip_text (train.drop_t5 for IF's T5), which is
what classifier-free guidance's unconditional branch reads at sampling.

    python -m train.branch --pretrained DIR --node 1/0 --workdir runs/sd-E1_0 \\
        --config.data.name=records --config.data.path=data/... [--config.train.steps=...]
    python -m train.export --workdir runs/sd-E1_0 --out pretrained/sd-E1_0   # a pipeline folder
"""
from __future__ import annotations

import functools
import json
import os
from fractions import Fraction
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ediffi_jax.atomic import atomic_directory
from ediffi_jax.config import ConfigError, fill_defaults, section
from ediffi_jax.data.pipeline import make_pipeline, to_global_arrays
from ediffi_jax.diffusion import discrete
from ediffi_jax.encoders.prompt import PromptEncoder
from ediffi_jax.models import diffusers_unet, vae as vae_lib
from ediffi_jax.models.conditioning import PromptConditioning
from ediffi_jax.parallel.distributed import DistributedConfig, initialize
from ediffi_jax.parallel.mesh import make_mesh
from ediffi_jax.pipeline.pretrained import load_pretrained, read_json_file
from ediffi_jax.pipeline.pretrained_experts import is_pretrained_experts
from ediffi_jax.runs.diffusers_export import write_diffusers_unet
from ediffi_jax.runs.spec import DataConfig, MeshConfig
from ediffi_jax.runs.store import load_params, run_config
from ediffi_jax.training.lock import WorkdirLock
from ediffi_jax.training.resume import check_changes
from ediffi_jax.training.step import TrainConfig, example_key, soft_bounds
from ediffi_jax.training.trainer import (Family, build_source, captions_of, jit_train_step,
                                         train_family)

SECTIONS = {"train": TrainConfig, "data": DataConfig, "mesh": MeshConfig}
COND_FIELDS = ("context", "context_mask", "negative_context", "negative_mask", "pooled",
               "negative_pooled", "time_ids", "negative_time_ids")


class DiscreteModel(NamedTuple):
    """The loss's view of a checkpoint: its U-Net, schedule, and sampled channels."""
    unet: "diffusers_unet.DiffusersUNet"
    schedule: "discrete.DiscreteSchedule"
    channels: int
    t5: bool  # IF: its text dropout is train.drop_t5


def timestep_interval(schedule: "discrete.DiscreteSchedule", quantiles) -> np.ndarray:
    """[q_lo T, q_hi T) of an expert's mass quantiles, the train step's `interval` data."""
    lo, hi = (float(Fraction(q)) for q in quantiles)
    return np.asarray([lo, hi], np.float32) * schedule.num_train_timesteps


def example_timestep(cfg: TrainConfig, key, interval, num_timesteps: int):
    """An integer timestep uniform in [lo, hi) (with probability soft_interval_p in [0, T))."""
    lo, hi = soft_bounds(cfg, key, interval[0], interval[1], float(num_timesteps))
    t = jnp.floor(lo + jax.random.uniform(key) * (hi - lo))
    return jnp.minimum(t, jnp.ceil(hi) - 1).astype(jnp.int32)


def discrete_loss(params, model: DiscreteModel, cfg: TrainConfig, batch, dropout_key,
                  interval):
    """The checkpoint's own loss on timesteps of `interval`: (mean, (per-example, sigma_t)).
    batch: {"x0": latents [B, h, w, C], "index": [B], "cond": PromptConditioning}."""
    del dropout_key  # diffusers U-Nets have no dropout here
    x0 = batch["x0"].astype(jnp.float32)
    T = model.schedule.num_train_timesteps

    def draw(i):
        k_t, k_noise, k_drop = jax.random.split(example_key(cfg.seed, i), 3)
        t = example_timestep(cfg, k_t, interval, T)
        rate = cfg.drop_t5 if model.t5 else cfg.drop_clip_text
        return t, jax.random.normal(k_noise, x0.shape[1:], jnp.float32), \
            jax.random.uniform(k_drop) < rate

    t, noise, drop = jax.vmap(draw)(batch["index"])
    cond: PromptConditioning = batch["cond"]
    uncond = cond.unconditional()
    pick = lambda a, b: None if a is None else jnp.where(  # noqa: E731
        drop.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)
    x_t, target = discrete.vp_training_pair(model.schedule, x0, noise, t)
    out = model.unet.apply(
        {"params": params}, x_t, t, pick(cond.context, uncond.context),
        encoder_attention_mask=pick(cond.context_mask, uncond.context_mask),
        text_embeds=pick(cond.pooled, uncond.pooled), time_ids=pick(cond.time_ids,
                                                                     uncond.time_ids))
    per_example = jnp.mean((out[..., :model.channels] - target) ** 2, axis=(1, 2, 3))
    sigma = jnp.asarray(model.schedule.sigmas_train())[t]
    return jnp.mean(per_example), (per_example, sigma)


class PretrainedBatches:
    """Host batches -> device arrays: images through the frozen VAE, captions through the
    frozen text encoders (both jitted, outside the train step)."""

    def __init__(self, iterator, pipe, encoder, mesh, size):
        self.iterator, self.pipe, self.encoder, self.mesh, self.size = (
            iterator, pipe, encoder, mesh, size)
        if pipe.vae is not None:
            config = pipe.vae.config
            self._encode = jax.jit(lambda p, x: vae_lib.to_latents(
                config, pipe.vae.apply({"params": p}, x, method="encode")[0]))

    def next(self) -> dict:
        batch = next(self.iterator)
        images = np.asarray(batch["image"], np.float32) / 127.5 - 1.0
        if images.shape[1:3] != self.size:
            raise ConfigError(f"the data's images are {images.shape[1]}x{images.shape[2]}; "
                              f"{self.pipe.directory} trains at {self.size[0]}x{self.size[1]} "
                              "(set data.resolution, or data.shapes.resolution)")
        x0 = (np.asarray(self._encode(self.pipe.vae_params, images)) if self.pipe.vae
              is not None else images)
        cond = self.encoder.encode(captions_of(batch), size=self.size)
        host = {"x0": x0, "index": np.asarray(batch["index"], np.int32),
                "cond": {f: np.asarray(getattr(cond, f)) for f in COND_FIELDS
                         if getattr(cond, f) is not None}}
        arrays = to_global_arrays(host, self.mesh)
        arrays["cond"] = PromptConditioning(**arrays["cond"])
        return arrays


def finetune_config(pretrained: str, quantiles, name: str) -> ml_collections.ConfigDict:
    """A pretrained fine-tune's config: the folder, the train / data / mesh sections'
    defaults (no EMA warm-up: the EMA starts as the checkpoint), the expert's quantiles."""
    config = ml_collections.ConfigDict()
    config.pretrained = os.path.abspath(pretrained)
    config.name = name
    for key, cls in SECTIONS.items():
        fill_defaults(config, key, cls)
    config.train.sigma_quantiles = tuple(str(q) for q in quantiles)
    config.train.ema_warmup = False
    return config


def parse_finetune(config):
    """(pretrained folder, TrainConfig, DataConfig, MeshConfig), unknown keys refused."""
    unknown = sorted(set(config) - {"pretrained", "name", "distributed", *SECTIONS})
    if unknown:
        raise ConfigError(f"a pretrained fine-tune's config has no {unknown}")
    return (config.pretrained, *(section(cls, config.get(key), key)
                                 for key, cls in SECTIONS.items()))


def finetune_family(config, mesh):
    """The Family (training/trainer.py) of a pretrained fine-tune, checked before any step:
    a text-to-image checkpoint (IF stage II's low-res path is not trained here), a batch that
    splits over the mesh, data at the checkpoint's size."""
    pretrained, tcfg, data, _ = parse_finetune(config)
    if tcfg.init_from:
        raise ConfigError("train.init_from: a pretrained fine-tune starts from `pretrained`")
    if is_pretrained_experts(pretrained):
        raise ConfigError(f"{pretrained}: fine-tune one pipeline folder, not an experts file")
    pipe = load_pretrained(pretrained, mesh=mesh)
    if pipe.noising_schedule is not None:
        raise ConfigError(f"{pretrained} is a super-resolution stage: its fine-tune (the "
                          "augmented low-res input) is not supported yet")
    encoder = PromptEncoder(pretrained, mesh=mesh)
    side = pipe.unet.config.sample_size * (pipe.vae.config.downsample_factor if pipe.vae else 1)
    iterator = iter(make_pipeline(build_source(data, side), global_batch_size=tcfg.batch_size,
                                  seed=tcfg.seed))
    model = DiscreteModel(pipe.unet, pipe.schedule, pipe.latent_channels, encoder.t5)
    return Family(
        f"{os.path.basename(os.path.normpath(pretrained))} on timestep quantiles "
        f"{tcfg.sigma_quantiles}",
        iterator, PretrainedBatches(iterator, pipe, encoder, mesh, (side, side)),
        diffusers_unet.abstract_boxed(pipe.unet.config),
        lambda param_sh: (pipe.unet_params, None, pretrained),
        lambda optimizer, state_sh: jit_train_step(model, tcfg, optimizer, state_sh, mesh,
                                                   loss=discrete_loss),
        timestep_interval(pipe.schedule, tcfg.sigma_quantiles))


def train_pretrained(config, workdir: str, *, changes=(), restart_if_unreadable=False,
                     log=functools.partial(print, flush=True)):
    """Fine-tune (or resume) a pretrained expert in `workdir`: the trainer's checks, lock
    and loop (training/trainer.py train_family)."""
    _, tcfg, _, mesh_cfg = parse_finetune(config)
    initialize(section(DistributedConfig, config.get("distributed"), "distributed"), log=log)
    try:
        mesh = make_mesh(mesh_cfg.shape)
    except ValueError as e:
        raise ConfigError(f"mesh.shape: {e}") from e
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (tcfg.batch_size // tcfg.grad_accum) % shards:
        raise ConfigError(f"train.batch_size {tcfg.batch_size} does not divide over data x "
                          f"fsdp = {shards} devices of mesh {dict(mesh.shape)}")
    config_json = json.loads(config.to_json_best_effort())
    check_changes(changes, config_json)
    family = finetune_family(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir):
        return train_family(family, tcfg, config_json, workdir, mesh, changes,
                            restart_if_unreadable, log)


EXPERT_FILE = "ediffi_expert.json"  # an exported expert's parent, interval and step


def export_pretrained(workdir: str, out: str, dtype: str = "float32",
                      step: int | None = None) -> str:
    """A fine-tuned expert as a diffusers pipeline folder `out`: its EMA U-Net in diffusers'
    layout (runs/diffusers_export.py) and every other component of the parent folder linked
    (relative symlinks: the text encoders and VAE are the frozen parent's), with
    ediffi_expert.json naming the parent and the interval. Atomic: built beside `out`,
    renamed into place (ediffi_jax/atomic.py), an existing `out` replaced only on success."""
    config = run_config(workdir)
    if "pretrained" not in config:
        raise ConfigError(f"{workdir} is not a pretrained fine-tune (train.branch --pretrained)")
    parent = config.pretrained
    if not os.path.isfile(os.path.join(parent, "model_index.json")):
        raise ConfigError(f"{workdir}'s parent {parent} is no longer a pipeline folder")
    _, ema, step = load_params(workdir, step=step)
    out = os.path.abspath(out)
    unet_config = read_json_file(os.path.join(parent, "unet", "config.json"),
                                 "the parent's U-Net config")
    with atomic_directory(out) as tmp:
        for entry in os.listdir(parent):
            if entry not in ("unet", EXPERT_FILE):  # relative to `out`, tmp's sibling
                os.symlink(os.path.relpath(os.path.join(parent, entry), out),
                           os.path.join(tmp, entry))
        write_diffusers_unet(os.path.join(tmp, "unet"), unet_config, jax.device_get(ema), dtype)
        with open(os.path.join(tmp, EXPERT_FILE), "w") as f:
            json.dump({"parent": parent, "quantiles": list(config.train.sigma_quantiles),
                       "step": int(step), "workdir": os.path.abspath(workdir)}, f, indent=1)
    return out
