"""diffusers' UNet2DConditionModel (Stable Diffusion 1.x / 2.x, SDXL base and refiner) in Flax:
the second network family behind the project's sampler, plan and loader.

Submodule names are diffusers' dotted names relative to their parent ("down_blocks.2",
"resnets.0", "to_out.0"), so ".".join(param path) is the state-dict name (hf.diffusers_names
maps them 1:1) and a conv's diffusers name (`down_blocks.2.resnets.0.conv1`, as ScaleCrafter's
settings files write it) is its layer path with "/" read as "." (`conv_settings` takes either).
Every kxk conv goes through layers.Conv, so plans re-dilate them like the project's own U-Net's.

A config field or value outside what is ported is an error naming it, never a silent default.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from ediffi_jax.models.layers import (
    Conv, ConvSetting, ConvSettings, Dense, GroupNorm, attention, upsample_nearest,
)

Dtype = Any
BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path")
# Transformer blocks (SD, SDXL), plain resnets, and DeepFloyd IF's: resnets that resample
# themselves and attention with the text's keys / values added to the pixels' own.
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D", "SimpleCrossAttnDownBlock2D",
               "ResnetDownsampleBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D", "SimpleCrossAttnUpBlock2D",
             "ResnetUpsampleBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn", None)
# IF's block types: they resample with a resnet, and their attention is the added-KV kind.
IF_BLOCKS = ("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D",
             "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")
ACTIVATIONS = {"silu": nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
# Fields whose value must be one of these for this port (diffusers' default first).
PORTED_VALUES = {
    "mid_block_type": MID_BLOCKS,
    "act_fn": tuple(ACTIVATIONS),
    "time_embedding_type": ("positional",),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "resnet_skip_time_act": (False, True),
    "encoder_hid_dim_type": (None, "text_proj"),
    "addition_embed_type": (None, "text_time", "text"),
    "class_embed_type": (None, "timestep"),
    "class_embeddings_concat": (False,),
    "num_class_embeds": (None,),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "time_embedding_act_fn": (None,) + tuple(ACTIVATIONS),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "cross_attention_norm": (None, "group_norm", "layer_norm"),
}


def _per_block(value, n: int, field: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"UNet2DConditionModel config {field}: {len(values)} entries for {n} "
                         "blocks")
    return values


@dataclasses.dataclass(frozen=True)
class DiffusersUNetConfig:
    """UNet2DConditionModel's config fields, with diffusers' defaults."""

    sample_size: Any = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: Any = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: Any = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: Any = 1280
    transformer_layers_per_block: Any = 1
    reverse_transformer_layers_per_block: Any = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: Any = 8
    num_attention_heads: Any = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        def freeze(v):  # JSON lists -> tuples, so the config is hashable (a static argument)
            return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v

        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, freeze(getattr(self, f.name)))
        if self.encoder_hid_dim is not None and self.encoder_hid_dim_type is None:
            object.__setattr__(self, "encoder_hid_dim_type", "text_proj")  # as diffusers does
        if self.encoder_hid_dim_type == "text_proj" and self.encoder_hid_dim is None:
            raise ValueError("UNet2DConditionModel config encoder_hid_dim_type='text_proj' "
                             "needs encoder_hid_dim")
        for field, allowed in PORTED_VALUES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"UNet2DConditionModel config {field}={getattr(self, field)!r} "
                                 f"is not ported (this port reads {list(allowed)})")
        for field, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            bad = [t for t in getattr(self, field) if t not in allowed]
            if bad:
                raise ValueError(f"UNet2DConditionModel config {field}: block types {bad} are "
                                 f"not ported (this port reads {list(allowed)})")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("UNet2DConditionModel config: down_block_types, up_block_types "
                             f"and block_out_channels need the same length, got "
                             f"{len(self.down_block_types)}, {len(self.up_block_types)}, {n}")
        # (SD's mid block and its blocks without attention ignore the flag, as diffusers'.)
        sd_cross = [t for types, kind in ((self.down_block_types, "down"),
                                          (self.up_block_types, "up"))
                    for t, only in zip(types, self.cross_only(kind))
                    if only and t.startswith("CrossAttn")]
        if sd_cross:
            raise ValueError(f"UNet2DConditionModel config only_cross_attention=True is ported "
                             f"for IF's added-KV attention only, not for {sorted(set(sd_cross))}")
        if self.norm_num_groups is None:
            raise ValueError("UNet2DConditionModel config norm_num_groups=None is not ported")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise ValueError("UNet2DConditionModel config conv_in_kernel / conv_out_kernel "
                             "must be odd")
        if self.addition_embed_type == "text_time" and (
                self.addition_time_embed_dim is None
                or self.projection_class_embeddings_input_dim is None):
            raise ValueError("UNet2DConditionModel config addition_embed_type='text_time' needs "
                             "addition_time_embed_dim and projection_class_embeddings_input_dim")
        for field in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            _per_block(getattr(self, field), n, field)
        heads = self.heads
        bad = [(c, h) for c, h in zip(self.block_out_channels, heads) if c % h]
        if bad:
            raise ValueError(f"UNet2DConditionModel config: block channels / attention heads "
                             f"{bad} do not divide")
        bad = [(c, d) for c, d in zip(self.block_out_channels, self.head_dims) if c % d]
        if bad and any(t in IF_BLOCKS for t in self.down_block_types + self.up_block_types):
            raise ValueError(f"UNet2DConditionModel config: block channels / attention_head_dim "
                             f"{bad} do not divide")

    @classmethod
    def from_hf(cls, config_json: Mapping) -> "DiffusersUNetConfig":
        """From a diffusers unet/config.json dict; unknown fields are an error naming them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config_json if k not in fields and k not in BOOKKEEPING)
        if unknown:
            raise ValueError(f"unsupported UNet2DConditionModel config fields: {unknown}")
        return cls(**{k: v for k, v in config_json.items() if k in fields})

    # Per-block values as diffusers derives them.
    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers' legacy `attention_head_dim` is the
        number of heads when num_attention_heads is unset)."""
        return _per_block(self.num_attention_heads or self.attention_head_dim, self.levels,
                          "num_attention_heads")

    @property
    def head_dims(self) -> tuple[int, ...]:
        """Per-block head width of IF's added-KV attention (there `attention_head_dim` means
        what it says). diffusers gives up block i down block i's value, not reversed."""
        return _per_block(self.attention_head_dim, self.levels, "attention_head_dim")

    @property
    def context_dim(self) -> int:
        """The width of encoder_hidden_states as given (before IF's text projection)."""
        return self.encoder_hid_dim if self.encoder_hid_dim_type else self.cross_dims[0]

    @property
    def layers(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, self.levels, "layers_per_block")

    @property
    def cross_dims(self) -> tuple[int, ...]:
        return _per_block(self.cross_attention_dim, self.levels, "cross_attention_dim")

    def transformer_depths(self, block: int, up: bool) -> tuple[int, ...]:
        """Transformer layers of each attention in a down (or up) block."""
        n = self.layers[block] if not up else self.layers[::-1][block] + 1
        if up:
            if self.reverse_transformer_layers_per_block is not None:
                return _per_block(self.reverse_transformer_layers_per_block[block], n,
                                  "reverse_transformer_layers_per_block")
            value = _per_block(self.transformer_layers_per_block, self.levels,
                               "transformer_layers_per_block")[::-1][block]
        else:
            value = _per_block(self.transformer_layers_per_block, self.levels,
                               "transformer_layers_per_block")[block]
        return _per_block(value, n, "transformer_layers_per_block")

    def cross_only(self, kind: str) -> tuple[bool, ...]:
        """only_cross_attention per down / up block (up: reversed), or the mid block's
        (mid_block_only_cross_attention, defaulting to a single boolean only_cross_attention),
        as diffusers resolves them."""
        if kind == "mid":
            mid = self.mid_block_only_cross_attention
            if mid is None:
                mid = (self.only_cross_attention if isinstance(self.only_cross_attention, bool)
                       else False)
            return (bool(mid),)
        values = tuple(bool(v) for v in _per_block(self.only_cross_attention, self.levels,
                                                   "only_cross_attention"))
        return values[::-1] if kind == "up" else values

    @property
    def mid_depth(self) -> int:
        last = _per_block(self.transformer_layers_per_block, self.levels,
                          "transformer_layers_per_block")[-1]
        return last[-1] if isinstance(last, tuple) else last

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.levels - 1)


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000):
    """diffusers' get_timestep_embedding (float32): [B] -> [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                    / (half - freq_shift))
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    features: int
    act: str = "silu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = Dense(self.features, dtype=self.dtype, name="linear_1")(x.astype(self.dtype))
        return Dense(self.features, dtype=self.dtype, name="linear_2")(ACTIVATIONS[self.act](x))


def _layer_norm(name: str, x, dtype):
    """torch's LayerNorm (eps 1e-5) named `name` in the calling compact module, float32
    statistics; params scale / bias (-> weight / bias).

    On the CPU an optimization barrier keeps the norm out of the next projection: XLA would fold
    its reductions into YNNPACK's dot fusion, which then runs slower than the two apart
    (LayerNorm + GEGLU at SD's 64 x 64 level: 130 -> 111 ms, BENCHMARKS.md)."""
    init = lambda f: nn.with_logical_partitioning(f, ("norm",))  # noqa: E731
    out = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                       scale_init=init(nn.initializers.ones_init()),
                       bias_init=init(nn.initializers.zeros_init()),
                       name=name)(x.astype(jnp.float32)).astype(dtype)
    return jax.lax.optimization_barrier(out) if jax.default_backend() == "cpu" else out


