"""CLIP's text and vision towers in Flax linen, numerically Hugging Face's
`CLIPTextModelWithProjection` and `CLIPVisionModelWithProjection`.

Both are pre-norm transformers (LayerNorm, attention with biases, an MLP of quick_gelu or gelu).
The text tower is causal, ends in a final LayerNorm, pools at the end-of-text token and projects;
the vision tower embeds patches with a strided conv, prepends a class token, normalises before
the encoder (CLIP's "pre_layrnorm"), pools the class token through a LayerNorm and projects.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.encoders.hf import config_from_hf
from ediffi_jax.models.layers import Dense, _param, attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2 means transformers' legacy pooling: at the largest id
    projection: bool = True  # False: a plain CLIPTextModel (SD 1.x / 2.x), no text_projection
    dtype: str = "float32"

    def __post_init__(self):
        _check_act(self.hidden_act)

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "CLIPTextConfig":
        """From a CLIPTextConfig's config.json or a CLIPModel's (its text_config)."""
        if "text_config" in hf:
            hf = {**hf["text_config"], "projection_dim": hf.get("projection_dim", 512)}
        elif hf.get("architectures") == ["CLIPTextModel"]:
            overrides = {"projection": False, **overrides}
        return config_from_hf(cls, hf, **overrides)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        _check_act(self.hidden_act)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "CLIPVisionConfig":
        if "vision_config" in hf:
            hf = {**hf["vision_config"], "projection_dim": hf.get("projection_dim", 512)}
        return config_from_hf(cls, hf, **overrides)


def _check_act(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not one of {sorted(ACTIVATIONS)}")


class LayerNorm(nn.Module):
    """LayerNorm with statistics in float32 (parameter names of the logical-axis layers)."""

    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", _param(nn.initializers.ones_init(), ("norm",)), (c,), jnp.float32)
        bias = self.param("bias", _param(nn.initializers.zeros_init(), ("norm",)), (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


class EncoderLayer(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    act: str
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x, mask=None):
        b, n, d = x.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        h = LayerNorm(self.eps, self.dtype, name="layer_norm1")(x)
        q, k, v = (Dense(d, ("embed", "heads"), dtype=self.dtype, name=nm)(h)
                   .reshape(b, n, heads, head_dim) for nm in ("q_proj", "k_proj", "v_proj"))
        o = attention(q, k, v, mask=mask).reshape(b, n, d)
        x = x + Dense(d, ("heads", "embed"), dtype=self.dtype, name="out_proj")(o)
        h = LayerNorm(self.eps, self.dtype, name="layer_norm2")(x)
        h = ACTIVATIONS[self.act](Dense(self.intermediate_size, ("embed", "mlp"), dtype=self.dtype,
                                        name="fc1")(h))
        return x + Dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


def _layers(cfg, x, mask, parent_name="layer"):
    for i in range(cfg.num_hidden_layers):
        x = EncoderLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                         cfg.hidden_act, cfg.layer_norm_eps, jnp.dtype(cfg.dtype),
                         name=f"{parent_name}_{i}")(x, mask)
    return x


class CLIPTextTower(nn.Module):
    """input_ids [B, N], attention_mask [B, N] or None -> (hidden state [B, N, D], pooled
    [B, D], projected [B, P] or None without a projection), float32.

    hidden_layer None: the last layer's output after the final LayerNorm. An int k:
    transformers' hidden_states[k] (k layers applied; negative counts from the end, -1 the last
    layer's output), after the final LayerNorm only with `norm_hidden` (SD's clip_skip
    normalises hidden_states[-(clip_skip + 1)], SDXL takes hidden_states[-2] as it is). The
    pooled vector is always the final one."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, hidden_layer: int | None = None,
                 norm_hidden: bool = False):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        b, n = input_ids.shape
        if n > cfg.max_position_embeddings:
            raise ValueError(f"{n} tokens exceed CLIP's {cfg.max_position_embeddings} positions")
        tokens = self.param("token_embedding", _param(nn.initializers.normal(0.02), ("vocab", "embed")),
                            (cfg.vocab_size, cfg.hidden_size), jnp.float32)
        positions = self.param("position_embedding",
                               _param(nn.initializers.normal(0.01), (None, "embed")),
                               (cfg.max_position_embeddings, cfg.hidden_size), jnp.float32)
        x = (jnp.take(tokens, input_ids, axis=0) + positions[:n]).astype(dtype)
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            mask = jnp.logical_and(mask, attention_mask.astype(bool)[:, None, None, :])
        depth = cfg.num_hidden_layers
        k = None if hidden_layer is None else (hidden_layer % (depth + 1))
        if hidden_layer is not None and not -(depth + 1) <= hidden_layer <= depth:
            raise ValueError(f"hidden_layer {hidden_layer} is outside this CLIP text tower's "
                             f"{depth + 1} hidden states")
        selected = x
        for i in range(depth):
            x = EncoderLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                             cfg.hidden_act, cfg.layer_norm_eps, dtype, name=f"layer_{i}")(x, mask)
            if k == i + 1:
                selected = x
        final_norm = LayerNorm(cfg.layer_norm_eps, jnp.float32, name="final_layer_norm")
        x = final_norm(x)
        if k is not None and norm_hidden:
            selected = final_norm(selected)
        hidden = x if k is None else selected.astype(jnp.float32)
        if cfg.eos_token_id == 2:  # transformers' legacy rule: the end-of-text id is the largest
            eot = jnp.argmax(input_ids, axis=-1)
        else:  # the first end-of-text token
            eot = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = x[jnp.arange(b), eot]
        if not cfg.projection:
            return hidden, pooled, None
        projected = Dense(cfg.projection_dim, ("embed", "mlp"), use_bias=False, dtype=jnp.float32,
                          name="text_projection")(pooled)
        return hidden, pooled, projected


