"""The SD 1.5 U-Net forward (random weights, batch 2 at 64 x 64 latents, 77 x 768 context) on
the CPU with layers.CPU_QUERY_BLOCK at each given size (a size above every token count is the
unblocked path), alternating in one run; median seconds per call.

    PYTHONPATH=. .venv/bin/python -m benchmarks.sd15_attention_blocks 512 1024 256 100000
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import ediffi_jax.models.layers as layers
from ediffi_jax.models import diffusers_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    blocks = [int(a) for a in (sys.argv[1:] if argv is None else argv)] or [512, 100000]
    with open(os.path.join(ROOT, "configs/pretrained/sd15/unet/config.json")) as f:
        config = diffusers_unet.DiffusersUNetConfig.from_hf(json.load(f))
    unet = diffusers_unet.DiffusersUNet(config)
    params = diffusers_unet.init_params(config, jax.random.key(0))
    x = jax.random.normal(jax.random.key(2), (2, 64, 64, 4))
    context = jax.random.normal(jax.random.key(3), (2, 77, 768))
    t = jnp.full((2,), 500.0)
    compiled = {}
    for block in blocks:  # the block size is read at trace time
        layers.CPU_QUERY_BLOCK = block
        fn = jax.jit(lambda p, x, c: unet.apply({"params": p}, x, t, c))
        compiled[block] = fn.lower(params, x, context).compile()
        compiled[block](params, x, context).block_until_ready()
    times = {b: [] for b in compiled}
    for _ in range(3):
        for block, fn in compiled.items():
            start = time.perf_counter()
            fn(params, x, context).block_until_ready()
            times[block].append(time.perf_counter() - start)
    for block, ts in times.items():
        print(f"CPU_QUERY_BLOCK {block:>7}: {np.median(ts):.3f} s per forward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