class TextTimeEmbedding(nn.Module):
    """IF's addition_embed_type "text": the text tokens attention-pooled into the time
    embedding (norm1, pool, proj, norm2)."""

    features: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        x = _layer_norm("norm1", tokens, self.dtype)
        x = AttentionPooling(self.heads, self.dtype, name="pool")(x)
        x = Dense(self.features, dtype=self.dtype, name="proj")(x)
        return _layer_norm("norm2", x, self.dtype)


class AttentionPooling(nn.Module):
    """A class token (the tokens' mean + a learned position) attending over itself and the
    tokens; its output is the pooled vector."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, _, c = x.shape
        position = self.param("positional_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(c ** -0.5), (None, "embed")), (1, c), jnp.float32)
        cls = jnp.mean(x, axis=1, keepdims=True) + position.astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, c // self.heads))  # noqa: E731
        proj = lambda name, t: split(Dense(c, dtype=self.dtype, name=name)(t))  # noqa: E731
        out = attention(proj("q_proj", cls), proj("k_proj", x), proj("v_proj", x))
        return out.reshape(b, c)


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D with a time embedding ("default": added before norm2;
    "scale_shift": norm2(h) * (1 + scale) + shift). resample "down" / "up": IF's resampling
    resnets (2x2 average pooling / nearest 2x of both paths after norm1, no conv)."""

    features: int
    groups: int
    eps: float
    time_scale_shift: bool = False
    output_scale_factor: float = 1.0
    act: str = "silu"
    skip_time_act: bool = False
    resample: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, conv_settings):
        norm = lambda name: GroupNorm(self.dtype, self.eps, self.groups, name=name)  # noqa: E731
        act = ACTIVATIONS[self.act]
        h = act(norm("norm1")(x))
        if self.resample is not None:
            x, h = (_resample(t, self.resample) for t in (x, h))
        h = Conv(self.features, dtype=self.dtype, name="conv1")(h, conv_settings)
        t = Dense(2 * self.features if self.time_scale_shift else self.features,
                  dtype=self.dtype, name="time_emb_proj")(
            temb if self.skip_time_act else act(temb))[:, None, None, :]
        if self.time_scale_shift:
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm("norm2")(h) * (1 + scale) + shift
        else:
            h = norm("norm2")(h + t)
        h = Conv(self.features, dtype=self.dtype, name="conv2")(act(h), conv_settings)
        if x.shape[-1] != self.features:
            x = Conv(self.features, 1, dtype=self.dtype, name="conv_shortcut")(x, conv_settings)
        out = x.astype(self.dtype) + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


