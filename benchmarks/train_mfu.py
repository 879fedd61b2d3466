"""Train-step throughput against the hardware: model FLOPs utilisation, and peak device memory
against the dry-run planner's estimate, for the step the trainer runs.

    python -m benchmarks.train_mfu [--config configs/base64.py:A] [--batch-per-device 32]
        [--steps 10] [--peak-tflops T] [--config.model.remat=True ...]

The step is `ediffi_jax.training.dry_run.plan_step`'s (the trainer's shardings, donation and mesh over all
devices here), compiled once: the planner's figures (`plan_of`: buffer assignment of this very
program) and the run come from the same executable. State is initialised on the devices (real
params, AdamW moments, EMA), the batch is random images and conditioning; `--steps` steps run
back to back after 2 untimed ones, and the time is from the first to the last one finished.

- MFU = model FLOPs per step / (seconds per step x devices x peak FLOP/s per device). Model
  FLOPs are the matmuls and convolutions of the forward and backward (2 per multiply-add, the
  jaxpr walk of benchmarks/vs_diffusers.py, grad-accumulation scans times their length), the
  convention of MFU figures: no elementwise work, and no recompute (the step is traced again
  with model.remat off for the count, since the walk would count remat's second forward).
  XLA's own cost analysis (`compiled.cost_analysis()`, the planner's figure) is printed beside
  it but is not the model count: it counts a while loop's body once (grad_accum A: 1/A of the
  step), skips the zero-padding taps of SAME convolutions, and adds elementwise work and
  remat's recompute. The peak is the dense bf16 tensor-core figure of the device kind (H100 /
  H200 SXM 989 TFLOP/s, A100 312), or `--peak-tflops`.
- Memory: the device's peak bytes in use (`memory_stats()`, GPU/TPU; CPU has none) against the
  planner's per-device total (arguments + outputs + temporaries - donated).

The issue's bar: the paper's 64x64 base model in bf16 on an H100 at >= 45% MFU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "B200": 2250.0}


def peak_tflops(device_kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_kind.upper()), None)


def random_inputs(planned, seed: int = 0):
    """Real state (the trainer's init, sharded as it shards it) and a random batch."""
    import jax
    import jax.numpy as jnp

    from ediffi_jax.models.unet import boxed_init
    from ediffi_jax.parallel.mesh import sharded_init
    from ediffi_jax.training.step import init_state

    model, tcfg = planned.run.stage.model, planned.run.train
    params, _ = sharded_init(lambda: boxed_init(model, jax.random.key(seed)), planned.mesh)
    state = jax.jit(lambda p: init_state(p, planned.optimizer),
                    out_shardings=planned.state_shardings)(params)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(planned.batch)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))

    def fill(key, path, x):
        if "mask" in jax.tree_util.keystr(path):  # every token present
            return jnp.ones(x.shape, x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jax.random.normal(key, x.shape, x.dtype)
        return jnp.zeros(x.shape, x.dtype)  # indices and crop corners

    batch = jax.jit(lambda ks: jax.tree.unflatten(treedef, [fill(k, *leaf) for k, leaf in zip(ks, leaves)]),
                    out_shardings=jax.tree.map(lambda x: x.sharding, planned.batch))(keys)
    batch["index"] = jax.device_put(jnp.arange(tcfg.batch_size, dtype=jnp.int32),
                                    planned.batch["index"].sharding)
    return state, batch


def model_flops_per_step(planned, state, batch, interval) -> float:
    """Convs and dots (2 per multiply-add) of the planned step's forward and backward, traced
    (not compiled) with model.remat off: remat changes what runs, not the model's FLOPs."""
    import dataclasses
    import functools

    import jax

    from benchmarks.vs_diffusers import matmul_flops
    from ediffi_jax.models.unet import UNet
    from ediffi_jax.training.step import train_step

    model = dataclasses.replace(planned.run.stage.model, remat=False)
    step = functools.partial(train_step, unet=UNet(model), cfg=planned.run.train,
                             optimizer=planned.optimizer)
    return matmul_flops(jax.make_jaxpr(step)(state, batch, interval).jaxpr)


def measure(config, *, steps: int = 10, peak: float | None = None) -> dict:
    """Compile the planned step, run it, and report throughput, MFU and memory."""
    import jax

    from ediffi_jax.training.dry_run import plan_of, plan_step

    planned = plan_step(config)
    interval = jax.device_put(planned.run.train.sigma_interval(), planned.interval.sharding)
    compiled = planned.step.lower(planned.state, planned.batch, interval).compile()
    plan = plan_of(planned, compiled)
    state, batch = random_inputs(planned)
    model_flops = model_flops_per_step(planned, state, batch, interval)
    for _ in range(2):
        state, metrics = compiled(state, batch, interval)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, interval)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - t) / steps
    if int(state.nonfinite_total):  # a skipped update is cheaper: the time would not count
        raise RuntimeError(f"{int(state.nonfinite_total)} of the steps were non-finite and skipped")
    device = jax.devices()[0]
    n = planned.mesh.size
    peak = peak if peak is not None else peak_tflops(device.device_kind)
    stats = device.memory_stats() or {}
    return {
        "device": f"{n} x {device.device_kind}", "config": plan.name, "dtype": plan.dtype,
        "params": plan.params, "batch": plan.batch_size, "steps_run": int(state.step),
        "loss": float(metrics["loss"]), "seconds_per_step": seconds,
        "images_per_second": plan.batch_size / seconds,
        "model_flops_per_step": model_flops, "xla_flops_per_step": plan.flops_per_step,
        "model_tflops_per_device": model_flops / seconds / n / 1e12,
        "peak_tflops": peak,
        "mfu": model_flops / seconds / n / (peak * 1e12) if peak else None,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "planned_bytes": plan.total_bytes,
    }


def main(argv=None) -> int:
    from ediffi_jax.config import load_config, split_overrides
    from ediffi_jax.runs.spec import run_schema

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_mfu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/base64.py:A")
    p.add_argument("--batch-per-device", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (default: by device kind)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(rest)
    import jax

    config = load_config(args.config, [f"--config.train.batch_size="
                                       f"{args.batch_per_device * jax.device_count()}"]
                         + overrides, run_schema())
    r = measure(config, steps=args.steps, peak=args.peak_tflops)
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    mfu = "n/a (no peak known for this device; --peak-tflops)" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(f"{datetime.date.today()}  {r['device']}, jax {jax.__version__}: {r['config']} "
          f"({r['params'] / 1e6:.1f} M params, {r['dtype']}), batch {r['batch']}")
    print(f"  {r['seconds_per_step'] * 1e3:.1f} ms/step, {r['images_per_second']:.1f} images/s; "
          f"loss {r['loss']:.4f} after {r['steps_run']} steps")
    print(f"  model FLOPs/step {r['model_flops_per_step']:.4g} (XLA cost analysis "
          f"{r['xla_flops_per_step']:.4g}): {r['model_tflops_per_device']:.1f} TFLOP/s per "
          f"device, MFU {mfu}")
    print(f"  memory per device: peak in use {gib(r['peak_bytes_in_use'])}, "
          f"planner {gib(r['planned_bytes'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
