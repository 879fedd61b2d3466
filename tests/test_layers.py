"""Dilatable convs, GroupNorm, attention, and the U-Net's layer paths."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.diffusion import edm
from ediffi_jax.models.layers import (
    ConvSetting, GroupNorm, attention, conv2d, norm_groups, upsample_nearest,
)
from ediffi_jax.models.unet import UNet, UNetConfig, check_conv_settings, conv_layer_paths, noise_embedding
from tiny import tiny_conditioning, tiny_params, tiny_unet_config


def zero_inserted(kernel, d):
    """The kernel a dilated conv is equivalent to: (d-1) zeros between taps."""
    k = kernel.shape[0]
    out = np.zeros(((k - 1) * d + 1, (k - 1) * d + 1) + kernel.shape[2:], kernel.dtype)
    out[::d, ::d] = kernel
    return out


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_dilated_conv_equals_zero_inserted_kernel(dilation, stride):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 3)), jnp.float32)
    kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
    y = conv2d(x, jnp.asarray(kernel), stride=stride, dilation=dilation)
    y_ref = conv2d(x, jnp.asarray(zero_inserted(kernel, dilation)), stride=stride, dilation=1)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    if dilation > 1:
        assert not np.allclose(y, conv2d(x, jnp.asarray(kernel), stride=stride))


@pytest.mark.parametrize("size, kernel, stride, dilation, padding", [
    ((6, 8), 3, 1, 1, None), ((7, 9), 3, 2, 1, None), ((6, 8), 3, 2, 2, 1), ((5, 5), 5, 1, 2, None),
    ((8, 12), 3, 1, 3, None), ((7, 8), 3, 2, 1, 1), ((6, 8), 1, 1, 1, None)])
def test_im2col_conv_equals_xla_conv(monkeypatch, size, kernel, stride, dilation, padding):
    """The wide-channel CPU path (one matmul over shifted views) computes XLA's convolution:
    SAME's low/high split, torch-style padding, strides, dilations, odd sizes."""
    from ediffi_jax.models import layers

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2,) + size + (6,)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 6, 4)), jnp.float32)
    pads = "SAME" if padding is None else [(padding * dilation,) * 2] * 2
    want = jax.lax.conv_general_dilated(x, k, (stride, stride), pads,
                                        rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    monkeypatch.setattr(layers, "IM2COL_MIN_CHANNELS", 1)
    got = conv2d(x, k, stride=stride, dilation=dilation, padding=padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("dilation", [1, 2])
def test_dispersed_kernel_with_torch_padding_pads_for_its_own_size(dilation):
    """A dispersed 5x5 kernel in a torch-padded stride-2 conv (diffusers' Downsample2D,
    padding 1) is padded 2 d, as ScaleCrafter's official code pads it: the output keeps the
    plain conv's size and equals the 5x5 conv with that padding."""
    from ediffi_jax.highres.disperse import DISPERSED
    from ediffi_jax.models.layers import redilated_conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 16, 16, 3)), jnp.float32)
    k3 = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    plain = redilated_conv(x, k3, 2, ConvSetting(dilation), padding=1)
    dispersed = redilated_conv(x, k3, 2, ConvSetting(dilation, kernel_map=DISPERSED), padding=1)
    assert dispersed.shape == plain.shape == (1, 8, 8, 4)
    want = conv2d(x, DISPERSED(k3), stride=2, dilation=dilation, padding=2)
    np.testing.assert_allclose(dispersed, want, rtol=1e-5, atol=1e-5)


def test_conv_setting_rejects_bad_dilation():
    with pytest.raises(ValueError, match="dilation"):
        ConvSetting(dilation=0)


