"""ScaleCrafter on diffusers pipeline folders from the official settings files as they are
(highres/official.py): the file readers, step taus as sigmas of the checkpoint's schedule
against an independent computation, layer names checked against the U-Net (closest-name
errors; skip_missing for the official SDXL files' absent blocks), per-step plans on tiny_sd,
the command line, and the built-in presets (official_presets.py) against the facts' tables,
their choice by size and family, and the command line's default path."""
import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest

from ediffi_jax.diffusion.discrete import DiscreteSchedule
from ediffi_jax.highres import official
from ediffi_jax.highres.plans import HighResPlan
from ediffi_jax.models import diffusers_unet
from ediffi_jax.models.layers import ConvSetting
from ediffi_jax.pipeline.pretrained import load_pretrained

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_sd")
# The published runwayml/stable-diffusion-v1-5 scheduler config (PNDM: no timestep_spacing,
# which the official run's DDIMScheduler reads as its default, "leading").
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule":
                  "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "trained_betas": None, "clip_sample": False}
SD15_UNET = diffusers_unet.DiffusersUNetConfig(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)
SDXL_UNET = diffusers_unet.DiffusersUNetConfig(
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, use_linear_projection=True)
# assets/dilate_settings/sdxl_2048x2048.txt of YingqingHe/ScaleCrafter (no final newline):
# SDXL has no down_blocks.3.
SDXL_2048 = "\n".join(
    [f"down_blocks.3.resnets.{j}.conv{k}:2" for j in range(2) for k in (1, 2)]
    + [f"up_blocks.0.resnets.{j}.conv{k}:2" for j in range(3) for k in (1, 2)]
    + ["up_blocks.0.upsamplers.0.conv:2"]
    + [f"mid_block.resnets.{j}.conv{k}:2" for j in range(2) for k in (1, 2)])
# tiny_sd (2 levels): its inner level, the upsampler out of it and the outermost decoder level.
TINY = {"down_blocks.1.resnets.0.conv1": 4, "down_blocks.1.resnets.0.conv2": 4,
        "mid_block.resnets.0.conv1": 4, "mid_block.resnets.1.conv2": 3,
        "up_blocks.0.resnets.0.conv1": 3, "up_blocks.0.upsamplers.0.conv": 2,
        "up_blocks.1.resnets.1.conv2": 2}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _settings(table):
    return "\n".join(f"{name}:{pf:g}" for name, pf in table.items())


def _repo(tmp_path, config: str, files: dict):
    """An official-layout folder: configs/run.yaml, its files under assets/."""
    for rel, text in files.items():
        _write(tmp_path / "ScaleCrafter" / rel, text)
    return _write(tmp_path / "ScaleCrafter" / "configs" / "run.yaml", config)


@pytest.fixture(scope="module")
def pipe():
    return load_pretrained(FIXTURE)


# -- the files ----------------------------------------------------------------------------------

def test_settings_files_read_as_the_official_code_reads_them(tmp_path):
    path = _write(tmp_path / "d.txt", "down_blocks.1.resnets.0.conv1:2\nmid_block.resnets.0.conv1:"
                  "2.5\n\nup_blocks.0.upsamplers.0.conv:4")
    assert official.read_dilate_settings(path) == {
        "down_blocks.1.resnets.0.conv1": 2.0, "mid_block.resnets.0.conv1": 2.5,
        "up_blocks.0.upsamplers.0.conv": 4.0}
    path = _write(tmp_path / "p.txt", "down_blocks.2.resnets.0.conv1\nmid_block.resnets.1.conv2\n")
    assert official.read_disperse_settings(path) == ("down_blocks.2.resnets.0.conv1",
                                                     "mid_block.resnets.1.conv2")


@pytest.mark.parametrize("line, message", [
    ("down_blocks.1.resnets.0.conv2 2", "expected 'module name:factor'"),
    ("down_blocks.1.resnets.0.conv2:two", "must be a number >= 1"),
    ("down_blocks.1.resnets.0.conv2:0.5", "must be a number >= 1"),
    ("down_blocks.1.resnets.0.conv2:2:3", "expected 'module name:factor'"),
    (":2", "is not a module name"),
    ("down_blocks.1.resnets.0.conv1:3", "given twice"),
])
def test_malformed_dilation_lines_name_the_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "d.txt", f"down_blocks.1.resnets.0.conv1:2\n\n{line}\n")
    with pytest.raises(ValueError, match=message) as e:
        official.read_dilate_settings(path)
    assert f"{path}:3:" in str(e.value)


@pytest.mark.parametrize("line", ["mid_block.resnets.0.conv1:2", "mid_block resnets"])
def test_malformed_disperse_lines_name_the_file_and_line(tmp_path, line):
    path = _write(tmp_path / "p.txt", f"mid_block.resnets.1.conv1\n{line}")
    with pytest.raises(ValueError, match=f"{path}:2: .* is not a module name"):
        official.read_disperse_settings(path)


