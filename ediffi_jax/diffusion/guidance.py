"""Classifier-free guidance: D = D_u + w (D_c - D_u), so w = 1 is the conditional prediction and
w = 0 the unconditional one (the diffusers/eDiff-I convention)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def combine(d_cond, d_uncond, scale):
    return d_uncond + scale * (d_cond - d_uncond)


def guided_denoise(denoise_fn, params, x, sigma, cond, uncond, scale, use_cfg: bool,
                   base_fn=None, cond_text=None, style_scale=None):
    """Evaluate the conditional and unconditional branches in one batched call and combine.

    denoise_fn(params, x, sigma, cond) -> D; `sigma` is per example [B]. With use_cfg False only
    the conditional branch runs (scale is then ignored, as scale 1 would give the same result).
    base_fn (same signature): noise-damped CFG, D = base_fn(uncond) + w (D_c - D_u): the base
    term from a milder model, run on the unconditional half only (3 evaluations, not 4).
    Combining denoised values equals combining noise predictions: D = x - sigma * eps is affine.
    cond_text + style_scale: separate style guidance, D = D_u + w (D_text - D_u) + w_style
    (D_c - D_text), where cond_text is cond without the style (CLIP image) embedding.
    """
    if not use_cfg:
        return denoise_fn(params, x, sigma, cond)
    if cond_text is not None:
        batch = x.shape[0]
        three = jax.tree.map(lambda c, t, u: jnp.concatenate([c, t, u], axis=0), cond, cond_text,
                             uncond)
        d = denoise_fn(params, jnp.concatenate([x, x, x], axis=0),
                       jnp.concatenate([sigma, sigma, sigma], axis=0), three)
        d_c, d_t, d_u = d[:batch], d[batch:2 * batch], d[2 * batch:]
        return d_u + scale * (d_t - d_u) + style_scale * (d_c - d_t)
    if base_fn is not None:
        batch = x.shape[0]
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
        d = denoise_fn(params, jnp.concatenate([x, x], axis=0),
                       jnp.concatenate([sigma, sigma], axis=0), both)
        return base_fn(params, x, sigma, uncond) + scale * (d[:batch] - d[batch:])
    batch = x.shape[0]
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
    d = denoise_fn(
        params,
        jnp.concatenate([x, x], axis=0),
        jnp.concatenate([sigma, sigma], axis=0),
        both,
    )
    return combine(d[:batch], d[batch:], scale)
