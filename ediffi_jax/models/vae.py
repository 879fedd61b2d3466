"""diffusers' AutoencoderKL (the SD / SDXL / SD3 / Flux VAE) in Flax, so a latent-space stage
decodes its samples with the published weights.

Submodule names are diffusers' dotted names relative to their parent, so that the param path
joined with "." is the diffusers state-dict name (hf.diffusers_names maps them 1:1). Every kxk
conv goes through layers.Conv, so ScaleCrafter plans can re-dilate VAE convs by layer path.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ediffi_jax.models import layers

Dtype = Any

BOOKKEEPING = ("_class_name", "_diffusers_version", "_name_or_path")
EPS = 1e-6  # diffusers' VAE GroupNorm eps (resnets, attention, conv_norm_out)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL's config fields with diffusers' defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for field, allowed in (("down_block_types", "DownEncoderBlock2D"),
                               ("up_block_types", "UpDecoderBlock2D")):
            bad = [t for t in getattr(self, field) if t != allowed]
            if bad:
                raise ValueError(f"VAE config {field}: only {allowed!r} is supported, got {bad}")
        if self.act_fn != "silu":
            raise ValueError(f"VAE config act_fn: only 'silu' is supported, got {self.act_fn!r}")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"VAE config down_block_types/up_block_types: need one per "
                             f"block_out_channels entry ({n}), got {len(self.down_block_types)}"
                             f"/{len(self.up_block_types)}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"VAE config block_out_channels: {bad} not divisible by "
                             f"norm_num_groups={self.norm_num_groups}")

    @classmethod
    def from_hf(cls, config_json: Mapping) -> "VAEConfig":
        """From a diffusers vae/config.json dict; unknown fields are an error naming them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config_json if k not in fields and k not in BOOKKEEPING)
        if unknown:
            raise ValueError(f"unsupported AutoencoderKL config fields: {unknown}")
        kw = {k: v for k, v in config_json.items() if k in fields}
        for k in ("down_block_types", "up_block_types", "block_out_channels", "latents_mean",
                  "latents_std", "sample_size"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        return cls(**kw)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def _norm(x, name: str, groups: int, dtype):
    """A diffusers GroupNorm (eps 1e-6), statistics in float32; params scale/bias under `name`."""
    return layers.GroupNorm(dtype, EPS, groups, name=name)(x)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without time embedding (output_scale_factor 1)."""

    features: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, conv_settings=None):
        h = nn.silu(_norm(x, "norm1", self.groups, self.dtype))
        h = layers.Conv(self.features, 3, dtype=self.dtype, name="conv1")(h, conv_settings)
        h = nn.silu(_norm(h, "norm2", self.groups, self.dtype))
        h = layers.Conv(self.features, 3, dtype=self.dtype, name="conv2")(h, conv_settings)
        if x.shape[-1] != self.features:
            x = layers.Conv(self.features, 1, dtype=self.dtype, name="conv_shortcut")(
                x, conv_settings)
        return x.astype(self.dtype) + h


class Attention(nn.Module):
    """The mid block's single-head spatial self-attention (diffusers' Attention with a
    GroupNorm, residual_connection=True, rescale_output_factor=1); softmax in float32."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _norm(x, "group_norm", self.groups, self.dtype).reshape(b, hh * ww, 1, c)
        q, k, v = (layers.Dense(c, dtype=self.dtype, name=n)(h) for n in ("to_q", "to_k", "to_v"))
        out = layers.attention(q, k, v).reshape(b, hh * ww, c).astype(self.dtype)
        out = layers.Dense(c, dtype=self.dtype, name="to_out.0")(out)
        return x.astype(self.dtype) + out.reshape(b, hh, ww, c)


class MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, (attention, resnet)."""

    groups: int
    add_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, conv_settings=None):
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.dtype, name="resnets.0")(x, conv_settings)
        if self.add_attention:
            x = Attention(self.groups, self.dtype, name="attentions.0")(x)
        return ResnetBlock(c, self.groups, self.dtype, name="resnets.1")(x, conv_settings)


class _Sub(nn.Module):
    """A named container (diffusers' ModuleList entries such as "downsamplers.0") holding one
    conv "conv"; exists only so the param path matches the state dict."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, conv_settings=None):
        return layers.Conv(self.features, 3, stride=self.stride, dtype=self.dtype,
                           name="conv")(x, conv_settings)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, conv_settings=None):
        cfg, g = self.config, self.config.norm_num_groups
        chans = cfg.block_out_channels
        x = layers.Conv(chans[0], 3, dtype=self.dtype, name="conv_in")(x, conv_settings)
        for i, c in enumerate(chans):
            block = f"down_blocks.{i}"
            for j in range(cfg.layers_per_block):
                x = ResnetBlock(c, g, self.dtype, name=f"{block}.resnets.{j}")(x, conv_settings)
            if i < len(chans) - 1:
                if x.shape[1] % 2 or x.shape[2] % 2:
                    # diffusers pads (0, 1) then convolves VALID with stride 2; SAME padding
                    # equals that only for even sizes.
                    raise ValueError(f"VAE encoder: spatial size {x.shape[1:3]} at "
                                     f"{block} is odd; images must be multiples of "
                                     f"{cfg.downsample_factor}")
                x = _Sub(c, 2, self.dtype, name=f"{block}.downsamplers.0")(x, conv_settings)
        x = MidBlock(g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(
            x, conv_settings)
        x = nn.silu(_norm(x, "conv_norm_out", g, self.dtype))
        return layers.Conv(2 * cfg.latent_channels, 3, dtype=self.dtype, name="conv_out")(
            x, conv_settings)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, conv_settings=None):
        cfg, g = self.config, self.config.norm_num_groups
        chans = tuple(reversed(cfg.block_out_channels))
        x = layers.Conv(chans[0], 3, dtype=self.dtype, name="conv_in")(z, conv_settings)
        x = MidBlock(g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(
            x, conv_settings)
        for i, c in enumerate(chans):
            block = f"up_blocks.{i}"
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock(c, g, self.dtype, name=f"{block}.resnets.{j}")(x, conv_settings)
            if i < len(chans) - 1:
                x = _Sub(c, 1, self.dtype, name=f"{block}.upsamplers.0")(
                    layers.upsample_nearest(x, 2), conv_settings)
        x = nn.silu(_norm(x, "conv_norm_out", g, self.dtype))
        return layers.Conv(cfg.out_channels, 3, dtype=self.dtype, name="conv_out")(
            x, conv_settings)


class AutoencoderKL(nn.Module):
    """encode: images NHWC in [-1, 1] -> (mean, logvar); decode: latents NHWC -> images.
    dtype is the compute dtype; params and norms are float32."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = layers.Conv(2 * cfg.latent_channels, 1, dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = layers.Conv(cfg.latent_channels, 1, dtype=self.dtype)

    def encode(self, images, conv_settings=None):
        h = self.encoder(images, conv_settings)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)  # DiagonalGaussianDistribution's clamp

    def decode(self, latents, conv_settings=None):
        z = latents
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z, conv_settings)

    def __call__(self, images, conv_settings=None):
        """Reconstruction from the mean (initialises every param)."""
        mean, _ = self.encode(images, conv_settings)
        return self.decode(mean, conv_settings)


def to_latents(config: VAEConfig, mean, logvar=None, key=None):
    """Diffusion-space latents (z - shift) * scaling_factor; z = mean, or a sample of the
    posterior when `key` is given (then logvar is needed)."""
    z = mean
    if key is not None:
        if logvar is None:
            raise ValueError("to_latents: sampling (key given) needs logvar")
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def from_latents(config: VAEConfig, latents):
    """The inverse of to_latents: what decode takes."""
    return latents / config.scaling_factor + (config.shift_factor or 0.0)


def _example(config: VAEConfig):
    f = config.downsample_factor
    return jnp.zeros((1, 2 * f, 2 * f, config.in_channels), jnp.float32)


def abstract_boxed(config: VAEConfig):
    """Shapes/dtypes of the params tree with their logical axis names (no compute)."""
    model = AutoencoderKL(config)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _example(config)))["params"]


def abstract_params(config: VAEConfig):
    """Shapes/dtypes of the params tree (no compute)."""
    return nn.meta.unbox(abstract_boxed(config))


def init_params(config: VAEConfig, key):
    return nn.meta.unbox(AutoencoderKL(config).init(key, _example(config))["params"])
