"""The eDiff-I base U-Net: ADM-style (Dhariwal & Nichol) with scale-shift norm, self-attention
followed by cross-attention at the attention resolutions, conditioned on the noise level, the
pooled CLIP text vector and the CLIP image embedding (added to the time embedding), and on
T5 + CLIP text tokens, one CLIP image token and a learned null token (cross-attention context).

Layer paths are stable and flat-named, e.g. "down1_res0/conv1", "mid_res1/conv2",
"up2_upsample/conv"; ScaleCrafter plans address convs by these paths.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
from flax.core import FrozenDict
import jax.numpy as jnp

from ediffi_jax.diffusion.edm import precondition_coefficients
from ediffi_jax.models.conditioning import Conditioning
from ediffi_jax.models.layers import (
    ATTENTION_IMPLEMENTATIONS, Conv, ConvSetting, ConvSettings, Dense, GroupNorm, attention,
    upsample_nearest,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of one denoiser. `resolution` is the training resolution; attention
    resolutions are feature-map sides at that input size (the U-Net runs at other sizes too)."""

    resolution: int = 64
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 256
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 3
    # Efficient-U-Net style (the SR stages): level l has num_res_blocks * block_mult[l] blocks,
    # more at low resolution where they are cheap. Empty: num_res_blocks at every level.
    block_mult: tuple[int, ...] = ()
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    self_attention: bool = True  # off: cross-attention only (the paper's SR1024)
    attention_head_dim: int = 64
    scale_shift_norm: bool = True
    dropout: float = 0.0
    context_dim: int = 1024  # width of the cross-attention tokens
    t5_dim: int = 4096  # T5-XXL
    t5_length: int = 128
    clip_dim: int = 768  # CLIP ViT-L/14 text hidden size
    clip_length: int = 77
    clip_pooled_dim: int = 768
    clip_image_dim: int = 768
    dtype: str = "float32"  # compute dtype; params are always float32
    attention_impl: str = "xla"
    remat: bool = False  # recompute res/attention blocks in the backward pass (saves memory)
    # The pooled CLIP text vector added to the noise embedding (eDiff-I). Off, text reaches the
    # U-Net only through cross-attention, where paint-with-words can steer it spatially.
    pooled_text: bool = True
    # A super-resolution stage: the low-res image (this many times smaller) is upsampled to the
    # input's size and enters as extra input channels, with its noise-augmentation level added
    # to the noise embedding. 0: a base stage.
    lowres_scale: int = 0

    def __post_init__(self):
        for name in ("channel_mult", "attention_resolutions", "block_mult"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        levels = len(self.channel_mult)
        if levels < 1:
            raise ValueError("channel_mult needs at least one level")
        factor = 2 ** (levels - 1)
        if self.resolution % factor:
            raise ValueError(
                f"resolution {self.resolution} cannot be halved {levels - 1} times "
                f"(channel_mult has {levels} levels); use a multiple of {factor}"
            )
        sides = [self.resolution // 2**lvl for lvl in range(levels)]
        bad = [r for r in self.attention_resolutions if r not in sides]
        if bad:
            raise ValueError(
                f"attention_resolutions {bad} do not occur in this U-Net: its feature maps are "
                f"{sides} at resolution {self.resolution}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention_impl!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.block_mult and (len(self.block_mult) != levels or min(self.block_mult) < 1):
            raise ValueError(f"block_mult {self.block_mult} needs one positive entry per level "
                             f"({levels} levels in channel_mult)")
        if self.lowres_scale < 0 or self.lowres_scale == 1:
            raise ValueError(f"lowres_scale must be 0 (a base stage) or an upsampling factor "
                             f">= 2, got {self.lowres_scale}")

    def blocks(self, level: int) -> int:
        """Res blocks at `level` on the way down (the way up has one more)."""
        return self.num_res_blocks * (self.block_mult[level] if self.block_mult else 1)

    @property
    def attention_levels(self) -> frozenset[int]:
        return frozenset(
            lvl for lvl in range(len(self.channel_mult))
            if self.resolution // 2**lvl in self.attention_resolutions
        )

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def zero_conditioning(self, batch: int) -> Conditioning:
        """All-zero conditioning (with a zero low-res image at the training size for an SR
        stage, noise level 1): the shapes init and abstract evaluation need."""
        cond = Conditioning.zeros(
            batch, t5_length=self.t5_length, t5_dim=self.t5_dim, clip_length=self.clip_length,
            clip_dim=self.clip_dim, clip_pooled_dim=self.clip_pooled_dim,
            clip_image_dim=self.clip_image_dim,
        )
        if self.lowres_scale:
            res = self.resolution
            cond = cond.replace(lowres=jnp.zeros((batch, res, res, self.out_channels)),
                                lowres_sigma=jnp.ones((batch,)))
        return cond


def noise_embedding(c_noise, channels: int, max_positions: int = 10000):
    """Sinusoidal embedding of c_noise = ln(sigma)/4 (EDM's PositionalEmbedding)."""
    half = channels // 2
    freqs = (1.0 / max_positions) ** (jnp.arange(half, dtype=jnp.float32) / half)
    angles = c_noise.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class ResBlock(nn.Module):
    out_channels: int
    scale_shift_norm: bool = True
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb, conv_settings, train: bool):
        h = nn.silu(GroupNorm(dtype=self.dtype, name="norm1")(x))
        h = Conv(self.out_channels, dtype=self.dtype, name="conv1")(h, conv_settings)
        e = Dense(
            2 * self.out_channels if self.scale_shift_norm else self.out_channels,
            dtype=self.dtype, name="emb_proj",
        )(nn.silu(emb))[:, None, None, :]
        if self.scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = GroupNorm(dtype=self.dtype, name="norm2")(h) * (1 + scale) + shift
        else:
            h = GroupNorm(dtype=self.dtype, name="norm2")(h + e)
        h = nn.silu(h)
        if self.dropout > 0:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv(self.out_channels, zero_init=True, dtype=self.dtype, name="conv2")(h, conv_settings)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, kernel_size=1, dtype=self.dtype, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels (unless off), then cross-attention to the conditioning tokens."""

    head_dim: int
    implementation: str = "xla"
    dtype: Any = jnp.float32
    self_attention: bool = True

    @nn.compact
    def __call__(self, x, context, context_mask, cross_bias_fn=None):
        b, hgt, wid, c = x.shape
        heads = max(1, c // self.head_dim)
        d = c // heads
        split = lambda t: t.reshape(t.shape[:2] + (heads, d))  # noqa: E731

        if self.self_attention:
            h = GroupNorm(dtype=self.dtype, name="self_norm")(x).reshape(b, hgt * wid, c)
            qkv = Dense(3 * c, names=("embed", "heads"), use_bias=False, dtype=self.dtype,
                        name="self_qkv")(h)
            q, k, v = (split(t) for t in jnp.split(qkv, 3, axis=-1))
            o = attention(q, k, v, implementation=self.implementation).reshape(b, hgt * wid, c)
            x = x + Dense(c, names=("heads", "embed"), zero_init=True, dtype=self.dtype,
                          name="self_out")(o).reshape(x.shape)

        h = GroupNorm(dtype=self.dtype, name="cross_norm")(x).reshape(b, hgt * wid, c)
        q = split(Dense(c, names=("embed", "heads"), use_bias=False, dtype=self.dtype,
                        name="cross_q")(h))
        kv = Dense(2 * c, names=("embed", "heads"), use_bias=False, dtype=self.dtype,
                   name="cross_kv")(context)
        k, v = (split(t) for t in jnp.split(kv, 2, axis=-1))
        bias_fn = cross_bias_fn(hgt, wid) if cross_bias_fn is not None else None
        o = attention(q, k, v, key_mask=context_mask, bias_fn=bias_fn,
                      implementation=self.implementation).reshape(b, hgt * wid, c)
        return x + Dense(c, names=("heads", "embed"), zero_init=True, dtype=self.dtype,
                         name="cross_out")(o).reshape(x.shape)


class Downsample(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, conv_settings):
        return Conv(x.shape[-1], stride=2, dtype=self.dtype, name="conv")(x, conv_settings)


class Upsample(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, conv_settings):
        return Conv(x.shape[-1], dtype=self.dtype, name="conv")(upsample_nearest(x), conv_settings)


class UNet(nn.Module):
    """F_theta(x_in, c_noise, cond) -> network output (EDM preconditioning is outside)."""

    config: UNetConfig

    def _context(self, cond: Conditioning, dtype):
        cfg = self.config
        b = cond.batch_size
        null = self.param("null_token", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("tokens", "embed")), (1, cfg.context_dim), jnp.float32)
        proj = lambda name: Dense(cfg.context_dim, names=("embed", "mlp"), dtype=dtype, name=name)  # noqa: E731
        tokens = jnp.concatenate([
            proj("t5_proj")(cond.t5_tokens),
            proj("clip_proj")(cond.clip_tokens),
            proj("image_token_proj")(cond.clip_image)[:, None, :],
            jnp.broadcast_to(null.astype(dtype)[None], (b, 1, cfg.context_dim)),
        ], axis=1)
        ones = jnp.ones((b, 2), jnp.float32)
        mask = jnp.concatenate(
            [cond.t5_mask.astype(jnp.float32), cond.clip_mask.astype(jnp.float32), ones], axis=1)
        return tokens, mask

    def _lowres_input(self, x, cond: Conditioning, dtype):
        """A super-resolution stage's extra inputs: x with the noise-augmented low-res image
        (already upsampled to x's size) as more channels, EDM-scaled by c_in of its noise level,
        and the embedding of that level."""
        cfg = self.config
        if cond.lowres is None or cond.lowres_sigma is None:
            raise ValueError("this super-resolution U-Net (lowres_scale "
                             f"{cfg.lowres_scale}) needs cond.lowres and cond.lowres_sigma")
        if cond.lowres.shape[:3] != x.shape[:3]:
            raise ValueError(f"cond.lowres {cond.lowres.shape} must be upsampled to the input's "
                             f"batch and size {x.shape[:3]}")
        _, _, c_in, c_noise = precondition_coefficients(cond.lowres_sigma)
        lowres = c_in[:, None, None, None] * cond.lowres.astype(jnp.float32)
        emb_dim = 4 * cfg.channels
        emb = Dense(emb_dim, dtype=dtype, name="lowres_embed_0")(noise_embedding(c_noise, cfg.channels))
        emb = Dense(emb_dim, dtype=dtype, name="lowres_embed_1")(nn.silu(emb))
        return jnp.concatenate([x, lowres.astype(x.dtype)], axis=-1), emb

    @nn.compact
    def __call__(self, x, c_noise, cond: Conditioning, *, conv_settings: ConvSettings | None = None,
                 cross_attention_bias: CrossAttentionBias | None = None, train: bool = False):
        """`conv_settings`: static per-conv settings by layer path (ScaleCrafter's re-dilation).
        `cross_attention_bias(block name)`: None, or bias(key_mask, height, width) -> (logits ->
        additive bias) for that block's cross-attention (paint-with-words builds it from its
        masks and the sampler's sigma, so the network needs to know neither)."""
        cfg = self.config
        dtype = cfg.compute_dtype
        levels = len(cfg.channel_mult)
        if x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
            raise ValueError(
                f"input {x.shape[1]}x{x.shape[2]} cannot be halved {levels - 1} times by this U-Net"
            )
        emb_dim = 4 * cfg.channels
        emb = noise_embedding(c_noise, cfg.channels)
        emb = Dense(emb_dim, dtype=dtype, name="time_embed_0")(emb)
        emb = Dense(emb_dim, dtype=dtype, name="time_embed_1")(nn.silu(emb))
        if cfg.pooled_text:
            emb = emb + Dense(emb_dim, dtype=dtype, name="clip_pooled_proj")(cond.clip_pooled)
        emb = emb + Dense(emb_dim, dtype=dtype, name="clip_image_proj")(cond.clip_image)
        if cfg.lowres_scale:
            x, lowres_emb = self._lowres_input(x, cond, dtype)
            emb = emb + lowres_emb
        context, context_mask = self._context(cond, dtype)

        # Hashable, so it can be a static argument of rematerialised blocks.
        conv_settings = FrozenDict(conv_settings or {})
        res_cls = nn.remat(ResBlock, static_argnums=(3, 4)) if cfg.remat else ResBlock
        attn_cls = nn.remat(AttentionBlock) if cfg.remat else AttentionBlock
        constrain = lambda t: nn.with_logical_constraint(t, ("batch", "height", "width", "act_channels"))  # noqa: E731

        h = Conv(cfg.channels, dtype=dtype, name="conv_in")(x.astype(dtype), conv_settings)
        skips = [h]
        for layer in layer_layout(cfg):
            if layer.kind == "res":
                if layer.takes_skip:
                    h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_cls(layer.channels, cfg.scale_shift_norm, cfg.dropout, dtype,
                            name=layer.name)(h, emb, conv_settings, train)
            elif layer.kind == "attn":
                block = attn_cls(cfg.attention_head_dim, cfg.attention_impl, dtype,
                                 cfg.self_attention, name=layer.name)
                bias = cross_attention_bias(layer.name) if cross_attention_bias else None
                h = block(h, context, context_mask,
                          None if bias is None else functools.partial(bias, context_mask))
            elif layer.kind == "downsample":
                h = Downsample(dtype, name=layer.name)(h, conv_settings)
            else:
                h = Upsample(dtype, name=layer.name)(h, conv_settings)
            if layer.ends_block:
                h = constrain(h)
            if layer.gives_skip:
                skips.append(h)

        h = nn.silu(GroupNorm(dtype=dtype, name="out_norm")(h))
        out = Conv(cfg.out_channels, zero_init=True, dtype=dtype, name="conv_out")(h, conv_settings)
        return out.astype(jnp.float32)


# bias(key_mask [B, L], height, width) -> (logits [B, heads, h*w, L] -> additive bias)
CrossAttentionBias = Callable[[str], Callable | None]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One block of the U-Net between conv_in and conv_out, in call order.

    kind: "res", "attn", "downsample" or "upsample"; level: the resolution level it runs at
    (0: the input's); channels: a res block's output channels; takes_skip: an up-path res block
    concatenates the newest skip first; ends_block: the activation is constrained to the
    activation sharding after it; gives_skip: its output is kept for the up path."""

    name: str
    kind: str
    level: int
    channels: int = 0
    takes_skip: bool = False
    ends_block: bool = False
    gives_skip: bool = False


def layer_layout(config: UNetConfig) -> tuple[Layer, ...]:
    """The U-Net's blocks in call order: the module builds itself from this list, and the layer
    paths that ScaleCrafter's conv settings and paint-with-words' layer choice name
    (`conv3x3_levels`, `attention_block_names`) are read from it, so the three cannot drift."""
    levels, layers = len(config.channel_mult), []
    attn = lambda name, lvl, **kw: [Layer(name, "attn", lvl, **kw)] if lvl in config.attention_levels else []  # noqa: E731
    for lvl, mult in enumerate(config.channel_mult):
        for i in range(config.blocks(lvl)):
            with_attn = lvl in config.attention_levels
            layers.append(Layer(f"down{lvl}_res{i}", "res", lvl, config.channels * mult,
                                ends_block=not with_attn, gives_skip=not with_attn))
            layers += attn(f"down{lvl}_attn{i}", lvl, ends_block=True, gives_skip=True)
        if lvl < levels - 1:
            layers.append(Layer(f"down{lvl}_downsample", "downsample", lvl, gives_skip=True))
    deepest = config.channels * config.channel_mult[-1]
    layers += [Layer("mid_res0", "res", levels - 1, deepest), Layer("mid_attn", "attn", levels - 1),
               Layer("mid_res1", "res", levels - 1, deepest)]
    for lvl in reversed(range(levels)):
        for i in range(config.blocks(lvl) + 1):
            with_attn = lvl in config.attention_levels
            layers.append(Layer(f"up{lvl}_res{i}", "res", lvl,
                                config.channels * config.channel_mult[lvl], takes_skip=True,
                                ends_block=not with_attn))
            layers += attn(f"up{lvl}_attn{i}", lvl, ends_block=True)
        if lvl > 0:  # its conv runs at the finer level it upsamples to
            layers.append(Layer(f"up{lvl}_upsample", "upsample", lvl - 1))
    return tuple(layers)


def conv_layer_paths(params: Mapping) -> tuple[str, ...]:
    """Paths of every conv (kernel of rank 4) in a U-Net params tree, in tree order."""
    paths = []

    def visit(tree, prefix):
        for name, sub in tree.items():
            if isinstance(sub, Mapping):
                visit(sub, prefix + (name,))
            elif name == "kernel" and getattr(sub, "ndim", 0) == 4:
                paths.append("/".join(prefix))

    visit(params, ())
    return tuple(paths)


def conv3x3_levels(config: UNetConfig) -> dict[str, int]:
    """Every 3x3 conv's path -> the level whose resolution it reads (0: the input resolution;
    conv_in and conv_out are -1: the boundary, never re-dilated). 1x1 skips are not listed."""
    out = {"conv_in": -1, "conv_out": -1}
    for layer in layer_layout(config):
        if layer.kind == "res":
            out[f"{layer.name}/conv1"] = out[f"{layer.name}/conv2"] = layer.level
        elif layer.kind in ("downsample", "upsample"):
            out[f"{layer.name}/conv"] = layer.level
    return out


def attention_block_names(config: UNetConfig) -> tuple[str, ...]:
    """The U-Net's attention blocks (self- then cross-attention), input to output."""
    return tuple(layer.name for layer in layer_layout(config) if layer.kind == "attn")


def check_conv_settings(params: Mapping, conv_settings: ConvSettings) -> None:
    """Every path named in conv_settings must be a conv of this U-Net (no silent skipping)."""
    import difflib

    known = set(conv_layer_paths(params))
    for path, setting in conv_settings.items():
        if path not in known:
            close = difflib.get_close_matches(path, sorted(known), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"conv setting names unknown layer path {path!r}{hint}")
        if not isinstance(setting, ConvSetting):
            raise TypeError(f"conv setting for {path!r} must be a ConvSetting, got {setting!r}")


def boxed_init(config: UNetConfig, key, batch: int = 1):
    """Params with their logical axis names (nn.LogicallyPartitioned leaves): feed this to
    jax.eval_shape for abstract params, or to parallel.mesh.sharded_init."""
    res = config.resolution
    x = jnp.zeros((batch, res, res, config.in_channels), jnp.float32)
    return UNet(config).init(key, x, jnp.zeros((batch,)), config.zero_conditioning(batch))["params"]


@functools.partial(jax.jit, static_argnames=("config", "batch"))
def init_params(config: UNetConfig, key, batch: int = 1):
    """Initialise plain (unboxed) params for `config` (jitted: one compile, not one per op)."""
    return nn.meta.unbox(boxed_init(config, key, batch))


def abstract_params(config: UNetConfig):
    """ShapeDtypeStructs of the params tree, allocating nothing."""
    return jax.eval_shape(lambda: nn.meta.unbox(boxed_init(config, jax.random.key(0))))


def count_params(params) -> int:
    return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))
