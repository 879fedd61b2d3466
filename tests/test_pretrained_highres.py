"""ScaleCrafter on diffusers pipeline folders from the official settings files as they are
(highres/official.py): the file readers, step taus as sigmas of the checkpoint's schedule
against an independent computation, layer names checked against the U-Net (closest-name
errors; skip_missing for the official SDXL files' absent blocks), per-step plans on tiny_sd,
and the command line."""
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
    (["--highres", "scalecrafter"], "needs --scalecrafter-config FILE.yaml"),
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