def test_group_norm_matches_numpy_in_float32():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, size=(2, 4, 4, 16)).astype(np.float32)
    params = GroupNorm().init(jax.random.key(0), x)
    y = GroupNorm(dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    g = norm_groups(16)
    xg = x.reshape(2, 4, 4, g, 16 // g)
    ref = (xg - xg.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(xg.var(axis=(1, 2, 4), keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref.reshape(x.shape), atol=0.03)
    y32 = GroupNorm().apply(params, x)
    np.testing.assert_allclose(y32, ref.reshape(x.shape), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 6, 5, 24), (3, 7, 12), (2, 8)])
def test_group_norm_values_and_gradients_match_the_grouped_reference(shape):
    """Per-channel statistics combined per group (the fast CPU form) equal the textbook
    [..., G, C/G] reduction, values and gradients, with a large common offset (two passes)."""
    rng = np.random.default_rng(3)
    c = shape[-1]
    g = norm_groups(c)
    x = jnp.asarray(rng.normal(50.0, 0.5, size=shape), jnp.float32)
    scale = jnp.asarray(rng.normal(1.0, 0.5, size=c), jnp.float32)
    bias = jnp.asarray(rng.normal(size=c), jnp.float32)
    weight = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def reference(x, scale, bias):
        xg = x.reshape(x.shape[:-1] + (g, c // g))
        axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
        mean = jnp.mean(xg, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
        return ((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(x.shape) * scale + bias

    ours = lambda x, scale, bias: GroupNorm().apply(  # noqa: E731
        {"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(ours(x, scale, bias), reference(x, scale, bias), atol=2e-4)
    xg = np.asarray(x, np.float64).reshape(shape[:-1] + (g, c // g))
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    exact = ((xg - xg.mean(axis=axes, keepdims=True)) / np.sqrt(xg.var(axis=axes, keepdims=True) + 1e-5))
    np.testing.assert_allclose(ours(x, scale, bias), exact.reshape(shape) * np.asarray(scale)
                               + np.asarray(bias), atol=2e-4)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)) * weight)  # noqa: E731
    grads = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
    ref_grads = jax.grad(loss(reference), argnums=(0, 1, 2))(x, scale, bias)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * float(jnp.max(jnp.abs(want))))


def test_upsample_nearest_equals_image_resize_values_and_gradient():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 3, 5, 4)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(2, 6, 10, 4)), jnp.float32)
    resize = lambda x: jax.image.resize(x, (2, 6, 10, 4), method="nearest")  # noqa: E731
    np.testing.assert_array_equal(upsample_nearest(x), resize(x))
    np.testing.assert_array_equal(upsample_nearest(x)[:, 1::2, 1::2], x)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * weight))(x)  # noqa: E731
    np.testing.assert_allclose(grad(upsample_nearest), grad(resize), atol=1e-6)


def test_attention_matches_numpy_with_mask_and_bias():
    rng = np.random.default_rng(2)
    b, nq, nk, h, d = 2, 5, 4, 3, 8
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in [(b, nq, h, d), (b, nk, h, d), (b, nk, h, d)])
    mask = np.array([[1, 1, 0, 1], [1, 0, 0, 0]], np.float32)
    bias = rng.normal(size=(b, 1, nq, nk)).astype(np.float32)
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), key_mask=jnp.asarray(mask), bias=jnp.asarray(bias))
    logits = (np.einsum("bqhd,bkhd->bhqk", q, k) + bias) / np.sqrt(d)
    logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", p, v), atol=1e-5)
    # The library's other implementation (jax.nn.dot_product_attention) agrees.
    out2 = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), key_mask=jnp.asarray(mask),
                     bias=jnp.asarray(bias), implementation="auto")
    np.testing.assert_allclose(out2, out, atol=1e-5)


def _numpy_attention(q, k, v, mask):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def test_query_blocked_cpu_attention_matches_numpy(monkeypatch):
    """The CPU path for long attention (query blocks, scale on q, normalised after the V
    product) against numpy: key masks and a causal mask, a last block shorter than the
    others, values and gradients equal to the one-matrix path's."""
    import ediffi_jax.models.layers as layers

    monkeypatch.setattr(layers, "CPU_QUERY_BLOCK", 4)
    rng = np.random.default_rng(5)
    b, n, h, d = 2, 11, 3, 8  # blocks of 4, 4, 3
    q, k, v = (rng.normal(size=(b, n, h, d)).astype(np.float32) * 2 for _ in range(3))
    keys = np.ones((b, n), bool)
    keys[1, 7:] = False
    causal = np.tril(np.ones((n, n), bool))[None, None]
    for key_mask, mask, want_mask in ((None, None, np.ones((1, 1, 1, n), bool)),
                                      (keys, None, keys[:, None, None, :]),
                                      (keys, causal, causal & keys[:, None, None, :])):
        got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                        key_mask=None if key_mask is None else jnp.asarray(key_mask),
                        mask=None if mask is None else jnp.asarray(mask))
        np.testing.assert_allclose(got, _numpy_attention(q, k, v, want_mask), atol=1e-5)

    def loss(q, block):
        monkeypatch.setattr(layers, "CPU_QUERY_BLOCK", block)
        return jnp.sum(attention(q, jnp.asarray(k), jnp.asarray(v)) ** 2)

    blocked = jax.grad(loss)(jnp.asarray(q), 4)
    whole = jax.grad(loss)(jnp.asarray(q), 10 ** 6)  # below the threshold: one matrix
    np.testing.assert_allclose(blocked, whole, atol=1e-4)
    assert np.abs(blocked).max() > 1e-2