def _resample(x, how: str):
    if how == "up":
        return upsample_nearest(x, 2)
    b, h, w, c = x.shape  # AvgPool2d(2, stride 2)
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)


class AddedKVAttention(nn.Module):
    """IF's attention (diffusers' Attention with AttnAddedKVProcessor): GroupNorm of the
    pixels; queries from them; keys / values of the (optionally normalised) text through
    add_k_proj / add_v_proj, followed by the pixels' own (none with `cross_only`, diffusers'
    only_cross_attention: IF stage II's); all projections with bias; residual."""

    heads: int
    groups: int
    cross_norm: str | None
    cross_only: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, key_mask, bias_fn, area_ratio=None):
        b, hh, ww, c = x.shape
        if self.cross_norm == "group_norm":
            context = GroupNorm(self.dtype, 1e-5, 32, name="norm_cross")(context)
        elif self.cross_norm == "layer_norm":
            context = _layer_norm("norm_cross", context, self.dtype)
        h = GroupNorm(self.dtype, 1e-5, self.groups, name="group_norm")(x).reshape(b, hh * ww, c)
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, c // self.heads))  # noqa: E731
        proj = lambda name, t: split(Dense(c, names=("embed", "heads"), dtype=self.dtype,  # noqa: E731
                                           name=name)(t))
        k, v = proj("add_k_proj", context), proj("add_v_proj", context)
        if not self.cross_only:
            k = jnp.concatenate([k, proj("to_k", h)], axis=1)
            v = jnp.concatenate([v, proj("to_v", h)], axis=1)
        if bias_fn is not None and not self.cross_only:  # paint biases the text keys only
            text, text_bias = context.shape[1], bias_fn
            bias_fn = lambda logits: jnp.pad(  # noqa: E731
                text_bias(logits[..., :text]), [(0, 0)] * 3 + [(0, logits.shape[-1] - text)])
        if key_mask is not None and not self.cross_only:  # the pixels' own keys: always
            key_mask = jnp.concatenate(
                [key_mask.astype(jnp.float32), jnp.ones((b, hh * ww), jnp.float32)], axis=1)
        o = attention(proj("to_q", h), k, v, key_mask=key_mask, bias_fn=bias_fn)
        o = Dense(c, names=("heads", "embed"), dtype=self.dtype, name="to_out.0")(
            o.reshape(b, hh * ww, c))
        return x.astype(self.dtype) + o.reshape(b, hh, ww, c)


