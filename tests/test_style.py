"""Style: a reference image's CLIP embedding as conditioning, with its own guidance scale."""
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.diffusion.plan import SamplingConfig
from ediffi_jax.diffusion.sampling import PlanRunner
from ediffi_jax.pipeline.denoise import unet_denoise_fn
from ediffi_jax.models.unet import UNet
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
    cond_text = cond.replace(clip_image=jnp.zeros_like(cond.clip_image))
    out = PlanRunner(counting).sample(plan, [tiny_params(CFG)], (16, 16, 3), seed=0,
                                      example_indices=[0, 1], cond=cond,
                                      uncond=cond.unconditional(), cond_text=cond_text)
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


def test_style_guidance_needs_the_text_only_branch_and_excludes_ndcfg():
    plan = SamplingConfig(num_steps=2, guidance_scale=2.0, style_guidance_scale=1.0).plan()
    cond = tiny_conditioning(CFG, 1)
    with pytest.raises(ValueError, match="give cond_text"):
        PlanRunner(unet_denoise_fn(UNet(CFG))).run(plan, [tiny_params(CFG)], cond,
                                                   cond.unconditional(), None,
                                                   jnp.zeros((1, 16, 16, 3)))
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
