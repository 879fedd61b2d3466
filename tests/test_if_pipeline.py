"""A tiny DeepFloyd-IF-like stage I (tools/if_pipeline_fixture.py) against what diffusers'
IFPipeline made with it: T5 prompts (lower-cased, stripped, padding-masked), then the whole
pixel-space CFG loop with DPM-Solver++(2M) from the noise the pipeline drew, with IF's dynamic
thresholding of the guided x0 and without it."""
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.encoders.prompt import PromptEncoder
from ediffi_jax.pipeline.pretrained import load_pretrained

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_if")
PROMPTS = ["A Red Circle ", "two blue squares on grass"]
NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="module")
def cond():
    return PromptEncoder(FIXTURE).encode(PROMPTS, NEGATIVE)


def test_t5_prompts_encode_as_diffusers(ref, cond):
    np.testing.assert_allclose(np.asarray(cond.context), ref["context"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(cond.negative_context), ref["negative"], atol=1e-4)
    assert cond.pooled is None and cond.time_ids is None
    # IF's U-Net attends to all 77 positions (the pipeline passes no encoder mask).
    assert np.asarray(cond.context_mask).min() == 1.0


@pytest.mark.parametrize("case", ["threshold", "plain"])
def test_sampling_matches_diffusers(ref, cond, case):
    pipe = load_pretrained(FIXTURE)
    assert pipe.vae is None and pipe.schedule.thresholding
    if case == "plain":
        pipe = dataclasses.replace(pipe, schedule=dataclasses.replace(pipe.schedule,
                                                                      thresholding=False))
    steps = int(ref["steps"])
    sigmas = pipe.sigmas(steps, sampler="dpmpp_2m")
    np.testing.assert_allclose(sigmas, ref[f"{case}_sigmas"], rtol=1e-5)
    plan = pipe.plan(steps, sampler="dpmpp_2m", guidance_scale=float(ref["guidance"]))
    x = jnp.asarray(ref["noise"].transpose(0, 2, 3, 1)) * pipe.schedule.init_noise_sigma(
        sigmas, "dpmsolver")
    images = np.asarray(pipe.denoise(plan, cond, x))
    want = ref[f"{case}_images"].transpose(0, 2, 3, 1)
    scale = np.abs(want).max()
    if case == "threshold":
        # Every x0 clipped into [-1, 1], so the image is in range; the per-image quantile
        # amplifies float32 rounding a little (measured 1.2e-4-2.8e-4): the 1e-3 bar.
        assert scale <= 1.0 + 1e-6
        np.testing.assert_allclose(images, want, atol=1e-3)
    else:  # the random model's unclipped x0 runs far out of range: compare relative to it
        assert scale > 10.0
        np.testing.assert_allclose(images / scale, want / scale, atol=1e-4)


def test_command_line_samples_the_if_folder(tmp_path, capsys, cond):
    """`python -m sample --pretrained` on a pixel-space IF folder (no VAE): the U-Net's own
    sample size, the pipeline's DPM-Solver++ with thresholding; the PNG is pipe.sample's."""
    from PIL import Image

    from ediffi_jax.pipeline.generate import to_uint8
    from sample.__main__ import main

    out = tmp_path / "out"
    rc = main(["--pretrained", FIXTURE, "--prompt", PROMPTS[0], "--negative-prompt", NEGATIVE[0],
               "--num", "1", "--steps", "3", "--sampler", "dpmpp_2m", "--guidance-scale", "7",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    (name,) = [p.name for p in out.iterdir() if p.name != "grid.png"]
    png = np.asarray(Image.open(out / name))
    assert png.shape == (16, 16, 3)
    pipe = load_pretrained(FIXTURE)
    one = PromptEncoder(FIXTURE).encode(PROMPTS[:1], NEGATIVE[:1])
    want = np.asarray(to_uint8(pipe.sample(pipe.plan(3, sampler="dpmpp_2m", guidance_scale=7.0),
                                           one, seed=0, size=(16, 16))))[0]
    assert np.abs(png.astype(int) - want.astype(int)).max() <= 1
    assert png.std() > 10  # an image, not a constant


STAGE_TWO = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_if2")


def test_stage_two_matches_diffusers_super_resolution(cond):
    """IF stage II (IFSuperResolutionPipeline) from stage I's images: the low-res input
    upsampled with aligned corners and noised by the image_noising_scheduler, concatenated to
    the U-Net's input with its noise level as the class label in both CFG branches, then
    DPM-Solver++(2M) with thresholding, from the noises the pipeline drew."""
    ref = dict(np.load(os.path.join(STAGE_TWO, "reference.npz")))
    pipe = load_pretrained(STAGE_TWO)
    assert pipe.latent_channels == 3 and pipe.noising_schedule is not None
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    staged = pipe.with_lowres(cond, nhwc(ref["lowres_input"]), noise_level=int(ref["noise_level"]),
                              noise=nhwc(ref["augmentation_noise"]))
    np.testing.assert_allclose(np.asarray(staged.lowres), nhwc(ref["lowres"]), atol=1e-5)
    assert staged.unconditional().lowres is staged.lowres  # one low-res for both branches
    steps = int(ref["steps"])
    plan = pipe.plan(steps, sampler="dpmpp_2m", guidance_scale=float(ref["guidance"]))
    x = nhwc(ref["noise"]) * pipe.schedule.init_noise_sigma(np.asarray(plan.sigmas), "dpmsolver")
    images = np.asarray(pipe.denoise(plan, staged, x))
    err = np.abs(images - np.asarray(nhwc(ref["images"]))).reshape(2, -1)
    # One image agrees to float32 rounding; in the other, rounding moves which pixel sits at
    # the 0.95 quantile of |x0|, so thresholding rescales its whole x0 a little (measured
    # max 3.1e-3, median 3e-7): the median holds both to rounding.
    assert np.median(err) < 1e-5
    assert err.max(axis=1).min() < 1e-4 and err.max() < 5e-3
    # Its own draws: a 32 x 32 sample from a seed, per example deterministic.
    drawn = pipe.with_lowres(cond, nhwc(ref["lowres_input"]), seed=3)
    out = np.asarray(pipe.sample(plan, drawn, seed=3, size=(32, 32)))
    assert out.shape == (2, 32, 32, 3) and np.abs(out).max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="super-resolution stage"):
        pipe.sample(plan, cond, size=(32, 32))
    with pytest.raises(ValueError, match="one per prompt"):
        pipe.with_lowres(cond, nhwc(ref["lowres_input"])[:1])
    with pytest.raises(ValueError, match="not a super-resolution stage"):
        load_pretrained(FIXTURE).with_lowres(cond, nhwc(ref["lowres_input"]))
