"""Experts across checkpoints (pipeline/pretrained_experts.py): the tiny SDXL-like base for
the high-noise steps and a tiny refiner of another architecture for the rest, against what
diffusers' base (denoising_end=0.8) + refiner (denoising_start=0.8) made with them
(tools/sdxl_refiner_fixture.py); the switch by sigma; per-expert settings; bad files."""
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.encoders.hf import CheckpointError
from ediffi_jax.pipeline.pretrained_experts import load_pipeline
from ediffi_jax.pipeline.pretrained_experts import prompt_encoder, read_pretrained_experts

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers")
BASE, REFINER = (os.path.join(FIXTURES, n) for n in ("tiny_sdxl", "tiny_sdxl_refiner"))
SD = os.path.join(FIXTURES, "tiny_sd")
PROMPTS = ["a red circle", "two blue squares on grass"]
NEGATIVE = ["blurry", "dark"]


def write(tmp_path, experts, name="experts.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"experts": experts}))
    return str(path)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(REFINER, "reference.npz")))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, ref):
    boundary = 1 - float(ref["denoising_end"])  # diffusers' denoising_end 0.8: quantile 1/5
    path = write(tmp_path_factory.mktemp("experts"), [
        {"pretrained": REFINER, "quantiles": ["0", "1/5"],
         "guidance_scale": float(ref["refiner_guidance"])},
        {"pretrained": BASE, "quantiles": ["1/5", "1"],
         "guidance_scale": float(ref["base_guidance"])}])
    assert abs(boundary - 0.2) < 1e-6
    return path, load_pipeline(path)


def test_base_then_refiner_match_diffusers(sdxl, ref):
    path, pipe = sdxl
    steps = int(ref["steps"])
    plan = pipe.plan(steps, sampler="euler", guidance_scale=1.0)
    # leading spacing: t = 901, 801, ..., 1; the base takes t >= 200, the refiner the rest
    assert list(pipe.owners(plan.sigmas)) == [1] * 8 + [0] * 2
    assert [(s.start, s.stop, s.experts, s.guidance_scale) for s in plan.segments] == [
        (0, 8, (1, 1), 5.0), (8, 10, (0, 0), 7.5)]
    cond = prompt_encoder(path).encode(PROMPTS, NEGATIVE, size=tuple(int(v) for v in ref["size"]))
    assert [c.context.shape[-1] for c in cond.conds] == [24, 40]  # tower 2 only; both towers
    x = jnp.asarray(ref["noise"].transpose(0, 2, 3, 1)) * pipe.schedule.init_noise_sigma(
        plan.sigmas)
    handoff = np.asarray(pipe.denoise(dataclasses.replace(plan, segments=plan.segments[:1]),
                                      cond, x))
    latents = np.asarray(pipe.denoise(plan, cond, x))
    for got, key in ((handoff, "handoff"), (latents, "latents")):
        want = ref[key].transpose(0, 2, 3, 1)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got / scale, want / scale, atol=1e-4, err_msg=key)
    image = np.asarray(pipe.decode(jnp.asarray(latents)))
    np.testing.assert_allclose(image, ref["image"].transpose(0, 2, 3, 1), atol=1e-3)


def test_the_switch_follows_sigma_not_the_step_count(sdxl):
    _, pipe = sdxl
    cut = np.interp(200, np.arange(1000), pipe.schedule.sigmas_train())
    for steps, sampler in ((7, "euler"), (23, "dpmpp_2m"), (4, "heun")):
        plan = pipe.plan(steps, sampler=sampler)
        who = pipe.owners(plan.sigmas)
        np.testing.assert_array_equal(who, (plan.sigmas[:-1] >= cut).astype(int))
        assert who[0] == 1 and who[-1] == 0


def test_one_folder_split_in_two_is_the_folder_alone(tmp_path):
    """Two experts that are the same network with the same settings sample exactly as the
    folder does alone, the sampler state (DPM-Solver++'s history too) handed across."""
    path = write(tmp_path, [{"pretrained": SD, "quantiles": ["0", "1/2"]},
                            {"pretrained": SD, "quantiles": ["1/2", "1"]}])
    experts, alone = load_pipeline(path), load_pipeline(SD)
    cond_e = prompt_encoder(path).encode(PROMPTS)
    cond = prompt_encoder(SD).encode(PROMPTS)
    for sampler in ("euler", "dpmpp_2m"):
        plan = experts.plan(6, sampler=sampler, guidance_scale=3.0)
        assert len({s.experts for s in plan.segments}) == 2
        a = experts.sample(plan, cond_e, seed=3, size=(16, 16))
        b = alone.sample(alone.plan(6, sampler=sampler, guidance_scale=3.0), cond, seed=3,
                         size=(16, 16))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, err_msg=sampler)


