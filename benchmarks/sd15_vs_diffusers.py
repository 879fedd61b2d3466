"""The SD 1.5 U-Net and VAE at their real size (random weights) on CPU: this project's Flax
port against diffusers on PyTorch, alternating in one run.

    python -m benchmarks.sd15_vs_diffusers [--rounds 3] [--iters 1] [--size 64] [--dtype float32]

Work per call, both sides: `cfg_step` = one classifier-free-guidance step at 512 x 512 (64 x 64
latents, the conditional and unconditional branch in one U-Net call of batch 2, a 77 x 768
context) with the guidance combination and an Euler update; `decode` = the VAE decoder on one
64 x 64 latent (a 512 x 512 image). JAX: jitted, float32 params (compute `--dtype`), XLA
attention. torch: benchmarks/_torch_sd15_worker.py in the tools venv, float32, SDPA, 2
threads. Rounds alternate the sides; reported: median s/call per side and the median of the
per-round ratios JAX / torch (target: <= 1.0).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS_PYTHON = os.path.join(ROOT, ".venv-tools", "bin", "python")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=1)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from ediffi_jax.models import diffusers_unet, vae as vae_lib

    with open(os.path.join(ROOT, "configs/pretrained/sd15/unet/config.json")) as f:
        unet_config = diffusers_unet.DiffusersUNetConfig.from_hf(json.load(f))
    with open(os.path.join(ROOT, "configs/pretrained/sd15/vae/config.json")) as f:
        vae_config = vae_lib.VAEConfig.from_hf(json.load(f))
    dtype = jnp.dtype(args.dtype)
    unet = diffusers_unet.DiffusersUNet(unet_config, dtype=dtype)
    vae = vae_lib.AutoencoderKL(vae_config, dtype=dtype)
    unet_params = diffusers_unet.init_params(unet_config, jax.random.key(0))
    vae_params = vae_lib.init_params(vae_config, jax.random.key(1))
    latents = jax.random.normal(jax.random.key(2), (1, args.size, args.size, 4))
    context = jax.random.normal(jax.random.key(3), (2, 77, 768))
    t = jnp.full((2,), 500.0)

    @jax.jit
    def cfg_step(params, latents, context):
        x_in = jnp.concatenate([latents, latents]) / (1 + 14.6 ** 2) ** 0.5
        out = unet.apply({"params": params}, x_in, t, context)
        uncond, cond = jnp.split(out, 2)
        return latents + (-0.5) * (uncond + 7.5 * (cond - uncond))

    @jax.jit
    def decode(params, latents):
        return vae.apply({"params": params}, latents / vae_config.scaling_factor, method="decode")

    jax_work = {"cfg_step": lambda: cfg_step(unet_params, latents, context),
                "decode": lambda: decode(vae_params, latents)}
    for fn in jax_work.values():  # compile
        jax.block_until_ready(fn())

    worker = subprocess.Popen([TOOLS_PYTHON, os.path.join(ROOT, "benchmarks", "_torch_sd15_worker.py"),
                               "--size", str(args.size)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    ready = json.loads(worker.stdout.readline())
    print(f"torch {ready['torch']} ({ready['threads']} threads), U-Net {ready['unet_params'] / 1e6:.2f} M "
          f"params; jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)

    def torch_times(what):
        worker.stdin.write(json.dumps({"cmd": "time", "what": what, "iters": args.iters}) + "\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())["times"]

    def jax_times(what):
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            jax.block_until_ready(jax_work[what]())
            times.append(time.perf_counter() - start)
        return times

    results = {}
    for what in jax_work:
        torch_seconds, jax_seconds = [], []
        for r in range(args.rounds):
            order = (torch_times, jax_times) if r % 2 == 0 else (jax_times, torch_times)
            got = {fn: statistics.median(fn(what)) for fn in order}
            torch_seconds.append(got[torch_times])
            jax_seconds.append(got[jax_times])
        ratios = [j / t for j, t in zip(jax_seconds, torch_seconds)]
        results[what] = (statistics.median(jax_seconds), statistics.median(torch_seconds),
                         statistics.median(ratios), min(ratios), max(ratios))
        print(f"{what:9s} jax {results[what][0]:7.2f} s  torch {results[what][1]:7.2f} s  "
              f"jax/torch {results[what][2]:.3f} (min {results[what][3]:.3f}, max "
              f"{results[what][4]:.3f})", flush=True)
    worker.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
    worker.stdin.flush()
    worker.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
