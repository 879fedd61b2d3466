"""Print a config's parameter count and FLOPs per forward, without allocating the model.

    python -m ediffi_jax.info --config configs/base64.py:D [--batch 1] [--config.model.channels=128]

or plan a diffusers checkpoint from its config.json files alone (pipeline/pretrained_plan.py):
parameters per component, FLOPs per image, per-device memory for sampling and for a full
fine-tune of its U-Net on a mesh (exit status 3 when the fine-tune does not fit):

    python -m ediffi_jax.info --pretrained configs/pretrained/sd15 [--size 512x512] \
        [--steps 25] [--batch 1] [--devices 8 --mesh 1,8,1] [--device-memory-gib 80]

FLOPs come from XLA's cost analysis of the compiled forward on abstract inputs
(jax.ShapeDtypeStruct), so even the paper-size model needs no memory for weights.
"""
from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp

from ediffi_jax.config import ConfigError, load_config, parse_mesh, parse_size, split_overrides
from ediffi_jax.encoders.hf import CheckpointError
from ediffi_jax.models.unet import UNet, UNetConfig, abstract_params
from ediffi_jax.pipeline.pretrained_plan import plan_pretrained
from ediffi_jax.runs.spec import parse_config
from ediffi_jax.training.dry_run import cost_of


def forward_flops(model: UNetConfig, batch: int = 1, resolution: int | None = None) -> float:
    res = resolution or model.resolution
    params = abstract_params(model)
    x = jax.ShapeDtypeStruct((batch, res, res, model.in_channels), jnp.float32)
    c_noise = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cond = jax.eval_shape(lambda: model.zero_conditioning(batch))
    fwd = jax.jit(lambda p, x, c, cond: UNet(model).apply({"params": p}, x, c, cond))
    return cost_of(fwd.lower(params, x, c_noise, cond).compile())


def _pretrained(args) -> int:
    try:
        plan = plan_pretrained(
            args.pretrained, size=parse_size(args.size) if args.size else None,
            batch=args.batch, steps=args.steps, cfg=not args.no_cfg,
            devices=args.devices, mesh_shape=parse_mesh(args.mesh), dtype=args.dtype,
            device_memory_gib=args.device_memory_gib, finetune_batch=args.finetune_batch,
            finetune=not args.no_finetune)
    except (ConfigError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(plan.report()))
    fits = plan.finetune is None or plan.finetune.total_bytes <= plan.device_memory
    return 0 if fits else 3


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="configs/X.py or configs/X.py:ARG")
    which.add_argument("--pretrained", help="a diffusers pipeline or U-Net folder (only its "
                       "config.json files are read)")
    parser.add_argument("--batch", type=int, default=1)
    g = parser.add_argument_group("--pretrained")
    g.add_argument("--size", help="HxW image size (default: the U-Net's sample_size x the VAE "
                   "factor)")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--no-cfg", action="store_true", help="one branch per step, not two")
    g.add_argument("--devices", type=int, help="devices of the mesh (simulated on a CPU host)")
    g.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor (-1: the rest)")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--device-memory-gib", type=float, default=80.0)
    g.add_argument("--finetune-batch", type=int, help="global fine-tune batch (default: one "
                   "example per data x fsdp shard)")
    g.add_argument("--no-finetune", action="store_true", help="sampling only")
    args = parser.parse_args(rest)
    if args.pretrained:
        if overrides:
            parser.error("--config.* overrides apply to --config, not --pretrained")
        from ediffi_jax.training.dry_run import prepare_host

        prepare_host(args.devices)  # before any jax backend starts
        return _pretrained(args)
    spec = parse_config(load_config(args.config, overrides))
    params = abstract_params(spec.model)
    n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    flops = forward_flops(spec.model, args.batch)
    print(f"config            {spec.name}")
    print(f"experts           {len(spec.experts)}: "
          + ", ".join(f"{iv.name} sigma({iv.sigma_bounds()[0]:.4g}, {iv.sigma_bounds()[1]:.4g}]"
                      for iv in spec.experts))
    print(f"params per expert {n:,} ({n / 1e6:.1f} M)")
    print(f"params, ensemble  {n * len(spec.experts):,} ({n * len(spec.experts) / 1e6:.1f} M)")
    print(f"forward FLOPs     {flops:.4g} at batch {args.batch}, "
          f"{spec.model.resolution}x{spec.model.resolution} ({flops / args.batch / 1e9:.2f} GFLOP per image)")
    print("(one expert runs per step, so per-step cost is one network's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
