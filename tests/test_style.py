"""Style: a reference image's CLIP embedding as conditioning, with its own guidance scale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.diffusion.plan import SamplingConfig
from ediffi_jax.diffusion.sampling import PlanRunner
from ediffi_jax.models.unet import UNet
from ediffi_jax.pipeline.denoise import unet_denoise_fn
from tests.tiny import tiny_conditioning, tiny_params, tiny_unet_config

CFG = tiny_unet_config()


def _sample(style_scale, guidance=3.0):
    sampling = SamplingConfig(sampler="euler", num_steps=3, guidance_scale=guidance,
                              style_guidance_scale=style_scale)
    plan = sampling.plan()
    batches = []

    def counting(params, x, sigma, cond, settings):
        batches.append(x.shape[0])
        return unet_denoise_fn(UNet(CFG))(params, x, sigma, cond, settings)

    cond = tiny_conditioning(CFG, 2)
    out = PlanRunner(counting).sample(plan, [tiny_params(CFG)], (16, 16, 3), seed=0,
                                      example_indices=[0, 1], cond=cond)
    return np.asarray(out), plan, set(batches)


def test_style_scale_equal_to_the_text_scale_is_plain_cfg():
    plain, plan, batches = _sample(None)
    assert batches == {4} and not any(s.settings.style_cfg for s in plan.segments)
    same, plan, batches = _sample(3.0)
    assert batches == {6}  # conditional, text-only and unconditional in one call
    assert all(s.settings.style_cfg and s.style_scale == 3.0 for s in plan.segments)
    np.testing.assert_allclose(same, plain, atol=2e-5)
    stronger, _, _ = _sample(6.0)
    assert np.abs(stronger - plain).max() > 1e-3


def test_the_runner_derives_the_style_branches_and_style_excludes_ndcfg():
    """The three branches the runner builds from cond alone are cond, cond without its style
    embedding and the unconditional one, combined by the style formula."""
    from ediffi_jax.diffusion.guidance import guided_denoise
    from ediffi_jax.diffusion.plan import SegmentSettings

    cond = tiny_conditioning(CFG, 1)
    assert float(jnp.abs(cond.clip_image).max()) > 0
    fn = unet_denoise_fn(UNet(CFG))
    params, x, sigma = tiny_params(CFG), jnp.ones((1, 16, 16, 3)), jnp.full((1,), 2.0)
    seen = []

    def recording(params, x, sigma, cond, settings):
        seen.append(cond)
        return fn(params, x, sigma, cond, settings)

    plan = SamplingConfig(sampler="euler", num_steps=1, guidance_scale=2.0,
                          style_guidance_scale=0.5).plan()
    with jax.disable_jit():  # the branches as concrete values
        PlanRunner(recording).run(plan, [params], cond, None, x * 80.0)
    stacked = seen[0]
    np.testing.assert_array_equal(stacked.clip_image[0], cond.clip_image[0])
    np.testing.assert_array_equal(stacked.clip_image[1:], 0)  # text-only, unconditional
    np.testing.assert_array_equal(stacked.t5_tokens[1], cond.t5_tokens[0])
    np.testing.assert_array_equal(stacked.t5_tokens[2], 0)
    d = lambda c: fn(params, x, sigma, c, SegmentSettings())  # noqa: E731
    d_c, d_t, d_u = d(cond), d(cond.text_only()), d(cond.unconditional())
    np.testing.assert_allclose(
        guided_denoise(lambda *a: fn(*a, SegmentSettings()), params, x, sigma, cond,
                       cond.unconditional(), 2.0, True, cond_text=cond.text_only(),
                       style_scale=0.5),
        d_u + 2.0 * (d_t - d_u) + 0.5 * (d_c - d_t), atol=1e-5)
    with pytest.raises(ValueError, match="do not combine"):
        SamplingConfig(num_steps=2, guidance_scale=2.0, style_guidance_scale=1.0).plan(
            uncond_layer_settings=lambda i, s: ())


def test_word_vectors_and_a_clip_image_tower(tmp_path):
    from ediffi_jax.encoders.conditioner import EncodersConfig, make_conditioner
    from ediffi_jax.encoders.tiny import write_clip
    from ediffi_jax.encoders.toy import WordEncoder

    write_clip(str(tmp_path / "clip"), width=8, projection=7)
    model = tiny_unet_config(clip_image_dim=7)
    enc = make_conditioner(EncodersConfig(clip_vision=str(tmp_path / "clip")), model)
    red = np.zeros((32, 32, 3), np.uint8) + np.array([255, 0, 0], np.uint8)
    cond = enc.encode(["a red circle"], [red])
    words = WordEncoder.for_model(model).encode(["a red circle"])
    np.testing.assert_array_equal(cond.t5_tokens, words.t5_tokens)  # the text: word vectors
    assert np.abs(cond.clip_image).sum() > 0 and cond.clip_image.shape == (1, 7)
    assert [s.tokens for s in enc.token_streams("a red circle")][0] == ("a", "red", "circle")
