"""Plan a training run without running it: compile the train step for a mesh of N devices on
abstract inputs and report parameters, per-device memory and FLOPs per step.

    python -m train --config configs/base64.py:D --dry_run --devices 256 \
        --config.train.batch_size=2048 [--device_memory_gib 80] [--config.mesh.shape="(-1,8,1)"]

Nothing is allocated: state and batch are jax.ShapeDtypeStructs carrying the trainer's
shardings, and the step is only lowered and compiled, never run. On a CPU-only host the N
devices are simulated XLA CPU devices (prepare_host), so a 256-GPU layout can be checked on a
laptop; its memory figures come from the CPU compiler's buffer assignment, an estimate of what
a GPU/TPU compiler (which fuses differently) will need. Exit status of the CLI: 0 when the
layout fits `device_memory_gib`, 3 when it does not, 2 for a bad config or layout.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from ediffi_jax.config import ConfigError
from ediffi_jax.models.unet import UNet, boxed_init
from ediffi_jax.parallel.host import configure_cpu_host
from ediffi_jax.parallel.mesh import batch_sharding, logical_shardings
from ediffi_jax.rng import Stream, stream
from ediffi_jax.runs.checkpoint import abstract_like
from ediffi_jax.runs.spec import check_stage_sizes, image_resolution, parse_run
from ediffi_jax.training.step import init_state, make_optimizer, state_shardings
from ediffi_jax.training.trainer import check_layout, jit_train_step, run_mesh

GIB = 2**30
NOT_FIT = 3  # CLI exit status when the layout does not fit


def cost_of(compiled) -> float:
    """XLA's FLOP count of a compiled (or lowered) program, from its cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returns one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


_FORCED = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def prepare_host(devices: int | None) -> None:
    """Before jax initialises a backend: make `devices` simulated CPU devices (a CPU host has
    one real one), and skip LLVM's optimisation passes, which cost compile time and do not
    change buffer sizes or FLOPs; the program is never run. A device count already forced in
    XLA_FLAGS is kept; plan_run says if it is too small."""
    configure_cpu_host(devices=devices)
    flags = os.environ["XLA_FLAGS"]
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0"