def test_per_expert_sampler_and_guidance(tmp_path):
    path = write(tmp_path, [{"pretrained": SD, "quantiles": ["0", "1/2"], "sampler": "dpmpp_2m",
                             "guidance_scale": 1.0},
                            {"pretrained": SD, "quantiles": ["1/2", "1"], "sampler": "heun"}])
    pipe = load_pipeline(path)
    plan = pipe.plan(8, sampler="euler", guidance_scale=4.0)
    who = pipe.owners(plan.sigmas)
    for seg in plan.segments:
        k = seg.experts[0]
        assert set(who[seg.start:seg.stop]) == {k}
        assert seg.settings.sampler == ("dpmpp_2m", "heun")[k]
        assert (seg.guidance_scale, seg.settings.use_cfg) == ((1.0, False), (4.0, True))[k]
    images = np.asarray(pipe.sample(plan, prompt_encoder(path).encode(PROMPTS), seed=0,
                                    size=(16, 16)))
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_a_dpm_step_after_an_euler_step_extrapolates_from_its_denoised():
    """The history an Euler step leaves is its denoised image, so a DPM-Solver++(2M) step
    after it is second order: on an analytic denoiser of a point mass at x0, whose every
    step lands on the exact solution, the switch keeps it exact."""
    from ediffi_jax.diffusion.plan import build_plan
    from ediffi_jax.diffusion.sampling import PlanRunner, initial_state

    x0 = jnp.full((1, 2, 2, 1), 0.7)
    runner = PlanRunner(lambda params, x, sigma, cond, settings: x0 + 0 * x)
    sigmas = np.array([4.0, 2.0, 1.0, 0.5, 0.0])
    plan = build_plan(sigmas, sampler="euler")
    segs = [dataclasses.replace(plan.segments[0], stop=2),
            dataclasses.replace(plan.segments[0], start=2, settings=dataclasses.replace(
                plan.segments[0].settings, sampler="dpmpp_2m"))]
    plan = dataclasses.replace(plan, segments=tuple(segs))
    x = jnp.full((1, 2, 2, 1), 0.7 + 4.0 * 0.3)
    out = runner.run(plan, [None], None, None, x)
    np.testing.assert_allclose(np.asarray(out), 0.7, atol=1e-6)
    state = runner.run_segment(plan, segs[0], [None], initial_state(x), None, None)
    np.testing.assert_allclose(np.asarray(state.prev_denoised), 0.7)


@pytest.mark.parametrize("experts, message", [
    ([{"pretrained": SD, "quantiles": ["0", "1/2"]},
      {"pretrained": SD, "quantiles": ["1/3", "1"]}], "do not continue the layout at 1/2"),
    ([{"pretrained": SD, "quantiles": ["0", "1/2"]}], r"nothing owns quantiles \(1/2, 1\]"),
    ([{"pretrained": SD, "quantiles": ["0", "1"], "steps": 3}], r"unknown keys \['steps'\]"),
    ([{"pretrained": SD, "quantiles": "all"}], '"quantiles" must be'),
    ([{"pretrained": SD, "quantiles": ["0", "1"], "sampler": "ddim"}], "sampler 'ddim'"),
])
def test_bad_experts_files_are_named(tmp_path, experts, message):
    with pytest.raises(CheckpointError, match=message):
        read_pretrained_experts(write(tmp_path, experts))


def test_experts_must_share_a_latent_space_and_files_do_not_nest(tmp_path):
    mixed = write(tmp_path, [{"pretrained": SD, "quantiles": ["0", "1/2"]},
                             {"pretrained": BASE, "quantiles": ["1/2", "1"]}])
    with pytest.raises(ValueError, match="VAE differs"):
        load_pipeline(mixed)
    nested = write(tmp_path, [{"pretrained": "experts.json", "quantiles": ["0", "1"]}],
                   "outer.json")
    write(tmp_path, [{"pretrained": SD, "quantiles": ["0", "1"]}])
    with pytest.raises(CheckpointError, match="experts files do not nest"):
        load_pipeline(nested)


def test_highres_needs_one_unet_architecture(sdxl):
    from ediffi_jax.highres.plans import HighResPlan

    with pytest.raises(ValueError, match="these experts' U-Nets differ"):
        sdxl[1].plan(4, highres=HighResPlan.__new__(HighResPlan))


def test_command_line_samples_an_experts_file(sdxl, tmp_path, capsys):
    from sample.__main__ import main

    path, _ = sdxl
    out = tmp_path / "out"
    rc = main(["--pretrained", path, "--prompt", "a red circle", "--steps", "5",
               "--size", "16x24", "--num", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "experts (1, 1)  w=5" in captured.out and "experts (0, 0)  w=7.5" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["0000_a_red_circle.png", "grid.png"]
