"""Print a config's parameter count and FLOPs per forward, without allocating the model.

    python -m ediffi_jax.info --config configs/base64.py:D [--batch 1] [--config.model.channels=128]

FLOPs come from XLA's cost analysis of the compiled forward on abstract inputs
(jax.ShapeDtypeStruct), so even the paper-size model needs no memory for weights.
"""
from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp

from ediffi_jax.config import load_config, split_overrides
from ediffi_jax.models.unet import UNet, UNetConfig, abstract_params
from ediffi_jax.runs.spec import parse_config


def cost_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returns one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def forward_flops(model: UNetConfig, batch: int = 1, resolution: int | None = None) -> float:
    res = resolution or model.resolution
    params = abstract_params(model)
    x = jax.ShapeDtypeStruct((batch, res, res, model.in_channels), jnp.float32)
    c_noise = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cond = jax.eval_shape(lambda: model.zero_conditioning(batch))
    fwd = jax.jit(lambda p, x, c, cond: UNet(model).apply({"params": p}, x, c, cond))
    return cost_of(fwd.lower(params, x, c_noise, cond).compile())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/X.py or configs/X.py:ARG")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(rest)
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
