"""A super-resolution stage's low-resolution input: upsampled to the stage's size, then noised
to a level sigma_aug that the network is told (noise-conditioning augmentation, as in Imagen and
NVIDIA's JAX Imagen, which feeds the level EDM-preconditioned: c_in(sigma_aug) scales the input,
c_noise(sigma_aug) is embedded; see models/unet.py). Training draws sigma_aug at random so the
stage learns to ignore the previous stage's artefacts; sampling uses a small fixed level.

One upsampling for training, sampling and the bicubic baseline of the benchmarks.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ediffi_jax.rng import Stream



def upsample(lowres, size: int):
    """[B, h, w, C] -> [B, size, size, C], bicubic (Keys, a = -0.5), not clipped."""
    b, _, _, c = lowres.shape
    return jax.image.resize(lowres.astype(jnp.float32), (b, size, size, c), method="bicubic")


def crop(images, offsets, size: int):
    """Per-example size x size windows of [B, H, W, C] at top-left `offsets` [B, 2] (y, x):
    the patch a patch-trained stage sees of its upsampled low-res image."""
    window = lambda img, yx: jax.lax.dynamic_slice(  # noqa: E731
        img, (yx[0], yx[1], 0), (size, size, img.shape[-1]))
    return jax.vmap(window)(images, offsets.astype(jnp.int32))


def sample_sigma(key, sigma_range: tuple[float, float]):
    """One sigma_aug, log-uniform on [lo, hi] (lo == hi: that level)."""
    lo, hi = (math.log(s) for s in sigma_range)
    return jnp.exp(jax.random.uniform(key, (), jnp.float32, lo, hi))


def augment(key, upsampled, sigma_aug):
    """x_lowres + sigma_aug * noise for one example (key: the example's key)."""
    noise = jax.random.normal(jax.random.fold_in(key, Stream.LOWRES_AUG), upsampled.shape, jnp.float32)
    return upsampled + sigma_aug * noise


def check_sigma_range(sigma_range, where: str) -> tuple[float, float]:
    lo, hi = (float(s) for s in sigma_range)
    if not 0 < lo <= hi:
        raise ValueError(f"{where} must be (lo, hi) with 0 < lo <= hi, got {tuple(sigma_range)}")
    return lo, hi