class CLIPVisionTower(nn.Module):
    """pixel_values [B, H, W, C] (NHWC, CLIP-normalised) -> (last hidden state [B, 1 + P, D],
    pooled [B, D], projected [B, P]), float32."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        p, d = cfg.patch_size, cfg.hidden_size
        if pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
            raise ValueError(f"pixel_values {pixel_values.shape[1:]} must be "
                             f"({cfg.image_size}, {cfg.image_size}, {cfg.num_channels}) (NHWC)")
        kernel = self.param("patch_embedding",
                            _param(nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "embed")),
                            (p, p, cfg.num_channels, d), jnp.float32)
        x = jax.lax.conv_general_dilated(
            pixel_values.astype(dtype), kernel.astype(dtype), (p, p), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        b = x.shape[0]
        x = x.reshape(b, -1, d)
        cls = self.param("class_embedding", _param(nn.initializers.normal(1.0), ("embed",)), (d,),
                         jnp.float32)
        positions = self.param("position_embedding",
                               _param(nn.initializers.normal(0.02), (None, "embed")),
                               ((cfg.image_size // p) ** 2 + 1, d), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, d)), x], axis=1)
        x = x + positions.astype(dtype)
        x = LayerNorm(cfg.layer_norm_eps, dtype, name="pre_layernorm")(x)
        x = _layers(cfg, x, None).astype(jnp.float32)
        pooled = LayerNorm(cfg.layer_norm_eps, jnp.float32, name="post_layernorm")(x[:, 0])
        projected = Dense(cfg.projection_dim, ("embed", "mlp"), use_bias=False, dtype=jnp.float32,
                          name="visual_projection")(pooled)
        return x, pooled, projected


def _layer_names(num_layers: int, hf_prefix: str) -> dict:
    names = {}
    for i in range(num_layers):
        hf, mine = f"{hf_prefix}.encoder.layers.{i}", f"layer_{i}"
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            names[(mine, p, "kernel")] = (f"{hf}.self_attn.{p}.weight", "linear")
            names[(mine, p, "bias")] = (f"{hf}.self_attn.{p}.bias", "raw")
        for p in ("fc1", "fc2"):
            names[(mine, p, "kernel")] = (f"{hf}.mlp.{p}.weight", "linear")
            names[(mine, p, "bias")] = (f"{hf}.mlp.{p}.bias", "raw")
        for p in ("layer_norm1", "layer_norm2"):
            names[(mine, p, "scale")] = (f"{hf}.{p}.weight", "raw")
            names[(mine, p, "bias")] = (f"{hf}.{p}.bias", "raw")
    return names


def text_hf_names(config: CLIPTextConfig) -> dict:
    """Flax param path -> (Hugging Face tensor name, conversion), for CLIPTextModelWithProjection
    and CLIPModel checkpoints alike (both name the tower `text_model.`)."""
    names = _layer_names(config.num_hidden_layers, "text_model")
    names[("token_embedding",)] = ("text_model.embeddings.token_embedding.weight", "embedding")
    names[("position_embedding",)] = ("text_model.embeddings.position_embedding.weight", "embedding")
    names[("final_layer_norm", "scale")] = ("text_model.final_layer_norm.weight", "raw")
    names[("final_layer_norm", "bias")] = ("text_model.final_layer_norm.bias", "raw")
    if config.projection:
        names[("text_projection", "kernel")] = ("text_projection.weight", "linear")
    return names


def vision_hf_names(config: CLIPVisionConfig) -> dict:
    names = _layer_names(config.num_hidden_layers, "vision_model")
    names[("patch_embedding",)] = ("vision_model.embeddings.patch_embedding.weight", "conv")
    names[("class_embedding",)] = ("vision_model.embeddings.class_embedding", "raw")
    names[("position_embedding",)] = ("vision_model.embeddings.position_embedding.weight", "embedding")
    for mine, hf in (("pre_layernorm", "pre_layrnorm"), ("post_layernorm", "post_layernorm")):
        names[(mine, "scale")] = (f"vision_model.{hf}.weight", "raw")
        names[(mine, "bias")] = (f"vision_model.{hf}.bias", "raw")
    names[("visual_projection", "kernel")] = ("visual_projection.weight", "linear")
    return names


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(images, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """CLIP's image preprocessing (as transformers' CLIPImageProcessor and OpenAI's code): the
    shortest side resized to `size` (PIL bicubic), a centre crop of size x size, /255, then
    normalised by CLIP's mean/std. Images: PIL images or uint8 arrays [H, W, 3] (greyscale and
    RGBA are converted to RGB). Returns float32 [N, size, size, 3] (NHWC)."""
    from PIL import Image

    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        image = image.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
        w, h = image.size
        top, left = int((h - size) / 2.0), int((w - size) / 2.0)
        image = image.crop((left, top, left + size, top + size))
        x = np.asarray(image, np.float32) * np.float32(1 / 255)
        out.append((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))
    return np.stack(out)
