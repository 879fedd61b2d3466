"""ScaleCrafter's re-dilation against the official implementation (YingqingHe/ScaleCrafter's
ReDilateConvProcessor, patched onto a tiny random SD-like diffusers U-Net as its text2image.py
does for one step: tools/scalecrafter_fixture.py, tests/fixtures/scalecrafter/README.md): the
project's settings for the same official settings tables (highres/official.py -> HighResPlan ->
per-step ConvSettings, as a real run builds them), run through the Flax U-Net at twice its
sample size, within 1e-4. Integer factors (2, 4), a fractional one (2.5) on every inner conv and
on one downsampler / upsampler conv alone, and the progressive schedule at one step."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.diffusion.discrete import DiscreteSchedule
from ediffi_jax.highres import official
from ediffi_jax.highres.plans import conv_setting_for_factor
from ediffi_jax.models import diffusers_unet
from ediffi_jax.pipeline.pretrained import load_component

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "scalecrafter")
SETTINGS = json.load(open(os.path.join(FIXTURE, "settings.json")))
# The undilated U-Net's output at each step (the official forward with no settings).
REDILATED = {name: case for name, case in SETTINGS["cases"].items() if "dilate_settings" in case}
PLAIN = {case["step"]: name for name, case in REDILATED.items() if not case["dilate_settings"]}
CASES = [name for name in REDILATED if name not in PLAIN.values()]


@pytest.fixture(scope="module")
def unet():
    config, params = load_component(FIXTURE, diffusers_unet.DiffusersUNetConfig,
                                    diffusers_unet.abstract_boxed, None)
    return config, diffusers_unet.DiffusersUNet(config), params, np.load(
        os.path.join(FIXTURE, "io.npz"))


def run(unet, timestep, conv_settings=None, **kw):
    _, model, params, io = unet
    return np.asarray(model.apply(
        {"params": params}, jnp.asarray(io["sample"].transpose(0, 2, 3, 1)),
        jnp.full((io["sample"].shape[0],), float(timestep)),
        jnp.asarray(io["encoder_hidden_states"]), conv_settings=conv_settings, **kw))


def want(unet, name):
    return unet[3][f"output_{name}"].transpose(0, 2, 3, 1)


def project_settings(config, case):
    """The ConvSettings a run of this official config builds for the case's step: the official
    tables through OfficialConfig.plan (taus as sigmas of the checkpoint's schedule) and the
    HighResPlan's per-step settings on the pipeline's 50-step sigmas."""
    schedule = DiscreteSchedule.from_scheduler_config(SETTINGS["scheduler_config"])
    steps = SETTINGS["num_inference_steps"]
    plan = official.OfficialConfig(
        case["dilate_settings"], dilate_tau=case["dilate_tau"], progressive=case["progressive"],
        num_inference_steps=steps).plan(diffusers_unet.conv3x3_levels(config), schedule,
                                        SETTINGS["scheduler_config"])
    sigmas = schedule.discrete_sigmas(steps)
    at = plan.layer_settings(sigmas)
    i = case["step"]
    # The gate: steps i < dilate_tau of the official run are active, the next one is not.
    assert at(case["dilate_tau"] - 1, float(sigmas[case["dilate_tau"] - 1]))
    assert at(case["dilate_tau"], float(sigmas[case["dilate_tau"]])) == ()
    # The official run's U-Net input at step i is its DDIM timestep t_i.
    assert official.ddim_timesteps(SETTINGS["scheduler_config"], steps)[i] == case["timestep"]
    return dict(at(i, float(sigmas[i])))


@pytest.mark.parametrize("name", sorted(PLAIN.values()))
def test_plain_forward_matches_the_official_plain_forward(unet, name):
    out = run(unet, SETTINGS["cases"][name]["timestep"])
    assert out.shape[1:3] == tuple(2 * s for s in unet[0].sample_size)  # twice the sample size
    np.testing.assert_allclose(out, want(unet, name), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_redilated_forward_matches_the_official_processor(unet, name):
    case = SETTINGS["cases"][name]
    settings = project_settings(unet[0], case)
    # Layer by layer the factor the official loop used (after its progressive schedule).
    assert set(settings) == set(case["factors_used"])
    for layer, pf in case["factors_used"].items():
        assert settings[layer] == conv_setting_for_factor(pf), layer
    out = run(unet, case["timestep"], settings)
    reference = want(unet, name)
    err = np.abs(out - reference).max()
    assert err < 1e-4, f"{name}: max |project - official| = {err:.3g}"
    # The re-dilation changes the output (so this comparison can fail).
    plain = want(unet, PLAIN[case["step"]])
    assert np.abs(reference - plain).max() > 1e-2 and np.abs(out - plain).max() > 1e-2


def test_attention_entropy_scaling_matches_the_official_processor(unet):
    """ScaleCrafter's ScaledAttnProcessor (the paper's Attn-SF baseline) on every attention,
    given pixel counts (4x the area): self-attention logits x sqrt(log N / log(N / 4)), the
    cross-attention untouched; and a ratio of 1 is the plain forward."""
    case = SETTINGS["cases"]["attn_sf"]
    got = run(unet, case["timestep"], attention_area_ratio=case["area_ratio"])
    np.testing.assert_allclose(got, want(unet, "attn_sf"), atol=1e-4)
    assert np.abs(want(unet, "attn_sf") - want(unet, "plain")).max() > 1e-3
    np.testing.assert_allclose(run(unet, case["timestep"], attention_area_ratio=1.0),
                               want(unet, "plain"), atol=1e-4)
