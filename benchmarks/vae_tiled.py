"""The strip-by-strip VAE decode (models/vae_tiled.py) against the untiled jitted decode, SD
1.5's VAE (configs/pretrained/sd15/vae/config.json) with random weights:

    python -m benchmarks.vae_tiled [--rows 8] [--size 512] [--big 4096]

Per-device peak bytes are from XLA's memory_analysis (arguments + outputs + scratch) of the
untiled jitted decode and of the largest strip function; wall time is one decode of `--size`
after a compiling run, max |tiled - untiled| beside it. The `--big` row is compiled on
abstract inputs only (nothing of that size executes).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.models import vae as vae_lib, vae_tiled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pretrained", "sd15", "vae", "config.json")


def random_params(config, seed=0):
    """Fan-in scaled normal weights, norms near identity (numpy on the abstract tree)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name in ("scale", "bias"):
            return jnp.asarray((name == "scale") + 0.1 * noise)
        return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))

    return jax.tree_util.tree_map_with_path(draw, vae_lib.abstract_params(config))


def timed(fn):
    fn()  # compiles
    start = time.perf_counter()
    out = np.asarray(fn())
    return out, time.perf_counter() - start


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.3f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8, help="latent rows per strip")
    p.add_argument("--size", type=int, default=512, help="output size that runs")
    p.add_argument("--big", type=int, default=4096, help="output size compiled only")
    args = p.parse_args()
    with open(CONFIG) as f:
        config = vae_lib.VAEConfig.from_hf(json.load(f))
    factor = config.downsample_factor
    model = vae_lib.AutoencoderKL(config)
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
    params = random_params(config)
    abstract = vae_lib.abstract_params(config)
    latent = args.size // factor
    z = jax.random.normal(jax.random.PRNGKey(1), (1, latent, latent, config.latent_channels))

    def latents_of(size):
        return jax.ShapeDtypeStruct((1, size // factor, size // factor, config.latent_channels),
                                    jnp.float32)

    def strip_peaks(size):
        """(bytes, label) of the largest strip function, and of the largest conv strip."""
        compiled = vae_tiled.compile_strips(config, abstract, latents_of(size).shape,
                                            rows=args.rows)
        peaks = sorted((vae_tiled.peak_bytes(c), label) for label, c in compiled.items())
        return peaks[-1], max(p for p in peaks if "attentions" not in p[1])

    want, untiled_s = timed(lambda: decode(params, z))
    got, tiled_s = timed(lambda: vae_tiled.decode_tiled(config, params, z, rows=args.rows))
    untiled_peak = vae_tiled.peak_bytes(decode.lower(abstract, latents_of(args.size)).compile())
    big_untiled = vae_tiled.peak_bytes(decode.lower(abstract, latents_of(args.big)).compile())
    (small_tiled, small_label), _ = strip_peaks(args.size)
    (big_tiled, big_label), (big_conv, big_conv_label) = strip_peaks(args.big)
    print(f"SD 1.5 VAE decode, random weights, batch 1, float32, {jax.default_backend()}, "
          f"strips of {args.rows} latent rows; max |tiled - untiled| = "
          f"{np.abs(got - want).max():.2e}\n")
    print("| output | decode | peak device bytes (largest function) | wall time |")
    print("|---|---|---|---|")
    print(f"| {args.size}x{args.size} | untiled | {gib(untiled_peak)} | {untiled_s:.2f} s |")
    print(f"| {args.size}x{args.size} | tiled | {gib(small_tiled)} ({small_label}) | "
          f"{tiled_s:.2f} s |")
    print(f"| {args.big}x{args.big} | untiled | {gib(big_untiled)} | (compiled only) |")
    print(f"| {args.big}x{args.big} | tiled | {gib(big_tiled)} ({big_label}) | "
          "(compiled only) |")
    print(f"| {args.big}x{args.big} | tiled, convs only | {gib(big_conv)} ({big_conv_label}) | "
          "(compiled only) |")


if __name__ == "__main__":
    main()
