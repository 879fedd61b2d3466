"""The VAE decoder (models/vae.py) walked op by op over horizontal strips, so that a 4096 x 4096
decode fits a device: the full intermediate tensors live in host memory (numpy) between ops
and each jitted strip function sees one strip of rows (+ a halo), so its device memory is set
by the strip size and the width, not by the image height.

Unlike ScaleCrafter's "sync tiled decode" (overlapping tiles blended, attention per tile) this
is the untiled decode up to float rounding:
- a 3x3 conv reads one halo row on each side of its strip, zeroed outside the image exactly
  as SAME padding zeroes it (after the norm and SiLU that feed the conv);
- the nearest upsample + conv runs on the low-res strip with its halo;
- every GroupNorm is over the whole tensor: each strip function also returns its output
  strip's per-channel mean and squared deviations (float32, two-pass within the strip),
  merged on the host in float64 with Chan's parallel formula, then applied inside the next
  strip function, fused with its SiLU and conv;
- residuals and conv_shortcut are added in the strip that produces conv2's output;
- the mid-block attention is exact over all latent tokens: K and V of the whole latent stay
  on the device (2 x tokens x channels, 1 GiB in float32 for a 512 x 512 latent of SD's VAE),
  queries go a strip at a time, in blocks whose logits hold at most ATTENTION_LOGITS floats.

ScaleCrafter's re-dilation of VAE convs (conv_settings) is not supported here: a dilated conv
would need a wider halo.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.models import layers
from ediffi_jax.models.vae import EPS, VAEConfig

# Logits of one query block: queries x all latent tokens float32 values (256 MiB).
ATTENTION_LOGITS = 1 << 26


def decode_tiled(config: VAEConfig, params, latents, *, rows: int = 8, dtype=jnp.float32,
                 query_block: int | None = None) -> np.ndarray:
    """AutoencoderKL.decode(latents) (latents in the VAE's own scale, NHWC) as a numpy array,
    strip by strip. rows: latent rows per strip (each level's strips cover the same image
    band, rows x 2^level rows there); query_block: attention queries per block (default: as
    many as ATTENTION_LOGITS allows)."""
    _check(rows, query_block)
    return _decode(_Execute(), config, params, np.asarray(latents), rows, jnp.dtype(dtype),
                   query_block)


def compile_strips(config: VAEConfig, params, latent_shape, *, rows: int = 8,
                   dtype=jnp.float32, query_block: int | None = None) -> dict:
    """{label: jax Compiled} of every distinct strip function a decode of latents of
    `latent_shape` [B, h, w, C] runs, compiled on abstract inputs (nothing executes, params
    may be ShapeDtypeStructs): their memory_analysis() is the decode's device memory."""
    _check(rows, query_block)
    lower = _Lower()
    _decode(lower, config, params, _Virtual(tuple(latent_shape), np.dtype(np.float32)), rows,
            jnp.dtype(dtype), query_block)
    return lower.compiled


def peak_bytes(compiled) -> int:
    """Device bytes a compiled function holds at once: arguments, outputs and scratch."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def _check(rows, query_block):
    if not (isinstance(rows, (int, np.integer)) and rows >= 1):
        raise ValueError(f"tiled VAE decode: rows must be an integer >= 1, got {rows!r}")
    if query_block is not None and not (isinstance(query_block, (int, np.integer))
                                        and query_block >= 1):
        raise ValueError(f"tiled VAE decode: query_block must be an integer >= 1, got "
                         f"{query_block!r}")


class _Execute:
    """Runs strip functions; host arrays are numpy."""

    @staticmethod
    def alloc(shape, dtype):
        return np.empty(shape, dtype)

    @staticmethod
    def resident(array):
        return jax.device_put(array)

    def __call__(self, label, fn, *args):
        return jax.tree.map(np.asarray, fn(*args))


class _Virtual:
    """A host array that is never materialised (reads are zeros, writes are dropped), so that
    _Lower can walk a 4096^2 decode without its host memory."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __getitem__(self, index):
        return np.broadcast_to(np.zeros((), self.dtype), self.shape)[index]

    def __setitem__(self, index, value):
        pass

    def reshape(self, *shape):
        return _Virtual(shape, self.dtype)


class _Lower:
    """Compiles each distinct strip function on abstract inputs instead of running it."""

    def __init__(self):
        self.compiled: dict = {}
        self._outputs: dict = {}

    @staticmethod
    def alloc(shape, dtype):
        return _Virtual(shape, dtype)

    @staticmethod
    def resident(array):
        return array

    def __call__(self, label, fn, *args):
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)
        leaves, tree = jax.tree.flatten(abstract)
        key = (fn, tree, tuple((a.shape, a.dtype) for a in leaves))
        if key not in self._outputs:
            self.compiled[f"{label} {_shape_text(args[0])}"] = fn.lower(*abstract).compile()
            self._outputs[key] = jax.eval_shape(fn, *abstract)
        return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape),
                            self._outputs[key])


