"""Classifier-free guidance: D = D_u + w (D_c - D_u), so w = 1 is the conditional prediction and
w = 0 the unconditional one (the diffusers/eDiff-I convention)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
    batch = x.shape[0]
    branches = [cond, uncond] if cond_text is None else [cond, cond_text, uncond]
    stacked = jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=0), *branches)
    n = len(branches)
    d = denoise_fn(params, jnp.concatenate([x] * n, axis=0), jnp.concatenate([sigma] * n, axis=0),
                   stacked)
    d_c, d_u = d[:batch], d[(n - 1) * batch:]
    if cond_text is not None:
        d_t = d[batch:2 * batch]
        return d_u + scale * (d_t - d_u) + style_scale * (d_c - d_t)
    base = base_fn(params, x, sigma, uncond) if base_fn is not None else d_u
    return base + scale * (d_c - d_u)
