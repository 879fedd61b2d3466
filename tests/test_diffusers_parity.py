"""The Flax UNet2DConditionModel and AutoencoderKL against diffusers 0.42.1 on tiny random
models of each family (tools/unet_fixtures.py): SD 1.x, SD 2.x, SDXL base and refiner, the
switches SD leaves off (scale-shift resnets, a timestep class embedding, odd kernels), and the
VAE's encoder and decoder; every norm and bias perturbed, float32, within 1e-4."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.encoders import hf
from ediffi_jax.models import diffusers_unet, layers, vae as vae_lib
from ediffi_jax.pipeline.pretrained import load_component

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "parity")
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner", "variants", "if1", "if2", "if2_cross")


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def load_unet(directory):
    config, params = load_component(directory, diffusers_unet.DiffusersUNetConfig,
                                    diffusers_unet.abstract_boxed, None)
    return diffusers_unet.DiffusersUNet(config), params


def run_unet(model, params, io, **extra):
    kwargs = {k: jnp.asarray(io[k]) for k in ("text_embeds", "time_ids", "class_labels")
              if k in io}
    return np.asarray(model.apply(
        {"params": params}, nhwc(io["sample"]), jnp.asarray(io["timestep"]),
        jnp.asarray(io["encoder_hidden_states"]),
        encoder_attention_mask=jnp.asarray(io["encoder_attention_mask"]), **kwargs, **extra))


@pytest.mark.parametrize("family", FAMILIES)
def test_unet_matches_diffusers(family):
    directory = os.path.join(FIXTURES, family)
    io = np.load(os.path.join(directory, "io.npz"))
    model, params = load_unet(directory)
    out = run_unet(model, params, io)
    want = io["output"].transpose(0, 2, 3, 1)
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, atol=1e-4, rtol=1e-4)


def test_conv_settings_take_diffusers_names():
    """A re-dilated conv named as ScaleCrafter's settings files name it changes the output
    exactly as the same setting under its layer path; an unknown name is an error naming the
    closest real conv."""
    directory = os.path.join(FIXTURES, "sd1")
    io = np.load(os.path.join(directory, "io.npz"))
    model, params = load_unet(directory)
    names = diffusers_unet.conv_names(params)
    assert "down_blocks.1.downsamplers.0.conv" in names and "up_blocks.0.upsamplers.0.conv" in names
    d2 = layers.ConvSetting(dilation=2)
    by_name = run_unet(model, params, io, conv_settings={"down_blocks.1.resnets.0.conv1": d2})
    by_path = run_unet(model, params, io, conv_settings={"down_blocks.1/resnets.0/conv1": d2})
    plain = run_unet(model, params, io)
    np.testing.assert_array_equal(by_name, by_path)
    assert np.abs(by_name - plain).max() > 1e-3
    diffusers_unet.check_conv_settings(params, {"down_blocks.1.resnets.0.conv1": d2})
    with pytest.raises(ValueError, match="did you mean.*down_blocks.1.resnets.0.conv1"):
        diffusers_unet.check_conv_settings(params, {"down_blocks.1.resnet.0.conv1": d2})


def test_downsampler_pads_one_on_each_side():
    """diffusers' Downsample2D pads 1 on every side (not SAME's 0 / 1 at stride 2); a
    re-dilated stride-2 conv pads d, as ScaleCrafter sets it."""
    x = np.random.default_rng(0).normal(size=(1, 6, 8, 2)).astype(np.float32)
    k = np.random.default_rng(1).normal(size=(3, 3, 2, 3)).astype(np.float32)
    for d in (1, 2):
        got = np.asarray(layers.conv2d(jnp.asarray(x), jnp.asarray(k), stride=2, dilation=d,
                                       padding=1))
        xp = np.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
        want = np.zeros_like(got)
        for i in range(got.shape[1]):
            for j in range(got.shape[2]):
                patch = xp[0, 2 * i: 2 * i + 2 * d + 1: d, 2 * j: 2 * j + 2 * d + 1: d]
                want[0, i, j] = np.einsum("hwc,hwco->o", patch, k)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_unported_fields_and_blocks_are_named(tmp_path):
    base = json.load(open(os.path.join(FIXTURES, "sd1", "config.json")))
    for change, message in (
        ({"down_block_types": ["KCrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                               "DownBlock2D"]}, "KCrossAttnDownBlock2D"),
        ({"encoder_hid_dim_type": "image_proj", "encoder_hid_dim": 8}, "encoder_hid_dim"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
        ({"not_a_field": 1}, "not_a_field"),
        ({"attention_head_dim": [4, 4]}, "attention_head_dim|num_attention_heads"),
        ({"only_cross_attention": True}, r"only_cross_attention.*CrossAttnDownBlock2D"),
    ):
        with pytest.raises(ValueError, match=message):
            diffusers_unet.DiffusersUNetConfig.from_hf({**base, **change})


def test_only_cross_attention_resolves_per_block_as_diffusers():
    """A single boolean also sets the mid block's (unless mid_block_only_cross_attention says);
    a per-block tuple leaves the mid block off; up blocks take the reversed tuple."""
    base = json.load(open(os.path.join(FIXTURES, "if2", "config.json")))
    config = lambda **kw: diffusers_unet.DiffusersUNetConfig.from_hf({**base, **kw})  # noqa: E731
    flags = lambda c: (c.cross_only("down"), c.cross_only("up"), c.cross_only("mid"))  # noqa: E731
    assert flags(config(only_cross_attention=True)) == ((True, True), (True, True), (True,))
    assert flags(config(only_cross_attention=True, mid_block_only_cross_attention=False)) == (
        (True, True), (True, True), (False,))
    assert flags(config(only_cross_attention=[True, False])) == (
        (True, False), (False, True), (False,))
    # The IF stage-II layout loads with no self keys / values where it attends to text only.
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        diffusers_unet.abstract_params(config(only_cross_attention=True)))]
    assert any("add_k_proj" in p for p in paths) and not any("to_k" in p for p in paths)


def test_input_size_and_added_conditioning_are_checked():
    directory = os.path.join(FIXTURES, "sdxl")
    io = dict(np.load(os.path.join(directory, "io.npz")))
    model, params = load_unet(directory)
    with pytest.raises(ValueError, match="needs text_embeds and time_ids"):
        run_unet(model, params, {k: v for k, v in io.items() if k != "time_ids"})
    with pytest.raises(ValueError, match="not a multiple of 4"):
        run_unet(model, params, {**io, "sample": io["sample"][:, :, :15]})


def test_weights_with_the_wrong_shape_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    target = tmp_path / "sd1"
    shutil.copytree(os.path.join(FIXTURES, "sd1"), target)
    weights = target / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["mid_block.attentions.0.proj_in.weight"] = tensors[
        "mid_block.attentions.0.proj_in.weight"][:-1]
    save_file(tensors, weights)
    with pytest.raises(hf.CheckpointError, match="mid_block.attentions.0.proj_in.weight"):
        load_unet(str(target))


def test_vae_matches_diffusers():
    directory = os.path.join(FIXTURES, "vae")
    io = np.load(os.path.join(directory, "io.npz"))
    config, params = load_component(directory, vae_lib.VAEConfig, vae_lib.abstract_boxed, None)
    model = vae_lib.AutoencoderKL(config)
    mean, logvar = model.apply({"params": params}, nhwc(io["images"]), method="encode")
    np.testing.assert_allclose(np.asarray(mean), io["mean"].transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(logvar), io["logvar"].transpose(0, 2, 3, 1), atol=1e-4)
    decoded = model.apply({"params": params}, nhwc(io["latents"]), method="decode")
    np.testing.assert_allclose(np.asarray(decoded), io["decoded"].transpose(0, 2, 3, 1),
                               atol=1e-4)
    z = vae_lib.to_latents(config, mean)
    np.testing.assert_allclose(np.asarray(vae_lib.from_latents(config, z)), np.asarray(mean),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(z), np.asarray(mean) * 0.13025, atol=1e-6)
