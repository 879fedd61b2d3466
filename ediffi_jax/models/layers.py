"""Layers shared by the U-Nets: every parameter carries logical axis names (parallel/mesh.py's
rules map them onto a mesh), normalisation statistics and softmax run in float32.

`Conv` is the one place where a 3x3 convolution happens, so that ScaleCrafter-style plans can
re-dilate any conv by its stable layer path (e.g. "down_1/res_0/conv1") without touching
parameters: the dilation is a static, per-call setting, not a parameter.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "auto")


def _param(init, names):
    return nn.with_logical_partitioning(init, names)


zeros_init = nn.initializers.zeros_init()
default_kernel_init = nn.initializers.lecun_normal()


@dataclasses.dataclass(frozen=True)
class KernelMap:
    """A fixed linear map of a conv kernel's taps, e.g. ScaleCrafter's 3x3 -> 5x5 dispersion
    (highres/disperse.py makes it): matrix [out taps, in taps], held as nested tuples so a
    ConvSetting stays hashable (a static jit argument)."""

    name: str
    matrix: tuple[tuple[float, ...], ...]

    def __str__(self) -> str:
        return self.name

    def __call__(self, kernel):
        """HWIO kernel -> HWIO kernel of the map's output size."""
        r = np.asarray(self.matrix)
        kh, kw, cin, cout = kernel.shape
        if kh * kw != r.shape[1]:
            raise ValueError(f"kernel map {self.name!r} takes {r.shape[1]} taps, the kernel "
                             f"has {kh}x{kw}")
        big = int(round(math.sqrt(r.shape[0])))
        flat = kernel.reshape(kh * kw, cin, cout)
        return jnp.einsum("ts,sio->tio", jnp.asarray(r, kernel.dtype), flat).reshape(
            big, big, cin, cout)


@dataclasses.dataclass(frozen=True)
class ConvSetting:
    """Static per-layer conv behaviour at sampling time (ScaleCrafter's re-dilation).

    dilation: the kernel's dilation d. scale: fractional re-dilation resizes the input by s
    (bilinear, no antialias), convolves with dilation d and resizes the output back, so the
    receptive field grows by d / s. kernel_map: the kernel is mapped before the conv (the
    dispersed convolution's 3x3 -> 5x5 kernel).
    """

    dilation: int = 1
    scale: float = 1.0
    kernel_map: KernelMap | None = None

    def __post_init__(self):
        if not (isinstance(self.dilation, int) and self.dilation >= 1):
            raise ValueError(f"conv dilation must be an integer >= 1, got {self.dilation!r}")
        if not self.scale >= 1.0:
            raise ValueError(f"conv scale must be >= 1, got {self.scale!r}")

    def __str__(self) -> str:  # compact, for plan descriptions: d2, d3/s1.2, d2+dispersed
        scale = f"/s{self.scale:.3g}" if self.scale != 1.0 else ""
        return f"d{self.dilation}{scale}{f'+{self.kernel_map}' if self.kernel_map else ''}"


DEFAULT_CONV = ConvSetting()
ConvSettings = Mapping[str, ConvSetting]


def layer_path(module: nn.Module) -> str:
    """The stable path of a module inside the root model, e.g. 'down_1/res_0/conv1'."""
    return "/".join(module.scope.path)


# From this many input channels, a conv on the CPU runs as one matmul over the kh*kw shifted
# views (im2col): XLA's CPU convolution reaches ~70 GFLOP/s on an 8x8 map of 2560 channels
# (the SD U-Net's inner blocks), the matmul ~3x that; for the narrower convs of the project's
# own U-Nets the convolution is faster (BENCHMARKS.md, issue 21).
IM2COL_MIN_CHANNELS = 1024