def _shape_text(array) -> str:
    return "x".join(map(str, np.shape(array)))


class _Tensor:
    """A full intermediate in host memory with its per-(example, channel) statistics,
    accumulated strip by strip (Chan et al.'s parallel mean / M2 merge, float64)."""

    def __init__(self, array):
        self.array = array
        self.count = 0
        self.mean = self.m2 = 0.0

    def add(self, count: int, mean, m2):
        mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * count / total)
        self.count = total

    def norm(self, p, groups: int):
        """(mean, 1 / std, scale, bias) of the GroupNorm `p` over the whole tensor, for
        _normalise: layers.group_norm's statistics (eps 1e-6, biased variance)."""
        b, c = self.mean.shape
        per = c // groups
        means = self.mean.reshape(b, groups, per)
        group_mean = means.mean(axis=-1, keepdims=True)
        group_m2 = (self.m2.reshape(b, groups, per).sum(axis=-1, keepdims=True)
                    + self.count * np.square(means - group_mean).sum(axis=-1, keepdims=True))
        var = group_m2 / (self.count * per)
        per_channel = lambda a: np.broadcast_to(a, (b, groups, per)).reshape(b, c).astype(  # noqa: E731
            np.float32)
        return per_channel(group_mean), per_channel(1.0 / np.sqrt(var + EPS)), p["scale"], p["bias"]


class _Strips:
    """Strip k of a level covers rows [k * size, (k + 1) * size); the last may pass the
    bottom (its strip function sees zeros there, its extra rows are dropped)."""

    def __init__(self, height: int, size: int):
        self.height, self.size = height, size

    def __iter__(self):
        for lo in range(0, self.height, self.size):
            yield lo, min(lo + self.size, self.height) - lo

    def doubled(self) -> "_Strips":
        return _Strips(2 * self.height, 2 * self.size)


def _rows(array, lo: int, hi: int):
    """Rows [lo, hi) of an NHWC host array, zeros where they fall outside it."""
    h = array.shape[1]
    strip = np.asarray(array[:, max(lo, 0):min(hi, h)])
    pad = (max(-lo, 0), max(hi - max(h, lo), 0))
    if pad == (0, 0):
        return strip
    return np.pad(strip, ((0, 0), pad, (0, 0), (0, 0)))


def _decode(ex, config, params, z, rows, dtype, query_block):
    dec, groups = params["decoder"], config.norm_num_groups
    strips = _Strips(z.shape[1], min(rows, z.shape[1]))
    pre = params["post_quant_conv"] if config.use_post_quant_conv else None
    x = _conv(ex, "conv_in", strips, _Tensor(z), dec["conv_in"], dtype, pre=pre)
    mid = dec["mid_block"]
    x = _resnet(ex, "mid_block.resnets.0", strips, x, mid["resnets.0"], groups, dtype)
    if config.mid_block_add_attention:
        x = _attention(ex, strips, x, mid["attentions.0"], groups, dtype, query_block)
    x = _resnet(ex, "mid_block.resnets.1", strips, x, mid["resnets.1"], groups, dtype)
    levels = len(config.block_out_channels)
    for i in range(levels):
        for j in range(config.layers_per_block + 1):
            name = f"up_blocks.{i}.resnets.{j}"
            x = _resnet(ex, name, strips, x, dec[name], groups, dtype)
        if i < levels - 1:
            name = f"up_blocks.{i}.upsamplers.0"
            x = _conv(ex, name, strips, x, dec[name]["conv"], dtype, upsample=True)
            strips = strips.doubled()
    return _conv(ex, "conv_out", strips, x, dec["conv_out"], dtype,
                 norm=x.norm(dec["conv_norm_out"], groups), stats=False).array