def test_official_config_reads_its_files_relative_to_the_repository(tmp_path):
    """configs/sd1.5_2048x2048_disperse.yaml as published (num_inference_steps dropped: 50)."""
    yaml_text = """ndcfg_tau: 35
dilate_tau: 35
inflate_tau: 0
dilate_settings: ./assets/dilate_settings/sd1.5_2048x2048.txt
ndcfg_dilate_settings: ./assets/ndcfg_dilate_settings/sd1.5_2048x2048.txt
disperse_settings: ./assets/disperse_settings/sd1.5_2048x2048.txt
disperse_transform: ./transforms/R20to1_new.mat
progressive: true
inference_batch_size: 4
num_iters_per_prompt: 1
latent_height: 256
latent_width: 128"""
    files = {"assets/dilate_settings/sd1.5_2048x2048.txt": "down_blocks.1.resnets.0.conv1:2\n"
             "mid_block.resnets.0.conv1:4",
             "assets/ndcfg_dilate_settings/sd1.5_2048x2048.txt": "mid_block.resnets.0.conv1:4",
             "assets/disperse_settings/sd1.5_2048x2048.txt": "mid_block.resnets.0.conv1"}
    path = _repo(tmp_path, yaml_text, files)
    config = official.read_config(path)
    assert config.dilation == {"down_blocks.1.resnets.0.conv1": 2.0,
                               "mid_block.resnets.0.conv1": 4.0}
    assert config.ndcfg_dilation == {"mid_block.resnets.0.conv1": 4.0}
    assert config.disperse == ("mid_block.resnets.0.conv1",)
    assert (config.dilate_tau, config.ndcfg_tau, config.inflate_tau) == (35, 35, 0)
    assert config.progressive and config.num_inference_steps == 50
    assert config.latent_size == (256, 128)
    # Elsewhere: the paths are relative to a given root.
    moved = _write(tmp_path / "elsewhere" / "run.yaml", yaml_text)
    with pytest.raises(ValueError, match="dilate_settings .* does not exist"):
        official.read_config(moved)
    assert official.read_config(moved, str(tmp_path / "ScaleCrafter")) == config


@pytest.mark.parametrize("text, message", [
    ("dilate_tau: 30\ndilate_settingz: x.txt", r"unknown fields \['dilate_settingz'\]"),
    ("dilate_tau: 30.5", "dilate_tau must be an integer"),
    ("dilate_tau: 60\ndilate_settings: ./d.txt", r"dilate_tau must be a step count in \[0"),
    ("dilate_tau: 30", "dilate_tau 30 needs dilate_settings"),
    ("dilate_tau: 30\nsdedit_tau: 5", "sdedit_tau 5"),
    ("dilate_tau: 30\ninflate_tau: 20\ndilate_settings: ./d.txt\ndisperse_settings: ./p.txt\n"
     "disperse_transform: ~", "only R20to1_new.mat"),
    ("dilate_tau: 30\nndcfg_tau: 35\ndilate_settings: ./d.txt", "ndcfg_tau 35 > dilate_tau 30"),
    ("dilate_tau: 30\nndcfg_tau: 20\nprogressive: true\ndilate_settings: ./d.txt",
     "progressive mode with ndcfg_tau 20"),
    ("dilate_tau: 30\nprogressive: true\ndilate_settings: ./f.txt", "integer factors >= 2"),
    ("dilate_tau: 30\nndcfg_tau: 30\ninflate_tau: 30\ndilate_settings: ./d.txt\n"
     "disperse_settings: ./p.txt\ndisperse_transform: R20to1_new.mat", "also disperses NDCFG"),
    ("dilate_tau: [", "is not valid YAML"),
])
def test_bad_configs_are_named(tmp_path, text, message):
    path = _repo(tmp_path, text, {"d.txt": "mid_block.resnets.0.conv1:4",
                                  "f.txt": "mid_block.resnets.0.conv1:2.5",
                                  "p.txt": "mid_block.resnets.0.conv1"})
    with pytest.raises(ValueError, match=message):
        official.read_config(path, str(tmp_path / "ScaleCrafter"))


# -- taus as sigmas -----------------------------------------------------------------------------