class Attention(nn.Module):
    """diffusers' Attention as BasicTransformerBlock uses it: no q/k/v bias, an output
    projection with bias; softmax in float32 (so `upcast_attention` holds always)."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, key_mask=None, bias_fn=None, scale_factor=1.0):
        c = x.shape[-1]
        context = x if context is None else context
        proj = lambda name, t: Dense(c, names=("embed", "heads"), use_bias=False,  # noqa: E731
                                     dtype=self.dtype, name=name)(t)
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, c // self.heads))  # noqa: E731
        q, k, v = split(proj("to_q", x)), split(proj("to_k", context)), split(proj("to_v", context))
        scale = scale_factor / math.sqrt(c // self.heads)
        o = attention(q, k, v, key_mask=key_mask, bias_fn=bias_fn, scale=scale).reshape(x.shape)
        return Dense(c, names=("heads", "embed"), dtype=self.dtype, name="to_out.0")(o)


def entropy_scale(tokens: int, area_ratio: float | None) -> float:
    """The factor on a self-attention's logits that keeps its entropy at `area_ratio` times
    the training size's tokens: sqrt(log N / log N_train), N_train = N / area_ratio (Jin et
    al. 2023; ScaleCrafter's ScaledAttnProcessor as its reference script passes pixel counts).
    1 where there is nothing to keep (no ratio, N_train <= 1)."""
    if area_ratio is None or tokens / area_ratio <= 1:
        return 1.0
    return math.sqrt(math.log(tokens) / math.log(tokens / area_ratio))


class FeedForward(nn.Module):
    """GEGLU feed-forward (exact GELU): net.0.proj -> hidden * gelu(gate) -> net.2."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = Dense(2 * self.mult * c, dtype=self.dtype, name="net.0.proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        h = hidden * jax.nn.gelu(gate.astype(jnp.float32), approximate=False).astype(self.dtype)
        return Dense(c, names=("mlp", "embed"), dtype=self.dtype, name="net.2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, GEGLU feed-forward; each after a
    LayerNorm (torch's, eps 1e-5, float32 statistics) and with a residual."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, key_mask, bias_fn, area_ratio=None):
        norm = lambda name, t: _layer_norm(name, t, self.dtype)  # noqa: E731
        x = x + Attention(self.heads, self.dtype, name="attn1")(
            norm("norm1", x), scale_factor=entropy_scale(x.shape[1], area_ratio))
        x = x + Attention(self.heads, self.dtype, name="attn2")(
            norm("norm2", x), context, key_mask, bias_fn)
        return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3", x))


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6), proj_in (1x1 conv, or linear with use_linear_projection),
    transformer blocks, proj_out, residual."""

    heads: int
    depth: int
    groups: int
    linear_projection: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, key_mask, bias_fn, area_ratio=None):
        b, hh, ww, c = x.shape
        proj = ((lambda name: Dense(c, dtype=self.dtype, name=name)) if self.linear_projection
                else (lambda name: Conv(c, 1, dtype=self.dtype, name=name)))
        h = GroupNorm(self.dtype, 1e-6, self.groups, name="norm")(x)
        h = proj("proj_in")(h).reshape(b, hh * ww, c)
        for i in range(self.depth):
            h = BasicTransformerBlock(self.heads, self.dtype, name=f"transformer_blocks.{i}")(
                h, context, key_mask, bias_fn, area_ratio)
        return x.astype(self.dtype) + proj("proj_out")(h.reshape(b, hh, ww, c))


class _Resample(nn.Module):
    """downsamplers.0 / upsamplers.0: one 3x3 conv named "conv" (stride 2 with the config's
    padding going down; after nearest 2x upsampling going up)."""

    features: int
    down: bool
    padding: int | None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, conv_settings):
        if not self.down:
            x = upsample_nearest(x, 2)
        return Conv(self.features, 3, stride=2 if self.down else 1,
                    padding=self.padding if self.down else None, dtype=self.dtype,
                    name="conv")(x, conv_settings)


# cross_attention_bias(attention path) -> None, or bias(key_mask, height, width) -> (logits ->
# additive bias): the hook paint-with-words uses (as models/unet.py's).
CrossAttentionBias = Callable[[str], Callable | None]


class Block(nn.Module):
    """One down or up block, or the mid block, of any ported type: SD's (resnets, transformer
    blocks, a conv resampler) or IF's (resnets, added-KV attention, a resampling resnet)."""

    config: DiffusersUNetConfig
    kind: str  # "down", "up" or "mid"
    index: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, temb, context, key_mask, skips, conv_settings, cross_attention_bias,
                 area_ratio=None):
        cfg, i = self.config, self.index
        chans = cfg.block_out_channels
        if self.kind == "mid":
            kind, n = cfg.mid_block_type, 1
            features, heads, scale = chans[-1], cfg.heads[-1], cfg.mid_block_scale_factor
            head_dim, depths = cfg.head_dims[-1], (cfg.mid_depth,)
        elif self.kind == "down":
            kind, n, features = cfg.down_block_types[i], cfg.layers[i], chans[i]
            heads, head_dim = cfg.heads[i], cfg.head_dims[i]
        else:
            kind, n, features = cfg.up_block_types[i], cfg.layers[::-1][i] + 1, chans[::-1][i]
            heads, head_dim = cfg.heads[::-1][i], cfg.head_dims[i]  # diffusers: not reversed
        cross_only = cfg.cross_only(self.kind)[0 if self.kind == "mid" else i]
        simple = kind in IF_BLOCKS or kind == "UNetMidBlock2DSimpleCrossAttn"
        cross = "CrossAttn" in kind
        if self.kind != "mid":
            # resnet_out_scale_factor is read by IF's block types only.
            scale = cfg.resnet_out_scale_factor if simple else 1.0
            depths = cfg.transformer_depths(i, self.kind == "up") if cross and not simple else ()
        outputs = []

        def resnet(name, h, resample=None):
            return ResnetBlock2D(features, cfg.norm_num_groups, cfg.norm_eps,
                                 cfg.resnet_time_scale_shift == "scale_shift", scale, cfg.act_fn,
                                 cfg.resnet_skip_time_act, resample, self.dtype,
                                 name=name)(h, temb, conv_settings)

        def attend(j, h):
            name = f"attentions.{j}"
            bias = (cross_attention_bias(f"{_path(self)}/{name}")
                    if cross_attention_bias is not None else None)
            bias_fn = None if bias is None else bias(key_mask, h.shape[1], h.shape[2])
            if simple:  # its keys hold the text's too: not rescaled, as the official code
                return AddedKVAttention(features // head_dim, cfg.norm_num_groups,
                                        cfg.cross_attention_norm, cross_only, self.dtype,
                                        name=name)(h, context, key_mask, bias_fn)
            return Transformer2DModel(heads, depths[j], cfg.norm_num_groups,
                                      cfg.use_linear_projection, self.dtype, name=name)(
                h, context, key_mask, bias_fn, area_ratio)

        if self.kind == "mid":
            h = resnet("resnets.0", h)
            return resnet("resnets.1", attend(0, h)), outputs
        for j in range(n):
            if self.kind == "up":
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = resnet(f"resnets.{j}", h)
            if cross:
                h = attend(j, h)
            h = nn.with_logical_constraint(h, ("batch", "height", "width", "act_channels"))
            outputs.append(h)
        last = i == cfg.levels - 1
        if self.kind == "down" and not last:
            if simple:
                h = resnet("downsamplers.0", h, "down")
            else:
                padding = cfg.downsample_padding or None  # 0: diffusers pads (0, 1): SAME
                h = _Resample(features, True, padding, self.dtype, name="downsamplers.0")(
                    h, conv_settings)
            outputs.append(h)
        elif self.kind == "up" and not last:
            if simple:
                h = resnet("upsamplers.0", h, "up")
            else:
                h = _Resample(features, False, None, self.dtype, name="upsamplers.0")(
                    h, conv_settings)
        return h, outputs