def _resnet(ex, name, strips, x, p, groups, dtype):
    h = _conv(ex, f"{name}.conv1", strips, x, p["conv1"], dtype, norm=x.norm(p["norm1"], groups))
    return _conv(ex, f"{name}.conv2", strips, h, p["conv2"], dtype,
                 norm=h.norm(p["norm2"], groups), residual=x, shortcut=p.get("conv_shortcut"))


def _conv(ex, label, strips, x, conv, dtype, *, norm=None, pre=None, residual=None,
          shortcut=None, upsample=False, stats=True):
    """One 3x3 conv over the whole tensor x, strip by strip: conv(mask(silu(norm(x)) or
    pre(x) or x), upsampled first if asked) (+ residual, through shortcut)."""
    b, h, w, _ = x.array.shape
    factor = 2 if upsample else 1
    out = _Tensor(ex.alloc((b, h * factor, w * factor, conv["kernel"].shape[-1]), dtype))
    fn = _conv_strip_fn(dtype, upsample)
    for lo, valid in strips:
        res = None if residual is None else _rows(residual.array, lo, lo + strips.size)
        y, mean, m2 = ex(label, fn, _rows(x.array, lo - 1, lo + strips.size + 1),
                         np.int32(lo - 1), np.int32(h), conv, norm, pre, res, shortcut)
        out.array[:, lo * factor:(lo + valid) * factor] = y[:, :valid * factor]
        if stats:
            out.add(valid * factor * w * factor, mean, m2)
    return out


