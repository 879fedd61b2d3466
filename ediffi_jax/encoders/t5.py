"""The T5 encoder in Flax linen, numerically the Hugging Face `T5EncoderModel`.

Pre-norm blocks with an RMS norm (no mean, no bias), unscaled dot-product attention plus a
learned relative-position bias (computed in the first block, shared by all), and either the
original ReLU feed-forward or T5 v1.1's gated-GELU one. Parameters carry logical axis names:
`embed` (d_model) goes over fsdp, `heads` and `mlp` over tensor, so T5-XXL (4.7 B) shards.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.encoders.hf import config_from_hf
from ediffi_jax.models.layers import Dense, _param, attention

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of a Hugging Face T5 config.json that the encoder reads."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"  # "relu", "gated-gelu" (v1.1), "gelu", "gated-silu", ...
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"  # compute dtype; norms and softmax stay float32

    def __post_init__(self):
        gated, act = self.gating
        if act not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r}: activation {act!r} "
                             f"is not one of {sorted(ACTIVATIONS)}")

    @property
    def gating(self) -> tuple[bool, str]:
        """(gated, activation) as transformers parses feed_forward_proj."""
        parts = self.feed_forward_proj.split("-")
        gated = len(parts) > 1 and parts[0] == "gated"
        act = parts[-1]
        if self.feed_forward_proj == "gated-gelu":
            act = "gelu_new"  # transformers' special case: v1.1 checkpoints use the tanh GELU
        return gated, act

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "T5Config":
        return config_from_hf(cls, hf, **overrides)


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[q_len, k_len] bucket ids of key position - query position (bidirectional), computed as
    transformers does, in float32 where it is (the bucket edges must agree exactly)."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    num_buckets //= 2
    buckets = (rel > 0).astype(np.int64) * num_buckets
    n = np.abs(rel)
    max_exact = num_buckets // 2
    large = max_exact + (  # n < max_exact is taken from `n` below; max(n, 1) avoids log(0)
        np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    ).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(n < max_exact, n, large)


class RMSNorm(nn.Module):
    """T5's layer norm: x / rms(x) * weight, statistics in float32."""

    eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", _param(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * scale).astype(self.dtype)


class T5Block(nn.Module):
    config: T5Config
    has_relative_bias: bool = False

    @nn.compact
    def __call__(self, x, mask, position_bias):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, n, _ = x.shape
        inner = cfg.num_heads * cfg.d_kv
        h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="attention_norm")(x)
        q, k, v = (Dense(inner, ("embed", "heads"), use_bias=False, dtype=dtype, name=nm)(h)
                   .reshape(b, n, cfg.num_heads, cfg.d_kv) for nm in ("q", "k", "v"))
        if self.has_relative_bias:
            table = self.param("relative_attention_bias",
                               _param(nn.initializers.normal(1.0), (None, "heads")),
                               (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
            buckets = relative_position_buckets(n, n, cfg.relative_attention_num_buckets,
                                                cfg.relative_attention_max_distance)
            position_bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # [1, H, N, N]
        o = attention(q, k, v, key_mask=mask, bias=position_bias, scale=1.0)
        x = x + Dense(cfg.d_model, ("heads", "embed"), use_bias=False, dtype=dtype,
                      name="o")(o.reshape(b, n, inner))
        h = RMSNorm(cfg.layer_norm_epsilon, dtype, name="ff_norm")(x)
        gated, act = cfg.gating
        if gated:
            up = ACTIVATIONS[act](Dense(cfg.d_ff, ("embed", "mlp"), use_bias=False, dtype=dtype,
                                        name="wi_0")(h))
            up = up * Dense(cfg.d_ff, ("embed", "mlp"), use_bias=False, dtype=dtype, name="wi_1")(h)
        else:
            up = ACTIVATIONS[act](Dense(cfg.d_ff, ("embed", "mlp"), use_bias=False, dtype=dtype,
                                        name="wi")(h))
        x = x + Dense(cfg.d_model, ("mlp", "embed"), use_bias=False, dtype=dtype, name="wo")(up)
        return x, position_bias


class T5Encoder(nn.Module):
    """input_ids [B, N] int, attention_mask [B, N] (1 = token) -> last hidden state [B, N, D]
    (float32)."""

    config: T5Config

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        embedding = self.param("embedding", _param(nn.initializers.normal(1.0), ("vocab", "embed")),
                               (cfg.vocab_size, cfg.d_model), jnp.float32)
        x = jnp.take(embedding, input_ids, axis=0).astype(dtype)
        position_bias = None
        for i in range(cfg.num_layers):
            x, position_bias = T5Block(cfg, has_relative_bias=(i == 0), name=f"block_{i}")(
                x, attention_mask, position_bias)
        return RMSNorm(cfg.layer_norm_epsilon, jnp.float32, name="final_norm")(x)


def hf_names(config: T5Config) -> dict[tuple[str, ...], tuple[str, str]]:
    """Flax param path -> (Hugging Face tensor name, how to convert it); "a|b" accepts either
    name (the token embedding is saved as `shared` or as the tied `encoder.embed_tokens`)."""
    names = {("embedding",): ("shared.weight|encoder.embed_tokens.weight", "embedding"),
             ("final_norm", "scale"): ("encoder.final_layer_norm.weight", "norm")}
    gated, _ = config.gating
    for i in range(config.num_layers):
        hf = f"encoder.block.{i}.layer"
        mine = f"block_{i}"
        for p in ("q", "k", "v", "o"):
            names[(mine, p, "kernel")] = (f"{hf}.0.SelfAttention.{p}.weight", "linear")
        names[(mine, "attention_norm", "scale")] = (f"{hf}.0.layer_norm.weight", "norm")
        names[(mine, "ff_norm", "scale")] = (f"{hf}.1.layer_norm.weight", "norm")
        for p in (("wi_0", "wi_1", "wo") if gated else ("wi", "wo")):
            names[(mine, p, "kernel")] = (f"{hf}.1.DenseReluDense.{p}.weight", "linear")
        if i == 0:
            names[(mine, "relative_attention_bias")] = (
                f"{hf}.0.SelfAttention.relative_attention_bias.weight", "embedding")
    return names