def _path(module: nn.Module) -> str:
    return "/".join(module.scope.path)


class DiffusersUNet(nn.Module):
    """F(sample NHWC, timestep [B] or scalar, encoder_hidden_states [B, L, D]) -> the model's
    output NHWC in float32 (epsilon, v or x0 as the scheduler config says; discrete.vp_denoise
    turns it into an EDM denoiser). dtype is the compute dtype; params are float32.

    text_embeds [B, P] and time_ids [B, k]: SDXL's added conditioning (addition_embed_type
    "text_time"); class_labels [B]: a timestep-embedded class (class_embed_type "timestep").
    encoder_attention_mask [B, L]: 1 where attention may look (None: everywhere).
    conv_settings: static ConvSettings by diffusers conv name or layer path.
    attention_area_ratio: the sampled image's pixels over the training size's: self-attention
    logits are scaled to keep their entropy (entropy_scale; ScaleCrafter's Attn-SF baseline).
    """

    config: DiffusersUNetConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, *, encoder_attention_mask=None,
                 text_embeds=None, time_ids=None, class_labels=None,
                 conv_settings: ConvSettings | None = None,
                 cross_attention_bias: CrossAttentionBias | None = None,
                 attention_area_ratio: float | None = None):
        cfg, dtype = self.config, self.dtype
        b, height, width, _ = sample.shape
        f = cfg.downsample_factor
        if height % f or width % f:
            raise ValueError(f"UNet2DConditionModel input {height}x{width} is not a multiple of "
                             f"{f} (its {cfg.levels - 1} downsamplings)")
        if sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet2DConditionModel takes {cfg.in_channels} input channels, got "
                             f"{sample.shape[-1]}")
        conv_settings = FrozenDict(_by_layer_path(conv_settings or {}))
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        chans0 = cfg.block_out_channels[0]
        temb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype, name="time_embedding")(
            timestep_embedding(t, chans0, cfg.flip_sin_to_cos, cfg.freq_shift))
        if cfg.class_embed_type == "timestep":
            if class_labels is None:
                raise ValueError("this U-Net (class_embed_type='timestep') needs class_labels")
            temb = temb + TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype,
                                            name="class_embedding")(
                timestep_embedding(jnp.broadcast_to(jnp.asarray(class_labels).reshape(-1), (b,)),
                                   chans0, cfg.flip_sin_to_cos, cfg.freq_shift))
        if cfg.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this U-Net (addition_embed_type='text_time', SDXL) needs "
                                 "text_embeds and time_ids")
            ids = timestep_embedding(jnp.asarray(time_ids, jnp.float32).reshape(-1),
                                     cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(b, -1)
            added = jnp.concatenate([text_embeds.astype(jnp.float32), ids], axis=-1)
            if added.shape[-1] != cfg.projection_class_embeddings_input_dim:
                raise ValueError(f"text_embeds + time_ids embed to {added.shape[-1]} features; "
                                 "the config's projection_class_embeddings_input_dim is "
                                 f"{cfg.projection_class_embeddings_input_dim}")
            temb = temb + TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype,
                                            name="add_embedding")(added)
        elif cfg.addition_embed_type == "text":  # IF: the pooled text tokens
            temb = temb + TextTimeEmbedding(cfg.time_embed_dim, cfg.addition_embed_type_num_heads,
                                            dtype, name="add_embedding")(
                encoder_hidden_states.astype(dtype))
        if cfg.time_embedding_act_fn is not None:
            temb = ACTIVATIONS[cfg.time_embedding_act_fn](temb)

        x = sample.astype(jnp.float32)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(dtype)
        if cfg.encoder_hid_dim_type == "text_proj":  # IF: T5's width -> cross_attention_dim
            context = Dense(cfg.cross_dims[0], dtype=dtype, name="encoder_hid_proj")(context)
        h = Conv(chans0, cfg.conv_in_kernel, dtype=dtype, name="conv_in")(x, conv_settings)
        skips = [h]
        args = (temb, context, encoder_attention_mask)
        for i in range(cfg.levels):
            h, out = Block(cfg, "down", i, dtype, name=f"down_blocks.{i}")(
                h, *args, None, conv_settings, cross_attention_bias, attention_area_ratio)
            skips += out
        if cfg.mid_block_type is not None:
            h, _ = Block(cfg, "mid", 0, dtype, name="mid_block")(
                h, *args, None, conv_settings, cross_attention_bias, attention_area_ratio)
        for i in range(cfg.levels):
            h, _ = Block(cfg, "up", i, dtype, name=f"up_blocks.{i}")(
                h, *args, skips, conv_settings, cross_attention_bias, attention_area_ratio)
        h = ACTIVATIONS[cfg.act_fn](
            GroupNorm(dtype, cfg.norm_eps, cfg.norm_num_groups, name="conv_norm_out")(h))
        out = Conv(cfg.out_channels, cfg.conv_out_kernel, dtype=dtype, name="conv_out")(
            h, conv_settings)
        return out.astype(jnp.float32)


