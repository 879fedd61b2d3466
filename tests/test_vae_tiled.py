"""The strip-by-strip VAE decode (models/vae_tiled.py) equals AutoencoderKL.decode, and its
device memory does not grow with the image height while the untiled decode's does."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.models import vae as vae_lib, vae_tiled
from ediffi_jax.pipeline.pretrained import load_component

VAE_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "parity", "vae")


def tiny_config(**kw):
    return vae_lib.VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4,
                             down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3, **kw)


def perturbed_params(config, seed=0):
    """Random weights (fan-in scaled) with every norm's scale and bias moved off 1 / 0 and
    nonzero biases, so that the whole-tensor GroupNorm statistics and the zero halos matter;
    drawn with numpy on the abstract tree (no flax init to compile)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, noise = path[-1].key, rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "scale":
            return jnp.asarray(1.0 + 0.3 * noise)
        if name == "bias":
            return jnp.asarray(0.2 * noise)
        return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))

    return jax.tree_util.tree_map_with_path(draw, vae_lib.abstract_params(config))


def untiled(config, params, latents):
    return np.asarray(jax.jit(lambda p, z: vae_lib.AutoencoderKL(config).apply(
        {"params": p}, z, method="decode"))(params, latents))


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    return config, perturbed_params(config)


def latents_of(shape, seed=2):
    return 1.5 * jax.random.normal(jax.random.PRNGKey(seed), shape) + 0.3


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_tiled_equals_untiled_non_square(tiny, rows):
    """Strips of one latent row, heights that do and do not divide the 7 latent rows (the
    last strip padded), and one strip covering everything; batch 2, a 7 x 5 latent."""
    config, params = tiny
    z = latents_of((2, 7, 5, 4))
    want = untiled(config, params, z)
    got = vae_tiled.decode_tiled(config, params, z, rows=rows, query_block=3)
    assert got.shape == want.shape == (2, 28, 20, 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(use_post_quant_conv=False),
                                dict(mid_block_add_attention=False)])
def test_tiled_without_post_quant_conv_or_attention(kw):
    config = tiny_config(**kw)
    params = perturbed_params(config, seed=3)
    z = latents_of((1, 6, 4, 4))
    got = vae_tiled.decode_tiled(config, params, z, rows=4)
    np.testing.assert_allclose(got, untiled(config, params, z), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not os.path.isdir(VAE_FIXTURE), reason="no diffusers VAE fixture")
def test_tiled_matches_on_the_diffusers_fixture():
    """The fixture's trained-format weights (3 levels, 2 resnets a level, a conv_shortcut at
    each widening) on its own latents."""
    config, params = load_component(VAE_FIXTURE, vae_lib.VAEConfig, vae_lib.abstract_boxed,
                                    None)
    io = np.load(os.path.join(VAE_FIXTURE, "io.npz"))
    z = jnp.asarray(io["latents"].transpose(0, 2, 3, 1))
    want = untiled(config, params, z)
    got = vae_tiled.decode_tiled(config, params, z, rows=3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(want, io["decoded"].transpose(0, 2, 3, 1), atol=1e-4)


def test_strip_memory_does_not_grow_with_height():
    """The compiled strip functions' memory is the same for a latent twice as tall; the
    untiled decode's grows. (Without the attention, whose K and V hold every token.)"""
    config = tiny_config(mid_block_add_attention=False)
    params = vae_lib.abstract_params(config)

    def tiled(h):
        compiled = vae_tiled.compile_strips(config, params, (1, h, 8, 4), rows=2)
        return max(vae_tiled.peak_bytes(c) for c in compiled.values())

    def whole(h):
        fn = jax.jit(lambda p, z: vae_lib.AutoencoderKL(config).apply(
            {"params": p}, z, method="decode"))
        return vae_tiled.peak_bytes(fn.lower(params, jax.ShapeDtypeStruct(
            (1, h, 8, 4), jnp.float32)).compile())

    assert tiled(16) == tiled(32)
    assert whole(32) > 1.5 * whole(16)
    assert tiled(32) < whole(32) / 4


def test_bad_rows():
    config = tiny_config()
    params = vae_lib.abstract_params(config)
    for rows in (0, -2, 1.5):
        with pytest.raises(ValueError, match="rows must be an integer >= 1"):
            vae_tiled.decode_tiled(config, params, np.zeros((1, 4, 4, 4)), rows=rows)
    with pytest.raises(ValueError, match="query_block"):
        vae_tiled.compile_strips(config, params, (1, 4, 4, 4), query_block=0)


def test_pipeline_decodes_by_strips_with_vae_tile_rows(tiny):
    """PretrainedPipeline.decode with vae_tile_rows: the untiled decode's images (its own
    attributes only, so no checkpoint to load)."""
    from types import SimpleNamespace

    from ediffi_jax.pipeline.pretrained import PretrainedPipeline

    config, params = tiny
    pipe = SimpleNamespace(vae=vae_lib.AutoencoderKL(config), vae_params=params, _decode=None,
                           vae_tile_rows=None)
    z = latents_of((1, 5, 3, 4))
    want = np.asarray(PretrainedPipeline.decode(pipe, z))
    pipe.vae_tile_rows = 2
    np.testing.assert_allclose(PretrainedPipeline.decode(pipe, z), want, atol=1e-5, rtol=1e-5)


def test_command_line_rejects_bad_vae_tile_rows(tmp_path, capsys):
    from sample.__main__ import main

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_sd")
    rc = main(["--pretrained", fixture, "--prompt", "a", "--vae-tile-rows", "0",
               "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "--vae-tile-rows must be >= 1, got 0" in capsys.readouterr().err