def test_edm_preconditioning_and_loss_weight():
    sigma = jnp.array([0.01, 0.5, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = edm.precondition_coefficients(sigma)
    s, sd = np.asarray(sigma, np.float64), 0.5
    np.testing.assert_allclose(c_skip, sd**2 / (s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_out, s * sd / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)
    # lambda(sigma) cancels the output scale: lambda * c_out^2 == 1.
    np.testing.assert_allclose(edm.loss_weight(sigma) * c_out**2, 1.0, rtol=1e-5)
    # D with F = 1 is c_skip x + c_out.
    x = jnp.ones((4, 2, 2, 1)) * 2.0
    d = edm.denoise(lambda x_in, c, *_: jnp.ones_like(x_in), x, sigma)
    np.testing.assert_allclose(d[:, 0, 0, 0], 2.0 * c_skip + c_out, rtol=1e-6)


def test_unet_layer_paths_are_stable():
    cfg = tiny_unet_config()
    paths = conv_layer_paths(tiny_params(cfg))
    for p in ["conv_in", "down0_res0/conv1", "down0_downsample/conv", "mid_res1/conv2",
              "up1_upsample/conv", "up0_res1/conv2", "conv_out"]:
        assert p in paths


@functools.partial(jax.jit, static_argnames=("cfg", "settings"))
def _forward(cfg, params, x, cond, settings):
    return UNet(cfg).apply({"params": params}, x, jnp.full((x.shape[0],), -0.3), cond,
                           conv_settings=dict(settings))


def unet_forward(cfg, params, x, settings=None, cond=None):
    cond = tiny_conditioning(cfg, x.shape[0]) if cond is None else cond
    return _forward(cfg, params, x, cond, tuple(sorted((settings or {}).items())))


def test_unet_with_all_dilations_one_equals_plain_unet():
    cfg = tiny_unet_config()
    params = tiny_params(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    plain = unet_forward(cfg, params, x)
    ones = {p: ConvSetting(1) for p in conv_layer_paths(params)}
    np.testing.assert_array_equal(unet_forward(cfg, params, x, ones), plain)
    dilated = unet_forward(cfg, params, x, {"down1_res0/conv1": ConvSetting(2)})
    assert dilated.shape == plain.shape and float(jnp.abs(dilated - plain).max()) > 1e-3


def test_unknown_conv_path_is_an_error_with_suggestion():
    params = tiny_params(tiny_unet_config())
    with pytest.raises(ValueError, match=r"down1_res0/conv1"):
        check_conv_settings(params, {"down1_res0/conv": ConvSetting(2)})


def test_unet_runs_at_other_resolutions_and_conditioning_matters():
    cfg = tiny_unet_config()
    params = tiny_params(cfg)
    x = jax.random.normal(jax.random.key(2), (1, 32, 32, 3))
    y = unet_forward(cfg, params, x)
    assert y.shape == (1, 32, 32, 3) and bool(jnp.all(jnp.isfinite(y)))
    uncond = unet_forward(cfg, params, x, cond=cfg.zero_conditioning(1))
    assert float(jnp.abs(uncond - y).max()) > 1e-4
    with pytest.raises(ValueError, match="cannot be halved"):
        unet_forward(cfg, params, jnp.zeros((1, 15, 15, 3)))


def test_noise_embedding_distinguishes_sigmas():
    e = noise_embedding(jnp.log(jnp.array([0.01, 0.1, 1.0, 10.0])) / 4, 32)
    assert e.shape == (4, 32)
    d = jnp.linalg.norm(e[:, None] - e[None], axis=-1)
    assert float(jnp.min(d + jnp.eye(4) * 10)) > 0.1


def test_bf16_compute_is_close_to_fp32():
    cfg = tiny_unet_config()
    params = tiny_params(cfg)
    x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    y32 = unet_forward(cfg, params, x)
    y16 = unet_forward(UNetConfig(**{**cfg.__dict__, "dtype": "bfloat16"}), params, x)
    assert y16.dtype == jnp.float32
    assert float(jnp.abs(y16 - y32).max()) < 0.05 * float(jnp.abs(y32).max()) + 1e-3