def layer_path_of(name: str) -> str:
    """A conv's diffusers name -> its layer path: a ModuleList index belongs to the name before
    it ("down_blocks.2.resnets.0.conv1" -> "down_blocks.2/resnets.0/conv1"); a layer path
    is returned as it is."""
    parts = []
    for part in name.split("/") if "/" in name else name.split("."):
        if part.isdigit() and parts and "/" not in name:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/".join(parts)


def _by_layer_path(conv_settings: ConvSettings) -> dict[str, ConvSetting]:
    return {layer_path_of(name): s for name, s in conv_settings.items()}


def conv_names(params: Mapping) -> tuple[str, ...]:
    """The diffusers name of every conv (a rank-4 kernel) in a params tree, in tree order."""
    names = []

    def visit(tree, prefix):
        for name, sub in tree.items():
            if isinstance(sub, Mapping):
                visit(sub, prefix + (name,))
            elif name == "kernel" and getattr(sub, "ndim", 0) == 4:
                names.append(".".join(prefix))

    visit(params, ())
    return tuple(names)


def conv3x3_levels(config: DiffusersUNetConfig) -> dict[str, int]:
    """Every 3x3 conv's diffusers name -> the level whose resolution it reads (0: the input's;
    conv_in and conv_out -1, never re-dilated): models/unet.py's conv3x3_levels for this
    family, the table highres plans validate against. A downsampler conv reads its block's
    level, an upsampler conv the finer one it upsamples to (IF's resampling resnets: both convs
    read the resampled level). 1x1 shortcuts are not listed."""
    n = config.levels
    out = {"conv_in": -1, "conv_out": -1}

    def resnet(name, level):
        out[f"{name}.conv1"] = out[f"{name}.conv2"] = level

    for i in range(n):
        for j in range(config.layers[i]):
            resnet(f"down_blocks.{i}.resnets.{j}", i)
        if i < n - 1:
            if config.down_block_types[i] in IF_BLOCKS:
                resnet(f"down_blocks.{i}.downsamplers.0", i + 1)
            else:
                out[f"down_blocks.{i}.downsamplers.0.conv"] = i
    if config.mid_block_type is not None:
        resnet("mid_block.resnets.0", n - 1)
        resnet("mid_block.resnets.1", n - 1)
    for i in range(n):
        level = n - 1 - i
        for j in range(config.layers[::-1][i] + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", level)
        if i < n - 1:
            if config.up_block_types[i] in IF_BLOCKS:
                resnet(f"up_blocks.{i}.upsamplers.0", level - 1)
            else:
                out[f"up_blocks.{i}.upsamplers.0.conv"] = level - 1
    return out


def check_conv_settings(params: Mapping, conv_settings: ConvSettings) -> None:
    """Every conv named (diffusers name or layer path) must exist in this U-Net: the official
    ScaleCrafter code skips unknown names silently; here that is an error naming the closest."""
    names = conv_names(params)
    known = {layer_path_of(n) for n in names}
    for name, setting in conv_settings.items():
        if layer_path_of(name) not in known:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"conv setting names unknown layer {name!r}{hint}")
        if not isinstance(setting, ConvSetting):
            raise TypeError(f"conv setting for {name!r} must be a ConvSetting, got {setting!r}")


