"""Plan a diffusers checkpoint's use without its weights: parameters per component, FLOPs per
image, and per-device memory for sampling and for a full fine-tune of the U-Net on a mesh.

    python -m ediffi_jax.info --pretrained configs/pretrained/sd15 [--size 512x512] \
        [--steps 25] [--devices 8 --mesh 1,8,1] [--device-memory-gib 80] [--dtype bfloat16]

Only config.json files are read (configs/pretrained/ ships the published ones): a pipeline
folder (unet/, and vae/, text_encoder*/ where present) or a single U-Net folder. Every figure
comes from XLA compiling the real programs on abstract, sharded inputs, as the training dry run
does (training/dry_run.py): the sampler's guided U-Net call (conditional and unconditional
branches in one batch), the VAE decode, the text encoders, and the fine-tune step (the
model's own discrete-time loss, AdamW, EMA, the one sharding rules table). On a CPU host the
devices are simulated and the memory is the CPU compiler's buffer assignment: an estimate of
what a GPU compiler, which fuses differently, will need.
"""
from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ediffi_jax.config import ConfigError
from ediffi_jax.diffusion import discrete
from ediffi_jax.encoders.conditioner import abstract_text_tower
from ediffi_jax.models import diffusers_unet, vae as vae_lib
from ediffi_jax.models.conditioning import PromptConditioning
from ediffi_jax.parallel.mesh import (batch_sharding, logical_shardings, make_mesh,
                                      with_activation_rules)
from ediffi_jax.pipeline.pretrained import read_component_config, read_json_file
from ediffi_jax.runs.checkpoint import abstract_like
from ediffi_jax.training.dry_run import GIB, _devices, _per_device_bytes, cost_of
from ediffi_jax.training.pretrained import DiscreteModel, discrete_loss
from ediffi_jax.training.step import TrainConfig, init_state, make_optimizer, state_shardings
from ediffi_jax.training.trainer import jit_train_step

TEXT_TOWERS = ("text_encoder", "text_encoder_2")
TOKENS = 77  # every one of these pipelines pads its prompts to 77 tokens


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's per-device bytes and its FLOPs (all devices together)."""

    flops: float
    params_bytes: int  # of the component's weights, per device
    total_bytes: int  # arguments + outputs + temporaries - donated buffers

    @property
    def working_bytes(self) -> int:
        """What it needs beyond its resident weights."""
        return self.total_bytes - self.params_bytes


@dataclasses.dataclass(frozen=True)
class FineTune:
    batch: int
    params_bytes: int
    optimizer_bytes: int
    ema_bytes: int
    batch_bytes: int
    temp_bytes: int
    total_bytes: int
    flops: float  # per step, all devices