def _devices(n: int | None) -> list:
    """The first n devices: the default backend's if it has enough, else simulated CPU ones."""
    devices = jax.devices()
    if n is None:
        return devices
    if n < 1:
        raise ConfigError(f"--devices must be >= 1, got {n}")
    if len(devices) < n:
        cpu = jax.devices("cpu")
        if len(cpu) < n:
            forced = _FORCED.findall(os.environ.get("XLA_FLAGS", ""))
            why = (f"XLA_FLAGS forces {forced[-1]} host devices; unset it or set it to {n}"
                   if forced else f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                   "before jax starts (python -m train --dry_run does)")
            raise ConfigError(f"--devices {n}: only {max(len(devices), len(cpu))} devices "
                              f"available here; {why}")
        devices = cpu
    return devices[:n]


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs. NamedSharding shards are
    even (mesh.py replicates a dim the mesh does not divide), so device 0 is every device."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a dry run found; sizes are bytes per device."""

    name: str
    platform: str
    devices: int
    mesh: dict[str, int]
    batch_size: int
    per_device_batch: int  # of each microbatch
    grad_accum: int
    experts: int
    params: int  # of the one expert this run trains
    params_bytes: int
    optimizer_bytes: int
    ema_bytes: int
    batch_bytes: int
    temp_bytes: int  # activations and other temporaries of the compiled step
    total_bytes: int  # arguments + outputs + temporaries - donated (aliased) buffers
    flops_per_device: float  # XLA's cost analysis of the partitioned (per-device) program
    device_memory: int
    remat: bool
    dtype: str

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.device_memory

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_device * self.devices

    def suggestions(self) -> list[str]:
        """Ways to shrink per-device memory that this layout does not use yet, the ones for
        the larger part (state or activations) first."""
        data, fsdp, tensor = self.mesh["data"], self.mesh["fsdp"], self.mesh["tensor"]
        state = self.params_bytes + self.optimizer_bytes + self.ema_bytes
        for_state, for_activations = [], []
        if data > 1:  # fsdp shards params, optimizer and EMA; the batch split stays the same
            k = 2 if data % 2 == 0 else data
            while (data % (2 * k) == 0 and self.temp_bytes < self.device_memory
                   and state / k + self.temp_bytes > self.device_memory):
                k *= 2
            for_state.append(f'more fsdp (--config.mesh.shape="({data // k},{fsdp * k},{tensor})")')
        if self.per_device_batch % 2 == 0:  # activations scale with the microbatch
            k = 2
            while (self.per_device_batch % (2 * k) == 0 and state < self.device_memory
                   and state + self.temp_bytes / k > self.device_memory):
                k *= 2
            for_activations.append(f"grad_accum (--config.train.grad_accum={self.grad_accum * k})")
        if not self.remat:
            for_activations.append("remat (--config.model.remat=True)")
        if self.dtype == "float32":
            for_activations.append("bf16 compute (--config.model.dtype=bfloat16)")
        return (for_state + for_activations if state > self.temp_bytes
                else for_activations + for_state)

    def report(self) -> list[str]:
        size = lambda b: (f"{b / GIB:9.2f} GiB" if b >= GIB / 10  # noqa: E731
                          else f"{b / 2**20:9.2f} MiB")
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        expert_note = (f"one expert of {self.experts} trains per run" if self.experts > 1
                       else "one model")
        lines = [
            f"config               {self.name}",
            f"mesh                 {mesh} ({self.devices} {self.platform} devices)",
            f"batch                {self.batch_size} global, {self.per_device_batch} per device"
            f" per microbatch, grad_accum {self.grad_accum}",
            f"params               {self.params:,} ({self.params / 1e6:.4g} M; {expert_note})",
            "memory per device:",
            f"  params             {size(self.params_bytes)}",
            f"  optimizer state    {size(self.optimizer_bytes)}",
            f"  EMA params         {size(self.ema_bytes)}",
            f"  batch              {size(self.batch_bytes)}",
            f"  activations, temps {size(self.temp_bytes)}",
            f"  compiled total     {size(self.total_bytes)}  (arguments + outputs + temps"
            " - donated state)",
            f"  ({self.platform} compiler's buffer assignment: an estimate; a GPU/TPU compiler"
            " fuses differently)" if self.platform == "cpu" else
            f"  ({self.platform} compiler's buffer assignment)",
            f"FLOPs per step       {self.flops_per_step:.4g} (XLA counts the partitioned program:"
            f" {self.flops_per_device:.4g} per device, x {self.devices} devices)",
            f"FLOPs per image      {self.flops_per_step / self.batch_size:.4g}"
            " (forward + backward + optimizer)",
        ]
        need, have = size(self.total_bytes).strip(), size(self.device_memory).strip()
        if self.fits:
            lines.append(f"fits: {need} of {have} per device")
        else:
            lines.append(f"does not fit: {need} > {have} per device; try: "
                         + ", ".join(self.suggestions() or ["more devices"]))
        return lines


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    """The trainer's jitted train step for a mesh, and abstract, sharded inputs for it."""

    run: object  # RunSpec
    mesh: jax.sharding.Mesh
    optimizer: object
    state_shardings: object
    step: object  # jax.jit(train_step) with the trainer's shardings and donation
    state: object  # ShapeDtypeStructs
    batch: dict
    interval: object