def example_inputs(config: DiffusersUNetConfig, batch: int = 1, size: tuple[int, int] | None = None,
                   tokens: int = 1) -> tuple[tuple, dict]:
    """Zero inputs of the right shapes, (args, kwargs): by default the smallest (for init /
    eval_shape); `size` (H, W of the sample) and `tokens` for a real-size call (to plan one)."""
    f = config.downsample_factor
    h, w = size or (f, f)
    args = (jnp.zeros((batch, h, w, config.in_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, tokens, config.context_dim)))
    kwargs = {}
    if config.addition_embed_type == "text_time":
        n_ids = 6
        pooled = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
        if pooled <= 0:  # the refiner: 5 ids (sizes, crop, aesthetic score)
            n_ids = 5
            pooled = (config.projection_class_embeddings_input_dim
                      - n_ids * config.addition_time_embed_dim)
        kwargs.update(text_embeds=jnp.zeros((batch, pooled)),
                      time_ids=jnp.zeros((batch, n_ids)))
    if config.class_embed_type == "timestep":
        kwargs["class_labels"] = jnp.zeros((batch,))
    return args, kwargs


def boxed_init(config: DiffusersUNetConfig, key):
    args, kwargs = example_inputs(config)
    return DiffusersUNet(config).init(key, *args, **kwargs)["params"]


def abstract_boxed(config: DiffusersUNetConfig):
    """The params tree as ShapeDtypeStructs still boxed with their logical axis names (for
    parallel/mesh.logical_shardings), allocating nothing."""
    return jax.eval_shape(lambda: boxed_init(config, jax.random.key(0)))


def abstract_params(config: DiffusersUNetConfig):
    """ShapeDtypeStructs of the params tree, allocating nothing."""
    return nn.meta.unbox(abstract_boxed(config))


def init_params(config: DiffusersUNetConfig, key):
    return nn.meta.unbox(jax.jit(boxed_init, static_argnums=0)(config, key))