def _attention(ex, strips, x, p, groups, dtype, query_block):
    """The mid block's attention over all tokens: K and V strip by strip onto the device,
    then each strip's queries against them."""
    b, h, w, c = x.array.shape
    norm = x.norm(p["group_norm"], groups)
    keys, values = ex.alloc((b, h, w, c), dtype), ex.alloc((b, h, w, c), dtype)
    for lo, valid in strips:
        k, v = ex("mid_block.attentions.0 k/v", _kv_strip_fn(dtype),
                  _rows(x.array, lo, lo + strips.size), norm, p["to_k"], p["to_v"])
        keys[:, lo:lo + valid], values[:, lo:lo + valid] = k[:, :valid], v[:, :valid]
    keys = ex.resident(keys.reshape(b, h * w, 1, c))
    values = ex.resident(values.reshape(b, h * w, 1, c))
    block = min(query_block or max(1, ATTENTION_LOGITS // (h * w)), strips.size * w)
    fn = _attention_strip_fn(dtype, block)
    out = _Tensor(ex.alloc((b, h, w, c), dtype))
    for lo, valid in strips:
        y, mean, m2 = ex("mid_block.attentions.0", fn, _rows(x.array, lo, lo + strips.size),
                         np.int32(lo), np.int32(h), norm, p["to_q"], p["to_out.0"], keys,
                         values)
        out.array[:, lo:lo + valid] = y[:, :valid]
        out.add(valid * w, mean, m2)
    return out


def _normalise(x, norm, dtype):
    """silu(GroupNorm(x)) from whole-tensor statistics, as vae._norm + nn.silu compute it."""
    mean, inv_std, scale, bias = norm
    gain = inv_std * scale.astype(jnp.float32)
    y = ((x.astype(jnp.float32) - mean[:, None, None, :]) * gain[:, None, None, :]
         + bias.astype(jnp.float32))
    return y.astype(dtype)


def _dense(x, p, dtype):
    """layers.Dense's math."""
    return jnp.dot(x.astype(dtype), p["kernel"].astype(dtype)) + p["bias"].astype(dtype)


def _conv_valid_rows(x, p, dtype):
    """layers.Conv's math, SAME along the width and VALID along the rows (the strip's halo
    holds the rows SAME would pad)."""
    k = p["kernel"].shape[1]
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), p["kernel"].astype(dtype), (1, 1), [(0, 0), (k // 2, k // 2)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["bias"].astype(dtype)


def _row_mask(first_row, height, n: int):
    rows = first_row + jnp.arange(n)
    return (rows >= 0) & (rows < height)


def _strip_stats(y, first_row, height):
    """Per-(example, channel) mean and sum of squared deviations over the strip's rows that
    lie inside the image (two passes, float32)."""
    mask = _row_mask(first_row, height, y.shape[1])[None, :, None, None]
    count = jnp.sum(mask) * y.shape[2]
    y32 = jnp.where(mask, y.astype(jnp.float32), 0.0)
    mean = jnp.sum(y32, axis=(1, 2)) / count
    centred = jnp.where(mask, y32 - mean[:, None, None, :], 0.0)
    return mean, jnp.sum(jnp.square(centred), axis=(1, 2))


@functools.lru_cache(maxsize=None)
def _conv_strip_fn(dtype, upsample: bool):
    def strip(x, first_row, height, conv, norm, pre, residual, shortcut):
        """x: the strip's rows with one halo row each side, from global row first_row of a
        tensor `height` rows tall -> (conv output rows, their statistics)."""
        if norm is not None:
            x = jax.nn.silu(_normalise(x, norm, dtype))
        elif pre is not None:
            x = _conv_valid_rows(x, pre, dtype)
        x = jnp.where(_row_mask(first_row, height, x.shape[1])[None, :, None, None],
                      x.astype(dtype), jnp.zeros((), dtype))  # SAME's zero rows
        if upsample:  # upsampled rows 2 * first_row + 1 .. end - 1: one halo row each side
            x = layers.upsample_nearest(x, 2)[:, 1:-1]
            first_row, height = 2 * first_row + 1, 2 * height
        y = _conv_valid_rows(x, conv, dtype)
        if residual is not None:
            if shortcut is not None:
                residual = _conv_valid_rows(residual, shortcut, dtype)
            y = residual.astype(dtype) + y
        return (y,) + _strip_stats(y, first_row + 1, height)

    return jax.jit(strip)


@functools.lru_cache(maxsize=None)
def _kv_strip_fn(dtype):
    def strip(x, norm, to_k, to_v):
        h = _normalise(x, norm, dtype)
        return _dense(h, to_k, dtype), _dense(h, to_v, dtype)

    return jax.jit(strip)


@functools.lru_cache(maxsize=None)
def _attention_strip_fn(dtype, block: int):
    def strip(x, first_row, height, norm, to_q, to_out, keys, values):
        """Attention.__call__ for the strip's queries against every key, `block` queries at
        a time (a sequential loop, so one block's logits are live at once)."""
        b, r, w, c = x.shape
        tokens = r * w
        q = _dense(_normalise(x, norm, dtype), to_q, dtype).reshape(b, tokens, 1, c)
        blocks = math.ceil(tokens / block)
        q = jnp.pad(q, ((0, 0), (0, blocks * block - tokens), (0, 0), (0, 0)))
        q = jnp.moveaxis(q.reshape(b, blocks, block, 1, c), 1, 0)
        out = jax.lax.map(lambda qb: layers.attention(qb, keys, values), q)
        out = jnp.moveaxis(out, 0, 1).reshape(b, blocks * block, c)[:, :tokens]
        y = x.astype(dtype) + _dense(out.astype(dtype), to_out, dtype).reshape(b, r, w, c)
        return (y,) + _strip_stats(y, first_row, height)

    return jax.jit(strip)
