"""Paint-with-words: phrase masks bias the cross-attention logits (eDiff-I, training-free).

In a cross-attention layer at feature size h x w,
    softmax((Q K^T + w * A) / sqrt(d)) V,   w = log(1 + sigma) * stat(Q K^T)
where A [h*w image tokens x text tokens] holds, in the columns of every token of every
occurrence of a painted phrase, that phrase's mask resized to h x w (bilinear, no antialias)
times its strength (the user's w' folded in). stat is the paper's max(Q K^T) or one of the
community's better-behaved choices (cloneofsimo/paint-with-words-sd, AUTOMATIC1111 #4406):

    "max"     log(1 + sigma)   * max(Q K^T)      (the paper)
    "std"     log(1 + sigma)   * std(Q K^T)
    "std_sq"  log(1 + sigma^2) * std(Q K^T)

The statistic is taken per example over heads, image tokens and the real (unmasked) text tokens
of the layer call (the public code takes one max over the whole batch; per example keeps an
image independent of what else is in its batch). The unconditional branch of classifier-free
guidance carries zero masks, so it is untouched.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from ediffi_jax.models.layers import resize_bilinear

WEIGHTS = ("max", "std", "std_sq")


@dataclasses.dataclass(frozen=True)
class PaintSettings:
    """Static paint-with-words settings of a sampling run (part of a segment's settings).

    weight: the statistic above; layers: names of the U-Net's attention blocks that get the
    bias (e.g. "mid_attn", "up2_attn0"); empty means every cross-attention layer."""

    weight: str = "std"
    layers: tuple[str, ...] = ()

    def __post_init__(self):
        if self.weight not in WEIGHTS:
            raise ValueError(f"paint weight must be one of {WEIGHTS}, got {self.weight!r}")
        object.__setattr__(self, "layers", tuple(self.layers))

    def applies_to(self, block: str) -> bool:
        return not self.layers or block in self.layers


def sigma_factor(sigma, weight: str):
    sigma = jnp.asarray(sigma, jnp.float32)
    return jnp.log1p(sigma**2) if weight == "std_sq" else jnp.log1p(sigma)


def layer_masks(paint, height: int, width: int):
    """[B, Hm, Wm, L] token masks -> A [B, 1, h*w, L] at a layer's feature size."""
    a = resize_bilinear(paint.astype(jnp.float32), height, width)
    return a.reshape(a.shape[0], 1, height * width, a.shape[-1])


def bias_fn(paint, sigma, key_mask, height: int, width: int, weight: str):
    """logits [B, H, Nq, Nk] (pre-scaling Q K^T) -> the additive bias w * A."""
    a = layer_masks(paint, height, width)
    factor = sigma_factor(sigma, weight)[:, None, None, None]

    def fn(logits):
        logits = logits.astype(jnp.float32)
        keys = jnp.broadcast_to(key_mask.astype(bool)[:, None, None, :], logits.shape)
        axes = (1, 2, 3)
        if weight == "max":
            stat = jnp.max(jnp.where(keys, logits, -jnp.inf), axis=axes, keepdims=True)
        else:
            n = jnp.maximum(jnp.sum(keys, axis=axes, keepdims=True), 1)
            mean = jnp.sum(jnp.where(keys, logits, 0.0), axis=axes, keepdims=True) / n
            var = jnp.sum(jnp.where(keys, jnp.square(logits - mean), 0.0), axis=axes,
                          keepdims=True) / n
            stat = jnp.sqrt(var)
        return factor * stat * a

    return fn


def cross_attention_bias(paint, sigma, settings: PaintSettings):
    """The U-Net's `cross_attention_bias` for paint-with-words: for each attention block the
    settings name, bias(key_mask, h, w) built from the token masks `paint` [B, Hm, Wm, L] and
    the sampler's noise level `sigma` [B] (data, so one compile serves every step)."""
    def for_block(name: str):
        if not settings.applies_to(name):
            return None
        return lambda key_mask, height, width: bias_fn(paint, sigma, key_mask, height, width,
                                                        settings.weight)

    return for_block