@dataclasses.dataclass(frozen=True)
class PretrainedPlan:
    directory: str
    size: tuple[int, int]  # image H x W
    sample_shape: tuple[int, int, int]  # the U-Net's input (latents, or pixels for IF)
    batch: int
    steps: int
    cfg: bool
    dtype: str
    platform: str
    mesh: dict[str, int]
    params: dict[str, int]  # per component
    unet: Program  # one sampler call: batch x (2 with CFG) examples
    decode: Program | None  # batch images
    text: dict[str, Program]  # batch x (2 with CFG) prompts, per tower
    finetune: FineTune | None
    device_memory: int

    @property
    def branches(self) -> int:
        return 2 if self.cfg else 1

    @property
    def flops_per_image(self) -> float:
        """Text encoding, `steps` U-Net calls (both CFG branches), the decode."""
        text = sum(p.flops for p in self.text.values())
        decode = self.decode.flops if self.decode else 0.0
        return (text + self.steps * self.unet.flops + decode) / self.batch

    @property
    def sampling_bytes(self) -> int:
        """Peak per device while sampling: every component's weights resident, plus the
        largest working set of the programs that run one after another."""
        programs = [self.unet, *self.text.values()] + ([self.decode] if self.decode else [])
        return (sum(p.params_bytes for p in programs)
                + max(p.working_bytes for p in programs))

    def report(self) -> list[str]:
        size = lambda b: (f"{b / GIB:.2f} GiB" if b >= GIB / 10  # noqa: E731
                          else f"{b / 2**20:.2f} MiB")
        n = self.mesh_devices
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        h, w = self.size
        lines = [f"pipeline             {self.directory}",
                 f"mesh                 {mesh} ({n} {self.platform} devices), compute "
                 f"{self.dtype}, weights float32"]
        for name, count in self.params.items():
            lines.append(f"params {name:<13} {count:,} ({count / 1e6:.2f} M)")
        lines += [
            f"image                {h}x{w}, U-Net input {'x'.join(map(str, self.sample_shape))},"
            f" batch {self.batch}, {self.steps} steps" + (", CFG" if self.cfg else ""),
            f"FLOPs per image      {self.flops_per_image:.4g} (U-Net call "
            f"{self.unet.flops / self.batch / self.branches:.4g} per branch per step"
            + (f", decode {self.decode.flops / self.batch:.4g}" if self.decode else "")
            + "".join(f", {k} {p.flops / self.batch / self.branches:.4g}"
                      for k, p in self.text.items()) + ")",
            f"sampling memory      {size(self.sampling_bytes)} per device (weights of every"
            f" component {size(self.sampling_bytes - max(self._working()))}, + the largest "
            "working set)",
        ]
        if self.finetune is not None:
            f = self.finetune
            lines += [
                f"fine-tune U-Net      batch {f.batch}: params {size(f.params_bytes)}, AdamW "
                f"{size(f.optimizer_bytes)}, EMA {size(f.ema_bytes)}, batch "
                f"{size(f.batch_bytes)}, activations {size(f.temp_bytes)}",
                f"fine-tune memory     {size(f.total_bytes)} per device "
                f"({'fits' if f.total_bytes <= self.device_memory else 'does not fit'} in "
                f"{size(self.device_memory)}); {f.flops / f.batch:.4g} FLOPs per example "
                "(forward + backward + update)",
            ]
        if self.decode is None:
            lines.append("(no vae/config.json: the size is the U-Net's own input, pixels)")
        if self.platform == "cpu":
            lines.append("(CPU compiler's buffer assignment on simulated devices: an estimate)")
        return lines

    @property
    def mesh_devices(self) -> int:
        return math.prod(self.mesh.values())

    def _working(self):
        programs = [self.unet, *self.text.values()] + ([self.decode] if self.decode else [])
        return [p.working_bytes for p in programs]


def _layout(directory: str) -> dict[str, str]:
    """{component: folder} of what the planner reads: unet (required), vae, text towers."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return {"unet": directory}
    found = {name: os.path.join(directory, name) for name in ("unet", "vae") + TEXT_TOWERS
             if os.path.isfile(os.path.join(directory, name, "config.json"))}
    if "unet" not in found:
        raise ConfigError(f"{directory}: neither a U-Net folder (config.json) nor a pipeline "
                          "folder with unet/config.json")
    return found


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _sharded(boxed, mesh):
    """Abstract params of a boxed tree, each carrying its sharding of the rules table."""
    return abstract_like(nn.meta.unbox(boxed), logical_shardings(boxed, mesh))


def _input(shape, dtype, mesh):
    """A batch input: split over data x fsdp where they divide it, else replicated."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    sharding = (batch_sharding(mesh, len(shape)) if shape[0] % shards == 0
                else NamedSharding(mesh, P()))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _compile(lowered, mesh):
    """Compiled only to be measured, never run: on CPU without LLVM's optimisation passes,
    which cost most of the compile time and change neither buffer sizes nor FLOPs."""
    if mesh.devices.flat[0].platform == "cpu":
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    return lowered.compile()


