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
