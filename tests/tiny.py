"""The smallest U-Net that still has every kind of block, and random params for it.

Params come from numpy on the abstract tree: the library's init compiles one RNG kernel per
tensor (seconds on CPU), which tests that don't test init need not pay."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.models.unet import UNetConfig, abstract_params


def tiny_unet_config(**overrides) -> UNetConfig:
    kw = dict(
        resolution=16, channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(8,), attention_head_dim=4, context_dim=8,
        t5_dim=6, t5_length=3, clip_dim=5, clip_length=4, clip_pooled_dim=5, clip_image_dim=7,
    )
    kw.update(overrides)
    return UNetConfig(**kw)


@functools.lru_cache(maxsize=None)
def tiny_params(config: UNetConfig, seed: int = 0):
    """Random params in which every layer contributes (unlike a fresh init, whose output convs
    are zero): kernels ~ N(0, 1/fan_in), norm scales near 1, small biases."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            fan_in = math.prod(leaf.shape[:-1])
            return jnp.asarray(rng.normal(0, 1 / math.sqrt(fan_in), leaf.shape), jnp.float32)
        base = 1.0 if "scale" in name else 0.0
        return jnp.asarray(base + 0.05 * rng.normal(size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract_params(config))


def tiny_conditioning(config: UNetConfig, batch: int, seed: int = 0):
    """Random, non-trivial conditioning (half the T5 and CLIP tokens masked out)."""
    c = config.zero_conditioning(batch)
    keys = iter(jax.random.split(jax.random.key(100 + seed), 8))
    rand = lambda x: jax.random.normal(next(keys), x.shape)  # noqa: E731
    t5_mask = (jnp.arange(config.t5_length) < (config.t5_length + 1) // 2).astype(jnp.float32)
    clip_mask = (jnp.arange(config.clip_length) < (config.clip_length + 1) // 2).astype(jnp.float32)
    return c.replace(
        t5_tokens=rand(c.t5_tokens) * t5_mask[:, None], t5_mask=jnp.broadcast_to(t5_mask, c.t5_mask.shape),
        clip_tokens=rand(c.clip_tokens) * clip_mask[:, None],
        clip_mask=jnp.broadcast_to(clip_mask, c.clip_mask.shape),
        clip_pooled=rand(c.clip_pooled), clip_image=rand(c.clip_image),
    )