def conv2d(x, kernel, *, stride: int = 1, dilation: int = 1, padding: int | None = None):
    """NHWC x HWIO convolution; dilation via rhs_dilation (no zero kernel). padding None: SAME;
    an int p: p * dilation zeros on every side (torch's Conv2d(padding=p) re-dilated as
    ScaleCrafter does, which differs from SAME for stride 2: diffusers' Downsample2D)."""
    kh, kw = kernel.shape[:2]
    _, h, w, _ = x.shape
    if padding is None:  # SAME: XLA's split of the total padding, low side first
        pads = []
        for size, k in ((h, kh), (w, kw)):
            out = -(-size // stride)
            total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = [(padding * dilation,) * 2] * 2
    out_h = (h + sum(pads[0]) - (kh - 1) * dilation - 1) // stride + 1
    out_w = (w + sum(pads[1]) - (kw - 1) * dilation - 1) // stride + 1
    if (kh * kw > 1 and x.shape[-1] >= IM2COL_MIN_CHANNELS
            and jax.default_backend() == "cpu"):
        return _conv2d_im2col(x, kernel, stride, dilation, pads, out_h, out_w)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=pads,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _conv2d_im2col(x, kernel, stride, dilation, pads, out_h, out_w):
    """The same convolution as one [B*H*W, kh*kw*C] x [kh*kw*C, O] matmul."""
    kh, kw, cin, cout = kernel.shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    views = [jax.lax.slice(xp, (0, i * dilation, j * dilation, 0),
                           (xp.shape[0], i * dilation + (out_h - 1) * stride + 1,
                            j * dilation + (out_w - 1) * stride + 1, cin),
                           (1, stride, stride, 1))
             for i in range(kh) for j in range(kw)]
    cols = jnp.concatenate(views, axis=-1)
    return jnp.dot(cols, kernel.reshape(kh * kw * cin, cout))


class Conv(nn.Module):
    """A kxk conv whose dilation comes from `conv_settings[layer path]` (default 1).
    padding: None for SAME, or torch-style symmetric padding (see conv2d)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    zero_init: bool = False
    padding: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, conv_settings: ConvSettings | None = None):
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            _param(zeros_init if self.zero_init else default_kernel_init,
                   ("conv_h", "conv_w", "conv_in", "conv_out")),
            (k, k, x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param("bias", _param(zeros_init, ("conv_out",)), (self.features,), jnp.float32)
        setting = (conv_settings or {}).get(layer_path(self), DEFAULT_CONV)
        return redilated_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                              setting, self.padding) + bias.astype(self.dtype)


def resize_bilinear(x, height: int, width: int):
    """NHWC bilinear resize with half-pixel centres and no antialias (torch's
    F.interpolate(mode="bilinear", align_corners=False)), in float32."""
    if x.shape[1:3] == (height, width):
        return x
    y = jax.image.resize(x.astype(jnp.float32), (x.shape[0], height, width, x.shape[3]),
                         "bilinear", antialias=False)
    return y.astype(x.dtype)


def upsample_nearest(x, factor: int = 2):
    """NHWC nearest-neighbour upsampling by an integer factor (each pixel repeated factor x
    factor times): jax.image.resize(method="nearest") exactly, as a broadcast and a reshape
    instead of a gather, whose gradient is a sum rather than a scatter-add (~10x faster
    backward on CPU)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


def redilated_conv(x, kernel, stride: int, setting: ConvSetting, padding: int | None = None):
    """The conv under a ConvSetting: optional kernel map (dispersion), fractional resize around
    a dilated conv (ScaleCrafter's f_k^d(h) = interp_{1/s}(interp_s(h) * dilate_d(k)))."""
    if setting.kernel_map is not None:
        k = kernel.shape[0]
        kernel = setting.kernel_map(kernel)
        if padding is not None:  # torch-style padding grows with the kernel (5x5: 2, as official)
            padding += (kernel.shape[0] - k) // 2
    if setting.scale == 1.0:
        return conv2d(x, kernel, stride=stride, dilation=setting.dilation, padding=padding)
    _, h, w, _ = x.shape
    up = resize_bilinear(x, round(h * setting.scale), round(w * setting.scale))
    y = conv2d(up, kernel, stride=stride, dilation=setting.dilation, padding=padding)
    return resize_bilinear(y, h // stride, w // stride)


class Dense(nn.Module):
    features: int
    names: tuple[str, str] = ("embed", "mlp")
    zero_init: bool = False
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            _param(zeros_init if self.zero_init else default_kernel_init, self.names),
            (x.shape[-1], self.features),
            jnp.float32,
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", _param(zeros_init, self.names[1:]), (self.features,),
                              jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def norm_groups(channels: int) -> int:
    """EDM/ADM convention: 32 groups, fewer for narrow layers (at least 4 channels a group)."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


class GroupNorm(nn.Module):
    """GroupNorm with statistics in float32; output in the compute dtype. groups None: the
    EDM/ADM rule (norm_groups); pretrained models give theirs."""

    dtype: Dtype = jnp.float32
    eps: float = 1e-5
    groups: int | None = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", _param(nn.initializers.ones_init(), ("norm",)), (c,), jnp.float32)
        bias = self.param("bias", _param(zeros_init, ("norm",)), (c,), jnp.float32)
        groups = norm_groups(c) if self.groups is None else self.groups
        if c % groups:
            raise ValueError(f"GroupNorm at {layer_path(self)}: {c} channels do not split into "
                             f"{groups} groups")
        return group_norm(x, scale, bias, groups, self.eps).astype(self.dtype)


def group_norm(x, scale, bias, groups: int, eps: float = 1e-5):
    """Normalise x [B, ..., C] over its inner axes and each group of C // groups channels, two
    passes (mean, then the mean squared deviation), in float32; then scale and bias per channel.

    The statistics are per-channel sums over the inner axes ([B, C]: a reduction over the
    middle of an NHWC array, which XLA's CPU backend vectorises over C and differentiates into
    broadcasts), combined per group on the tiny [B, C] array; the normalisation is one fused
    x * a + b with per-(example, channel) a and b. Reducing the [B, H, W, G, C/G] view over
    (H, W, C/G) instead computes the same numbers ~3x slower forward and backward on CPU
    (BENCHMARKS.md, issue 9)."""
    c = x.shape[-1]
    per = c // groups
    inner = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * per
    channel_shape = (x.shape[0],) + (1,) * len(inner) + (c,)

    def group_mean(channel_sums):  # [B, C] -> each channel's group mean, [B, C]
        sums = channel_sums.reshape(-1, groups, per).sum(axis=-1, keepdims=True)
        return jnp.broadcast_to(sums / count, sums.shape[:-1] + (per,)).reshape(channel_sums.shape)

    x32 = x.astype(jnp.float32)
    mean = group_mean(jnp.sum(x32, axis=inner))
    centred = x32 - mean.reshape(channel_shape)
    var = group_mean(jnp.sum(jnp.square(centred), axis=inner))
    gain = jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
    return centred * gain.reshape(channel_shape) + bias.astype(jnp.float32)


# On the CPU, long attention without a bias runs over blocks of this many queries: each
# block's scores [B, H, block, Nk] are exponentiated, summed and multiplied by V while still
# small, where the whole [B, H, Nq, Nk] matrix (1 GiB at SD's 64 x 64 level) would be written
# and re-read by each pass of the softmax (0.31 -> 0.22 s per layer there, BENCHMARKS.md).
CPU_QUERY_BLOCK = 512


def _query_blocked_attention(q, k, v, scale, mask):
    """attention()'s result, one query block at a time (unrolled: XLA's CPU runtime runs a
    loop body's dots far slower), batch and heads folded into one leading dim so that each
    block's two products are plain batched matmuls, normalised after the V product:
    sum_k e_qk v_k / sum_k e_qk."""
    b, nq, h, d = q.shape
    fold = lambda t: jnp.transpose(t, (0, 2, 1, 3)).reshape(b * h, t.shape[1], d)  # noqa: E731
    # The scale on q, not on the scores: one pass over [B, H, Nq, Nk] fewer (0.29 -> 0.21 s).
    q, k, v = fold(q * jnp.asarray(scale, q.dtype)), fold(k), fold(v)
    if mask is not None:  # [B or 1, H or 1, Nq or 1, Nk] -> [B * H, Nq or 1, Nk]
        mask = jnp.broadcast_to(mask, (b, h) + mask.shape[2:]).reshape((b * h,) + mask.shape[2:])
    outs = []
    for start in range(0, nq, CPU_QUERY_BLOCK):
        stop = min(start + CPU_QUERY_BLOCK, nq)
        logits = jnp.einsum("nqd,nkd->nqk", q[:, start:stop], k,
                            preferred_element_type=jnp.float32)
        if mask is not None:
            logits = jnp.where(mask if mask.shape[1] == 1 else mask[:, start:stop], logits,
                               -1e30)
        e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        out = jnp.einsum("nqk,nkd->nqd", e.astype(v.dtype), v,
                         preferred_element_type=jnp.float32)
        outs.append(out / jnp.sum(e, axis=-1, keepdims=True))
    out = jnp.concatenate(outs, axis=1).reshape(b, h, nq, d)
    return jnp.transpose(out, (0, 2, 1, 3)).astype(v.dtype)


def attention(q, k, v, *, key_mask=None, mask=None, bias=None, bias_fn=None,
              scale: float | None = None, implementation: str = "xla"):
    """softmax((Q K^T + bias) * scale) V over heads; scale defaults to 1/sqrt(d).

    q: [B, Nq, H, D]; k, v: [B, Nk, H, D]; key_mask: [B, Nk] (True/1 = attend); mask: boolean,
    broadcastable to [B, H, Nq, Nk] (a causal mask); bias: additive logits before the scaling,
    broadcastable to [B, H, Nq, Nk] (paint-with-words adds w * A here; T5 its position bias,
    with scale 1); bias_fn: logits Q K^T [B, H, Nq, Nk] (before scaling) -> a bias to add,
    for biases that depend on the logits (paint-with-words). Softmax in float32.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if key_mask is not None:
        keys = key_mask.astype(bool)[:, None, None, :]
        mask = keys if mask is None else jnp.logical_and(mask, keys)
    qk = lambda: jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # noqa: E731
    if implementation != "xla":
        if bias_fn is not None:
            extra = bias_fn(qk())
            bias = extra if bias is None else bias + extra
        return jax.nn.dot_product_attention(
            q, k, v,
            bias=None if bias is None else (bias * scale).astype(q.dtype),
            mask=mask, scale=scale,
            implementation=None if implementation == "auto" else implementation,
        )
    if (bias is None and bias_fn is None and q.shape[1] >= 2 * CPU_QUERY_BLOCK
            and k.shape[1] >= CPU_QUERY_BLOCK and jax.default_backend() == "cpu"):
        return _query_blocked_attention(q, k, v, scale, mask)
    logits = qk()
    if bias_fn is not None:
        bias = bias_fn(logits) if bias is None else bias + bias_fn(logits)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    logits = logits * scale
    if mask is not None:
        logits = jnp.where(mask, logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