def _sd_sigma(t):
    """SD's sigma at timestep t from its betas, in float64 (independent of discrete.py)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    a = np.cumprod(1.0 - betas)[t]
    return math.sqrt((1 - a) / a)


@pytest.mark.parametrize("tau, t", [(1, 981), (20, 601), (30, 401), (35, 301), (37, 261)])
def test_step_tau_is_the_sigma_of_the_last_active_ddim_timestep(tau, t):
    schedule = DiscreteSchedule.from_scheduler_config(SD15_SCHEDULER)
    np.testing.assert_array_equal(official.ddim_timesteps(SD15_SCHEDULER, 50),
                                  981 - 20 * np.arange(50))
    assert official.tau_sigma(schedule, SD15_SCHEDULER, tau) == pytest.approx(_sd_sigma(t),
                                                                              rel=1e-5)
    # The official run's own sigmas: exactly its first tau steps reach the threshold.
    sigmas = [_sd_sigma(ts) for ts in official.ddim_timesteps(SD15_SCHEDULER, 50)]
    threshold = official.tau_sigma(schedule, SD15_SCHEDULER, tau)
    assert sum(s >= threshold * (1 - 1e-6) for s in sigmas) == tau


def test_tau_edges_and_other_spacings():
    schedule = DiscreteSchedule.from_scheduler_config(SD15_SCHEDULER)
    assert official.tau_sigma(schedule, SD15_SCHEDULER, 0) == math.inf
    assert official.tau_sigma(schedule, SD15_SCHEDULER, 50) == 0.0
    linspace = {**SD15_SCHEDULER, "timestep_spacing": "linspace"}
    assert official.ddim_timesteps(linspace, 50)[:2].tolist() == [999, 979]
    trailing = {**SD15_SCHEDULER, "timestep_spacing": "trailing"}
    assert official.ddim_timesteps(trailing, 50)[[0, -1]].tolist() == [999, 19]
    assert official.ddim_timesteps({}, 50)[0] == 980  # DDIM's defaults: leading, offset 0


# -- names against the U-Net --------------------------------------------------------------------

def test_conv_levels_are_every_3x3_conv_of_the_unet():
    for name in ("tiny_sd", "tiny_sdxl", "tiny_if"):
        folder = os.path.join(os.path.dirname(FIXTURE), name, "unet")
        config = diffusers_unet.DiffusersUNetConfig.from_hf(
            json.loads(open(os.path.join(folder, "config.json")).read()))
        params = diffusers_unet.abstract_params(config)
        names = {n for n in diffusers_unet.conv_names(params)
                 if _get(params, n)["kernel"].shape[:2] == (3, 3)}
        assert set(diffusers_unet.conv3x3_levels(config)) == names, name
    levels = diffusers_unet.conv3x3_levels(SD15_UNET)
    assert len(levels) == 52  # the official all_valid_convs.txt's 50, conv_in and conv_out
    assert levels["down_blocks.2.downsamplers.0.conv"] == 2
    assert levels["up_blocks.2.upsamplers.0.conv"] == 0 and levels["up_blocks.3.resnets.2.conv2"] == 0


def _get(tree, dotted):
    for part in diffusers_unet.layer_path_of(dotted).split("/"):
        tree = tree[part]
    return tree


def test_absent_layers_are_an_error_or_skipped_with_a_warning(tmp_path, caplog):
    path = _write(tmp_path / "sdxl_2048x2048.txt", SDXL_2048)
    config = official.OfficialConfig(official.read_dilate_settings(path), dilate_tau=30,
                                     files={"dilate_settings": path})
    levels = diffusers_unet.conv3x3_levels(SDXL_UNET)
    schedule = DiscreteSchedule.from_scheduler_config(SD15_SCHEDULER)
    with pytest.raises(ValueError, match=r"sdxl_2048x2048.txt: 'down_blocks.3.resnets.0.conv1' "
                       r"is not a 3x3 conv of this U-Net; the closest is "
                       r"'down_blocks.2.resnets.0.conv1' \(4 such names.*skip_missing"):
        config.plan(levels, schedule, SD15_SCHEDULER)
    with caplog.at_level("WARNING"):
        plan = config.plan(levels, schedule, SD15_SCHEDULER, skip_missing=True)
    assert "dropped 4 names" in caplog.text and "down_blocks.3.resnets.1.conv2" in caplog.text
    # The effective set: the mid block and the first decoder block (with its upsampler).
    assert {p.rsplit(".", 3)[0] for p in plan.dilation} == {"mid_block", "up_blocks.0"}
    assert len(plan.dilation) == 11 and plan.sigma_tau == pytest.approx(_sd_sigma(401), rel=1e-5)
    typo = official.OfficialConfig({"mid_block.resnet.0.conv1": 2.0}, dilate_tau=30)
    with pytest.raises(ValueError, match="the closest is 'mid_block.resnets.0.conv1'"):
        typo.plan(levels, schedule, SD15_SCHEDULER)
    # Real layers that are never re-dilated stay errors, skip_missing or not.
    outer = official.OfficialConfig({"down_blocks.0.resnets.0.conv1": 2.0}, dilate_tau=30)
    with pytest.raises(ValueError, match="outermost encoder level"):
        outer.plan(levels, schedule, SD15_SCHEDULER, skip_missing=True)
    assert official.OfficialConfig(dilate_tau=0).plan(levels, schedule) is None  # sdxl_vanilla


# -- plans on tiny_sd ---------------------------------------------------------------------------

def _per_step(plan):
    """Per step: ({path: setting} of the main pass, of NDCFG's base term or None)."""
    out = []
    for seg in plan.segments:
        mild = seg.settings.uncond_layers
        for _ in range(seg.start, seg.stop):
            out.append((dict(seg.settings.layers), None if mild is None else dict(mild)))
    return out


def test_progressive_plan_with_ndcfg_on_tiny_sd(pipe):
    """sd1.5_2048x2048's scheme at 2x tiny_sd's side: tau 35 of 50, progressive, NDCFG with the
    outermost decoder level dropped. On the checkpoint's own 50 steps (t = 981, 961, ..., 1) the
    first 35 are re-dilated by max(ceil(pf (35 - i) / 35), 2), NDCFG's base term likewise."""
    mild = {p: pf for p, pf in TINY.items() if not p.startswith("up_blocks.1")}
    config = official.OfficialConfig(TINY, mild, dilate_tau=35, ndcfg_tau=35, progressive=True)
    highres = config.plan(diffusers_unet.conv3x3_levels(pipe.unet.config), pipe.schedule,
                          pipe.scheduler_config)
    plan = pipe.plan(50, sampler="euler", highres=highres)
    sigmas = plan.sigmas
    assert np.sum(sigmas[:-1] >= highres.sigma_tau) == 35
    for i, (layers, base) in enumerate(_per_step(plan)):
        if i >= 35:
            assert layers == {} and base is None, i
            continue
        want = {p: ConvSetting(max(math.ceil(pf * (35 - i) / 35), 2)) for p, pf in TINY.items()}
        assert layers == want, i
        assert base == {p: s for p, s in want.items() if p in mild}, i
    # pf 4: 4 for steps 0-8, 3 for 9-17, 2 for 18-34 (the facts' schedule).
    d = [s[0].get("mid_block.resnets.0.conv1", ConvSetting()).dilation for s in _per_step(plan)]
    assert d == [4] * 9 + [3] * 9 + [2] * 17 + [1] * 15


@pytest.mark.parametrize("steps, schedule", [(50, "discrete"), (13, "discrete"), (20, "karras")])
def test_a_step_is_redilated_exactly_while_sigma_reaches_sigma_tau(pipe, steps, schedule):
    """Non-progressive tau 30 of 50 (t >= 401) with a fractional factor, on any step count."""
    table = {"mid_block.resnets.0.conv1": 2.5, "up_blocks.0.resnets.0.conv2": 2.0}
    config = official.OfficialConfig(table, dilate_tau=30)
    highres = config.plan(diffusers_unet.conv3x3_levels(pipe.unet.config), pipe.schedule,
                          pipe.scheduler_config)
    assert highres.sigma_tau == pytest.approx(_sd_sigma(401), rel=1e-5)
    plan = pipe.plan(steps, sampler="euler", schedule=schedule, highres=highres)
    active = {"mid_block.resnets.0.conv1": ConvSetting(3, 1.2),
              "up_blocks.0.resnets.0.conv2": ConvSetting(2)}
    steps_active = 0
    for sigma, (layers, base) in zip(plan.sigmas, _per_step(plan)):
        assert layers == (active if sigma >= highres.sigma_tau else {}) and base is None
        steps_active += bool(layers)
    if steps == 50:
        assert steps_active == 30
    assert 0 < steps_active < steps


def test_dispersion_within_redilation(pipe):
    """inflate_tau 20 of dilate_tau 30: dispersed 5x5 kernels at half the factor first, then
    the plain re-dilation; a downsampler conv may be dispersed too."""
    from ediffi_jax.highres.disperse import DISPERSED

    table = {"mid_block.resnets.0.conv1": 4.0, "up_blocks.0.resnets.0.conv2": 2.0}
    config = official.OfficialConfig(table, disperse=("mid_block.resnets.0.conv1",),
                                     dilate_tau=30, inflate_tau=20)
    highres = config.plan(diffusers_unet.conv3x3_levels(pipe.unet.config), pipe.schedule,
                          pipe.scheduler_config)
    per_step = _per_step(pipe.plan(50, highres=highres))
    assert per_step[19][0]["mid_block.resnets.0.conv1"] == ConvSetting(2, kernel_map=DISPERSED)
    assert per_step[20][0]["mid_block.resnets.0.conv1"] == ConvSetting(4)
    assert per_step[19][0]["up_blocks.0.resnets.0.conv2"] == ConvSetting(2)
    assert per_step[30][0] == {}
    down = official.OfficialConfig({"down_blocks.2.downsamplers.0.conv": 4.0},
                                   disperse=("down_blocks.2.downsamplers.0.conv",),
                                   dilate_tau=30, inflate_tau=20)
    plan = down.plan(diffusers_unet.conv3x3_levels(SD15_UNET), pipe.schedule, SD15_SCHEDULER)
    assert plan.disperse == ("down_blocks.2.downsamplers.0.conv",)


def test_highres_plan_is_checked_against_the_unet(pipe):
    with pytest.raises(ValueError, match="not a 3x3 conv of this U-Net"):
        pipe.plan(2, highres=HighResPlan({"mid_block.resnets.0.conv9": 2.0}))
    with pytest.raises(ValueError, match="give highres or layer_settings"):
        pipe.plan(2, highres=HighResPlan({"mid_block.resnets.0.conv1": 2.0}),
                  layer_settings=lambda i, s: ())


# -- the command line ---------------------------------------------------------------------------

def test_command_line_samples_with_an_official_config(tmp_path, capsys):
    """--highres scalecrafter --scalecrafter-config: the config's latent size (2x tiny_sd's
    side) is the output size, and the image differs from direct sampling at that size."""
    from PIL import Image

    from sample.__main__ import main

    path = _repo(tmp_path, "ndcfg_tau: 0\ndilate_tau: 30\ninflate_tau: 0\n"
                 "dilate_settings: ./assets/dilate_settings/tiny.txt\nndcfg_dilate_settings: ~\n"
                 "disperse_settings: ~\ndisperse_transform: ~\nprogressive: false\n"
                 "num_inference_steps: 50\nlatent_height: 16\nlatent_width: 16\n",
                 {"assets/dilate_settings/tiny.txt": _settings(TINY)})
    args = ["--pretrained", FIXTURE, "--prompt", "a red circle", "--num", "1", "--steps", "2"]
    rc = main(args + ["--highres", "scalecrafter", "--scalecrafter-config", path,
                      "--out", str(tmp_path / "sc")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert ": 32x32, plan:" in out.out and "layers [d2 x2, d3 x2, d4 x3]" in out.out
    rc = main(args + ["--size", "32x32", "--out", str(tmp_path / "direct")])
    assert rc == 0, capsys.readouterr().err
    got, direct = (np.asarray(Image.open(tmp_path / d / "0000_a_red_circle.png")).astype(int)
                   for d in ("sc", "direct"))
    assert got.shape == direct.shape == (32, 32, 3)
    assert np.abs(got - direct).max() > 2


@pytest.mark.parametrize("extra, message", [
    (["--dilate-settings", "{d}", "--no-progressive"],
     "--dilate-settings, --progressive: only with --highres scalecrafter"),
    (["--highres", "scalecrafter"], "built-in presets .* give --size HxW or --resolution N"),
    (["--highres", "scalecrafter", "--size", "32x32", "--scalecrafter-preset", "sd3"],
     "--scalecrafter-preset 'sd3': not one of sd1, sd2, sdxl, sd1.5_1024x1024"),
    (["--highres", "scalecrafter", "--scalecrafter-preset", "sd1", "--size", "24x24"],
     "24x24 is 2.25x the pixels of the U-Net's own 16x16; .* sample this size directly"),
    (["--highres", "scalecrafter", "--dilate-settings", "{d}"], "needs --dilate-tau N"),
    (["--highres", "scalecrafter", "--dilate-settings", "{bad}", "--dilate-tau", "30"],
     "the closest is 'mid_block.resnets.0.conv1'"),
    (["--highres", "scalecrafter", "--dilate-settings", "{d}", "--dilate-tau", "51"],
     r"dilate_tau must be a step count in \[0, num_inference_steps = 50\]"),
])
def test_command_line_bad_highres_input(tmp_path, capsys, extra, message):
    from sample.__main__ import main

    files = {"d": _write(tmp_path / "d.txt", _settings(TINY)),
             "bad": _write(tmp_path / "bad.txt", "mid_block.resnet.0.conv1:2")}
    rc = main(["--pretrained", FIXTURE, "--prompt", "a red circle", "--steps", "1",
               "--out", str(tmp_path / "out")] + [e.format(**files) for e in extra])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# -- the built-in presets (highres/official_presets.py) -----------------------------------------

PUBLISHED = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "pretrained")


def _unet_config(folder):
    with open(os.path.join(folder, "unet", "config.json")) as f:
        return diffusers_unet.DiffusersUNetConfig.from_hf(json.load(f))


# scalecrafter-facts.md 1f, typed here: latent (height, width), dilate_tau, progressive,
# ndcfg_tau of each official config (every one 50 steps, inflate_tau 0).
FACTS_RUNS = {
    "sd1.5_1024x1024": ((128, 128), 30, False, 0), "sd1.5_1280x1280": ((160, 160), 35, False, 0),
    "sd1.5_2048x1024": ((128, 256), 35, True, 35), "sd1.5_2048x2048": ((256, 256), 35, True, 35),
    "sd2.1_1024x1024": ((128, 128), 20, False, 0), "sd2.1_1280x1280": ((160, 160), 30, False, 0),
    "sd2.1_2048x1024": ((128, 256), 37, True, 0), "sd2.1_2048x2048": ((256, 256), 37, True, 37),
    "sdxl_2048x2048": ((256, 256), 30, False, 0), "sdxl_2560x2560": ((320, 320), 30, False, 0),
    "sdxl_4096x2048": ((256, 512), 35, True, 35), "sdxl_4096x4096": ((512, 512), 35, True, 35),
}
# Its dilation per block: down_blocks.0-3, mid_block, up_blocks.0-3 (SDXL: 0-2, the effective
# set), 0 not dilated, a block's downsampler / upsampler conv its block's value unless noted.
_SD2, _SD25 = (0, 2, 2, 2, 2, 2, 2, 2, 0), (0, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5, 0)
_SD4, _SD21_4 = (0, 2, 3, 4, 4, 4, 3, 2, 0), (0, 0, 3, 4, 4, 4, 4, 3, 2)
_SD15_NDCFG, _SD21_NDCFG = (0, 0, 3, 4, 4, 4, 3, 0, 0), (0, 0, 3, 4, 4, 4, 4, 3, 0)
_XL_NDCFG = (0, 0, 0, 2, 2, 0, 0)
FACTS_TABLES = {  # run: (dilation row, NDCFG row or None)
    "sd1.5_1024x1024": (_SD2, None), "sd2.1_1024x1024": (_SD2, None),
    "sd1.5_1280x1280": (_SD25, None), "sd2.1_1280x1280": (_SD25, None),
    "sd1.5_2048x1024": (_SD4, _SD15_NDCFG), "sd1.5_2048x2048": (_SD4, _SD15_NDCFG),
    "sd2.1_2048x1024": (_SD4, _SD21_NDCFG), "sd2.1_2048x2048": (_SD21_4, _SD21_NDCFG),
    "sdxl_2048x2048": ((0, 0, 0, 2, 2, 0, 0), None), "sdxl_2560x2560": ((0, 0, 0, 2.5, 2.5, 0, 0), None),
    "sdxl_4096x2048": ((0, 0, 3, 4, 4, 3, 2), _XL_NDCFG),
    "sdxl_4096x4096": ((0, 0, 4, 4, 4, 3, 2), _XL_NDCFG),
}
FACTS_EXCEPTIONS = {("sd2.1_2048x2048", "dilation"), ("sd2.1_2048x2048", "ndcfg"),
                    ("sd2.1_2048x1024", "ndcfg")}  # down_blocks.2's downsampler 4


def _row_table(row, levels, exception):
    """The facts' row as {conv: factor} over a U-Net's 3x3 convs (its conv3x3_levels)."""
    n = (len(row) - 1) // 2
    blocks = [f"down_blocks.{i}." for i in range(n)] + ["mid_block."] + [
        f"up_blocks.{i}." for i in range(n)]
    out = {}
    for conv in levels:
        for block, pf in zip(blocks, row):
            if conv.startswith(block) and pf:
                out[conv] = float(pf)
    if exception:
        out["down_blocks.2.downsamplers.0.conv"] = 4.0
    return out


def test_presets_are_the_facts_tables_on_real_convs():
    """Every run's tables cover exactly the facts' blocks, every conv of each (the SD runs' on
    SD 1.5's U-Net, the SDXL runs' on SDXL base's), and its taus are the facts' table; the
    transposed runs are their wide run at the portrait latent; each plans without skip_missing."""
    from ediffi_jax.highres import official_presets as op

    levels = {"sd": diffusers_unet.conv3x3_levels(_unet_config(os.path.join(PUBLISHED, "sd15"))),
              "sdxl": diffusers_unet.conv3x3_levels(
                  _unet_config(os.path.join(PUBLISHED, "sdxl_base")))}
    assert set(op.OFFICIAL) == set(FACTS_RUNS)
    schedule = DiscreteSchedule.from_scheduler_config(SD15_SCHEDULER)
    for name, config in op.PRESETS.items():
        width, height = name.split("_")[1].split("x")
        wide = name if name in op.OFFICIAL else f"{name.split('_')[0]}_{height}x{width}"
        latent, dilate_tau, progressive, ndcfg_tau = FACTS_RUNS[wide]
        assert config.latent_size == (latent if wide == name else latent[::-1]), name
        assert (config.dilate_tau, config.progressive, config.ndcfg_tau) == (
            dilate_tau, progressive, ndcfg_tau), name
        assert (config.num_inference_steps, config.inflate_tau, config.disperse) == (50, 0, ())
        conv_levels = levels["sdxl" if name.startswith("sdxl") else "sd"]
        rows = FACTS_TABLES[wide]
        assert config.dilation == _row_table(rows[0], conv_levels,
                                             (wide, "dilation") in FACTS_EXCEPTIONS), name
        assert config.ndcfg_dilation == (None if rows[1] is None else _row_table(
            rows[1], conv_levels, (wide, "ndcfg") in FACTS_EXCEPTIONS)), name
        assert set(config.dilation) | set(config.ndcfg_dilation or {}) <= set(conv_levels)
        plan = config.plan(conv_levels, schedule, SD15_SCHEDULER)
        assert plan.dilation == config.dilation
    assert len(op.PRESETS["sd1.5_2048x2048"].dilation) == 39  # as the official file's lines
    assert len(op.PRESETS["sd2.1_2048x2048"].dilation) == 40
    assert len(op.PRESETS["sdxl_4096x4096"].dilation) == 28  # its 34 less the 6 SDXL lacks


@pytest.mark.parametrize("family, size, kw, name, latent", [
    # an official run's size is that run (H x W here, W x H in the names)
    ("sd1", (1024, 1024), {}, "sd1.5_1024x1024", (128, 128)),
    ("sd1", (1024, 2048), {}, "sd1.5_2048x1024", (128, 256)),
    ("sd1", (2048, 1024), {}, "sd1.5_1024x2048", (256, 128)),
    ("sd2", (2048, 2048), {}, "sd2.1_2048x2048", (256, 256)),
    ("sd2", (1280, 1280), {}, "sd2.1_1280x1280", (160, 160)),
    ("sdxl", (2048, 4096), {}, "sdxl_4096x2048", (256, 512)),
    ("sdxl", (2560, 2560), {}, "sdxl_2560x2560", (320, 320)),
    # other sizes: the closest pixel count, then aspect (issue #14's own example first)
    ("sd1", (1344, 768), {}, "sd1.5_1024x1024", (168, 96)),
    ("sd2", (1152, 1152), {}, "sd2.1_1280x1280", (144, 144)),
    ("sd1", (1024, 1920), {}, "sd1.5_2048x1024", (128, 240)),
    ("sd1", (1920, 1024), {}, "sd1.5_1024x2048", (240, 128)),
    ("sd1", (4096, 4096), {}, "sd1.5_2048x2048", (512, 512)),
    ("sdxl", (3584, 3584), {}, "sdxl_4096x4096", (448, 448)),
    # relative to the U-Net's own size: SD 2.1 768-v at 2x its side is the 1024^2 run
    ("sd2", (1536, 1536), {"native": 768}, "sd2.1_1024x1024", (192, 192)),
    ("sd1", (32, 32), {"native": 16, "vae_factor": 2}, "sd1.5_1024x1024", (16, 16)),
])
def test_preset_for_a_size(family, size, kw, name, latent):
    from ediffi_jax.highres import official_presets as op

    got = op.preset_for(family, *size, **kw)
    assert got.name == name and got.config.latent_size == latent
    assert dataclasses.replace(got.config, latent_size=None) == dataclasses.replace(
        op.PRESETS[name], latent_size=None)


@pytest.mark.parametrize("family, size, kw, message", [
    ("sd1", (960, 960), {}, r"960x960 is 3.52x the pixels of the U-Net's own 512x512; .*"
     r"sd1.5_1024x1024.*sample this size directly"),
    ("sdxl", (1024, 1792), {}, "the smallest built-in ScaleCrafter setting .sdxl_2048x2048"),
    ("sd2", (1024, 1024), {"native": 768}, "1.78x the pixels of the U-Net's own 768x768"),
    ("sd1", (1028, 1024), {}, "not a multiple of the VAE's factor 8"),
    ("if", (1024, 1024), {}, "unknown ScaleCrafter preset family 'if'"),
])
def test_preset_for_what_it_cannot_take(family, size, kw, message):
    from ediffi_jax.highres import official_presets as op

    with pytest.raises(ValueError, match=message):
        op.preset_for(family, *size, **kw)


@pytest.mark.parametrize("folder, family", [
    ("sd15", "sd1"), ("sd21", "sd2"), ("sdxl_base", "sdxl"),
    ("sdxl_refiner", "not SDXL base .cross_attention_dim 1280"),
    ("tiny_sd", "no built-in ScaleCrafter preset for this U-Net .cross_attention_dim 24"),
    ("tiny_sdxl", "not SDXL base .cross_attention_dim 40"),
    ("tiny_if", "a DeepFloyd IF U-Net"), ("tiny_if2", "a DeepFloyd IF U-Net"),
])
def test_unet_family(folder, family):
    from ediffi_jax.highres import official_presets as op

    path = os.path.join(PUBLISHED if folder[:4] != "tiny" else os.path.dirname(FIXTURE), folder)
    config = _unet_config(path)
    if family in op.FAMILIES:
        assert op.unet_family(config) == family
    else:
        with pytest.raises(ValueError, match=family):
            op.unet_family(config)


def test_command_line_preset_for_a_published_unet():
    """The default path on SD 1.5's published config (no weights needed): the family's run for
    the output size, the flags over it as over a yaml."""
    import argparse

    from ediffi_jax.highres import official_presets as op
    from sample.pretrained import PRESET, add_arguments, highres_preset, read_highres

    p = argparse.ArgumentParser()
    p.add_argument("--highres")
    p.add_argument("--resolution", type=int)
    add_arguments(p)
    args = p.parse_args(["--highres", "scalecrafter", "--size", "1024x2048", "--dilate-tau", "20",
                         "--ndcfg-tau", "20"])
    assert read_highres(args) == PRESET
    preset, line = highres_preset(args, _unet_config(os.path.join(PUBLISHED, "sd15")),
                                  (512, 512), (1024, 2048), 8)
    assert line.startswith("ScaleCrafter preset sd1.5_2048x1024 (the official run: 1024 high, "
                           "2048 wide, from 512x512) for 1024x2048")
    config = read_highres(args, preset)
    assert (config.dilate_tau, config.ndcfg_tau, config.latent_size) == (20, 20, (128, 256))
    assert dataclasses.replace(config, dilate_tau=35, ndcfg_tau=35) == op.PRESETS[
        "sd1.5_2048x1024"]


def test_command_line_samples_with_a_preset(tmp_path, capsys):
    """tiny_sd at 2x its side with the SD 1.5 presets (--scalecrafter-preset sd1: its own
    cross_attention_dim is no family's): the 1024^2 run, whose names of SD 1.5's layout tiny_sd
    (2 levels, 1 resnet per block) partly lacks: an error naming the closest, or with
    --highres-skip-missing the rest, --dilate-tau over the preset's."""
    from PIL import Image

    from sample.__main__ import main

    args = ["--pretrained", FIXTURE, "--prompt", "a red circle", "--num", "1", "--steps", "2",
            "--highres", "scalecrafter", "--size", "32x32", "--out", str(tmp_path / "sc")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no built-in ScaleCrafter preset for this U-Net" in err and "--scalecrafter-preset" in err
    assert main(args + ["--scalecrafter-preset", "sd1"]) == 2
    assert re.search(r"preset sd1.5_1024x1024: 'down_blocks.1.resnets.1.conv1' is not a 3x3 "
                     r"conv of this U-Net; the closest is 'down_blocks.1.resnets.0.conv1' .*"
                     r"--highres-skip-missing", capsys.readouterr().err)
    assert not (tmp_path / "sc").exists()
    rc = main(args + ["--scalecrafter-preset", "sd1", "--highres-skip-missing",
                      "--dilate-tau", "25"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert ("ScaleCrafter preset sd1.5_1024x1024 (the official run: 1024 high, 1024 wide, from "
            "512x512) for 32x32 from this U-Net's 16x16 (4x the pixels)") in out.out
    assert "ScaleCrafter: dilate_tau 25, ndcfg_tau 0" in out.out
    assert "layers [d2 x15]" in out.out  # the 15 of the 39 names tiny_sd has, by 2
    image = np.asarray(Image.open(tmp_path / "sc" / "0000_a_red_circle.png"))
    assert image.shape == (32, 32, 3)


def test_command_line_attention_entropy_scaling(tmp_path, capsys):
    """--attention-entropy past the native size: every step's self-attention rescaled for 4x
    the tokens (the plan says so) and the image moves; at the native size it is an error."""
    from PIL import Image

    from sample.__main__ import main

    args = ["--pretrained", FIXTURE, "--prompt", "a red circle", "--num", "1", "--steps", "2",
            "--size", "32x32"]
    assert main(args + ["--attention-entropy", "--out", str(tmp_path / "sf")]) == 0
    assert "attention entropy x4" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "direct")]) == 0
    got, direct = (np.asarray(Image.open(tmp_path / d / "0000_a_red_circle.png")).astype(int)
                   for d in ("sf", "direct"))
    assert np.abs(got - direct).max() > 0
    rc = main(args[:-1] + ["16x16", "--attention-entropy", "--out", str(tmp_path / "x")])
    assert rc == 2 and "is not past the U-Net's own 16x16" in capsys.readouterr().err