def plan_step(config, devices: int | None = None) -> PlannedStep:
    """The run's train step as the trainer builds it (ediffi_jax.training.trainer.train), on abstract inputs.
    A mesh or batch that does not fit the devices raises ConfigError before anything compiles."""
    run = parse_run(config)
    tcfg, model = run.train, run.stage.model
    chosen = _devices(devices)
    mesh = run_mesh(run, chosen)
    check_layout(run, mesh)
    check_stage_sizes(run)

    optimizer = make_optimizer(tcfg)
    abstract_boxed = jax.eval_shape(lambda: boxed_init(model, stream(tcfg.seed, Stream.PARAMS)))
    abstract_params = nn.meta.unbox(abstract_boxed)
    param_sh = logical_shardings(abstract_boxed, mesh)
    state_sh = state_shardings(optimizer, abstract_params, param_sh, mesh)
    state = abstract_like(
        jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params), state_sh)

    b, res = tcfg.batch_size, model.resolution
    batch = {
        "image": jax.ShapeDtypeStruct((b, res, res, model.in_channels), jnp.float32),
        "index": jax.ShapeDtypeStruct((b,), jnp.int32),
        "cond": jax.eval_shape(  # text parts only, as the trainer's batches
            lambda: model.zero_conditioning(b).replace(lowres=None, lowres_sigma=None)),
    }
    if model.lowres_scale:  # a super-resolution stage: whole low-res images and patch corners
        low = image_resolution(run) // model.lowres_scale
        batch["lowres"] = jax.ShapeDtypeStruct((b, low, low, model.out_channels), jnp.float32)
        batch["crop"] = jax.ShapeDtypeStruct((b, 2), jnp.int32)
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, x.ndim)),
        batch)
    batch_sh = jax.tree.map(lambda x: x.sharding, batch)

    replicated = NamedSharding(mesh, P())
    # The trainer's own step: same shardings, donation and activation rules.
    step = jit_train_step(UNet(model), tcfg, optimizer, state_sh, mesh, batch_sh)
    return PlannedStep(run=run, mesh=mesh, optimizer=optimizer, state_shardings=state_sh,
                       step=step, state=state, batch=batch,
                       interval=abstract_like(tcfg.sigma_interval(), replicated))


def plan_run(config, *, devices: int | None = None, device_memory_gib: float = 80.0) -> Plan:
    """Compile the run's train step for `devices` devices (default: all here) on abstract,
    sharded state and batch. A mesh or batch that does not fit the devices raises ConfigError
    before anything compiles."""
    planned = plan_step(config, devices)
    compiled = planned.step.lower(planned.state, planned.batch, planned.interval).compile()
    return plan_of(planned, compiled, device_memory_gib)


def plan_of(planned: PlannedStep, compiled, device_memory_gib: float = 80.0) -> Plan:
    """The Plan of a compiled planned step: sizes from its shardings and buffer assignment."""
    run, mesh, state, batch = planned.run, planned.mesh, planned.state, planned.batch
    tcfg, model = run.train, run.stage.model
    b = tcfg.batch_size
    mem = compiled.memory_analysis()
    params_bytes = _per_device_bytes(state.params)
    optimizer_bytes = _per_device_bytes(state.opt_state)
    ema_bytes = _per_device_bytes(state.ema_params)
    batch_bytes = _per_device_bytes(batch)
    if mem is not None:
        temp = mem.temp_size_in_bytes
        total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + temp
                 - mem.alias_size_in_bytes)
    else:  # a backend without memory analysis: state + batch, temporaries unknown
        temp, total = 0, params_bytes + optimizer_bytes + ema_bytes + batch_bytes
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return Plan(
        name=run.stage.name, platform=mesh.devices.flat[0].platform, devices=mesh.size,
        mesh=dict(mesh.shape), batch_size=b, per_device_batch=b // tcfg.grad_accum // shards,
        grad_accum=tcfg.grad_accum, experts=len(run.stage.experts),
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        params_bytes=params_bytes, optimizer_bytes=optimizer_bytes, ema_bytes=ema_bytes,
        batch_bytes=batch_bytes, temp_bytes=temp, total_bytes=total,
        flops_per_device=cost_of(compiled), device_memory=int(device_memory_gib * GIB),
        remat=model.remat, dtype=model.dtype,
    )


def dry_run(config, *, devices: int | None = None, device_memory_gib: float = 80.0,
            log=functools.partial(print, flush=True)) -> int:
    """The CLI's --dry_run: print the plan; 0 if it fits, NOT_FIT if not."""
    plan = plan_run(config, devices=devices, device_memory_gib=device_memory_gib)
    for line in plan.report():
        log(line)
    return 0 if plan.fits else NOT_FIT