def _program(fn, params, inputs, mesh) -> tuple[Program, object]:
    """fn(params, *inputs) compiled for the mesh: its Program and memory analysis."""
    lowered = jax.jit(with_activation_rules(fn, mesh)).lower(params, *inputs)
    mem = _compile(lowered, mesh).memory_analysis()
    params_bytes = _per_device_bytes(params)
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes) if mem is not None else params_bytes
    # The model's FLOPs: the unpartitioned program's (a replicated input is not counted
    # once per device).
    return Program(cost_of(lowered), params_bytes, total), mem


def _unet_inputs(config, batch, shape, mesh):
    args, kwargs = diffusers_unet.example_inputs(config, batch, shape[:2], TOKENS)
    as_input = lambda x: _input(x.shape, x.dtype, mesh)  # noqa: E731
    return tuple(as_input(a) for a in args), {k: as_input(v) for k, v in kwargs.items()}


def plan_pretrained(directory: str, *, size: tuple[int, int] | None = None, batch: int = 1,
                    steps: int = 25, cfg: bool = True, devices: int | None = None,
                    mesh_shape=(-1, 1, 1), dtype: str = "float32",
                    device_memory_gib: float = 80.0, finetune_batch: int | None = None,
                    finetune: bool = True) -> PretrainedPlan:
    """Compile a checkpoint's sampling programs (and its U-Net's fine-tune step) for a mesh
    on abstract inputs; nothing is allocated and no weights are read."""
    layout = _layout(directory)
    compute = jnp.dtype(dtype)
    chosen = _devices(devices)
    try:
        mesh = make_mesh(tuple(mesh_shape), chosen)
    except ValueError as e:
        raise ConfigError(f"--mesh {tuple(mesh_shape)} on {len(chosen)} devices: {e}") from None
    unet_cfg = read_component_config(layout["unet"], diffusers_unet.DiffusersUNetConfig)
    vae_cfg = (read_component_config(layout["vae"], vae_lib.VAEConfig) if "vae" in layout
               else None)
    factor = vae_cfg.downsample_factor if vae_cfg else 1
    h, w = size or (unet_cfg.sample_size * factor,) * 2
    if h % (factor * unet_cfg.downsample_factor) or w % (factor * unet_cfg.downsample_factor):
        raise ConfigError(f"size {h}x{w} is not a multiple of "
                          f"{factor * unet_cfg.downsample_factor} (VAE factor {factor} x the "
                          f"U-Net's {unet_cfg.downsample_factor})")
    shape = (h // factor, w // factor, unet_cfg.in_channels)
    branches = 2 if cfg else 1

    params = {}
    unet_boxed = diffusers_unet.abstract_boxed(unet_cfg)
    params["unet"] = _count(nn.meta.unbox(unet_boxed))
    unet = diffusers_unet.DiffusersUNet(unet_cfg, dtype=compute)
    unet_params = _sharded(unet_boxed, mesh)
    args, kwargs = _unet_inputs(unet_cfg, batch * branches, shape, mesh)
    unet_program, _ = _program(lambda p, a, kw: unet.apply({"params": p}, *a, **kw),
                               unet_params, (args, kwargs), mesh)

    decode = None
    if vae_cfg is not None:
        vae_boxed = vae_lib.abstract_boxed(vae_cfg)
        params["vae"] = _count(nn.meta.unbox(vae_boxed))
        vae = vae_lib.AutoencoderKL(vae_cfg, dtype=compute)
        latents = _input((batch, shape[0], shape[1], vae_cfg.latent_channels), jnp.float32,
                         mesh)
        decode, _ = _program(lambda p, z: vae.apply({"params": p}, z, method="decode"),
                             _sharded(vae_boxed, mesh), (latents,), mesh)

    text = {}
    for name in TEXT_TOWERS:
        if name not in layout:
            continue
        _, module, boxed = abstract_text_tower(layout[name], dtype)
        params[name] = _count(nn.meta.unbox(boxed))
        ids = _input((batch * branches, TOKENS), jnp.int32, mesh)
        text[name], _ = _program(lambda p, i, m: module.apply({"params": p}, i, m),
                                 _sharded(boxed, mesh), (ids, ids), mesh)

    tuned = None
    if finetune:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        tuned = _plan_finetune(layout, unet, unet_cfg, unet_boxed, shape,
                               finetune_batch or shards, mesh)
    return PretrainedPlan(
        directory=directory, size=(h, w), sample_shape=shape, batch=batch, steps=steps,
        cfg=cfg, dtype=dtype, platform=mesh.devices.flat[0].platform, mesh=dict(mesh.shape),
        params=params, unet=unet_program, decode=decode, text=text, finetune=tuned,
        device_memory=int(device_memory_gib * GIB))


def _schedule(layout) -> tuple[discrete.DiscreteSchedule, bool]:
    """The checkpoint's training schedule (its loss target), or diffusers' defaults, and
    whether the U-Net also predicts a variance (IF: twice the noisy image's channels out)."""
    for folder in (os.path.join(layout["unet"], "..", "scheduler"), layout["unet"]):
        path = os.path.join(folder, "scheduler_config.json")
        if os.path.isfile(path):
            config = read_json_file(path, "the checkpoint's noise schedule")
            return (discrete.DiscreteSchedule.from_scheduler_config(config),
                    config.get("variance_type") in ("learned", "learned_range"))
    return discrete.DiscreteSchedule(), False


def _plan_finetune(layout, unet, unet_cfg, unet_boxed, shape, batch, mesh) -> FineTune | None:
    """The U-Net's full fine-tune step as train.branch --pretrained runs it
    (training/pretrained.py: its own discrete-time loss, AdamW, EMA, skipped non-finite
    updates, state donated); the frozen encoders and VAE run outside the step and are not
    counted here. None for a super-resolution stage, which that fine-tune does not train."""
    schedule, learned_variance = _schedule(layout)
    noisy = unet_cfg.out_channels // 2 if learned_variance else unet_cfg.out_channels
    if shape[-1] > noisy:  # IF stage II: its input holds the low-res image
        return None
    tcfg = TrainConfig(batch_size=batch, ema_warmup=False)
    optimizer = make_optimizer(tcfg)
    abstract = nn.meta.unbox(unet_boxed)
    state_sh = state_shardings(optimizer, abstract, logical_shardings(unet_boxed, mesh), mesh)
    state = abstract_like(jax.eval_shape(lambda p: init_state(p, optimizer), abstract), state_sh)
    (_, _, context), added = _unet_inputs(unet_cfg, batch, shape, mesh)
    mask = _input(context.shape[:2], jnp.float32, mesh)
    cond = PromptConditioning(context=context, context_mask=mask, negative_context=context,
                              negative_mask=mask, pooled=added.get("text_embeds"),
                              negative_pooled=added.get("text_embeds"),
                              time_ids=added.get("time_ids"))
    batch_tree = {"x0": _input((batch, *shape[:2], noisy), jnp.float32, mesh),
                  "index": _input((batch,), jnp.int32, mesh), "cond": cond}
    model = DiscreteModel(unet, schedule, noisy, unet_cfg.encoder_hid_dim_type == "text_proj")
    lowered = jit_train_step(model, tcfg, optimizer, state_sh, mesh, loss=discrete_loss).lower(
        state, batch_tree, jax.ShapeDtypeStruct((2,), jnp.float32,
                                                sharding=NamedSharding(mesh, P())))
    mem = _compile(lowered, mesh).memory_analysis()
    parts = dict(params_bytes=_per_device_bytes(state.params),
                 optimizer_bytes=_per_device_bytes(state.opt_state),
                 ema_bytes=_per_device_bytes(state.ema_params),
                 batch_bytes=_per_device_bytes(batch_tree))
    temp = mem.temp_size_in_bytes if mem is not None else 0
    total = ((mem.argument_size_in_bytes + mem.output_size_in_bytes + temp
              - mem.alias_size_in_bytes) if mem is not None else sum(parts.values()))
    return FineTune(batch=batch, temp_bytes=temp, total_bytes=total, flops=cost_of(lowered),
                    **parts)
