"""The planner for diffusers checkpoints (pipeline/pretrained_plan.py, python -m ediffi_jax.info
--pretrained): parameter counts against the weight files themselves, model FLOPs independent
of the partitioning, per-device memory that shrinks with the mesh, errors before compiling."""
import os

import jax
import pytest
from safetensors.numpy import load_file

from ediffi_jax.config import ConfigError
from ediffi_jax.training.dry_run import cost_of
from ediffi_jax.models import diffusers_unet
from ediffi_jax.pipeline.pretrained import read_component_config
from ediffi_jax.pipeline.pretrained_plan import TOKENS, plan_pretrained

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers")
SDXL = os.path.join(FIXTURES, "tiny_sdxl")


def _elements(folder):
    return sum(v.size for name in os.listdir(folder) if name.endswith(".safetensors")
               for v in load_file(os.path.join(folder, name)).values())


@pytest.fixture(scope="module")
def plan():
    return plan_pretrained(SDXL, devices=8, mesh_shape=(2, 4, 1), batch=2, steps=10,
                           device_memory_gib=1e-3)


def test_counts_equal_the_weight_files(plan):
    assert set(plan.params) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    for name, count in plan.params.items():
        assert count == _elements(os.path.join(SDXL, name)), name


def test_flops_are_the_models_not_the_partitions(plan):
    """The sampler's U-Net call on the mesh counts what one unpartitioned call on the same
    2 x batch (CFG) inputs counts; per image the text, steps and decode add up."""
    config = read_component_config(os.path.join(SDXL, "unet"), diffusers_unet.DiffusersUNetConfig)
    unet = diffusers_unet.DiffusersUNet(config)
    args, kwargs = diffusers_unet.example_inputs(config, 4, plan.sample_shape[:2], TOKENS)
    single = cost_of(jax.jit(lambda p, a, kw: unet.apply({"params": p}, *a, **kw)).lower(
        diffusers_unet.abstract_params(config), args, kwargs))
    assert plan.unet.flops == pytest.approx(single, rel=1e-6)
    assert plan.unet.flops > 1e6
    text = sum(p.flops for p in plan.text.values())
    assert plan.flops_per_image == pytest.approx(
        (text + 10 * plan.unet.flops + plan.decode.flops) / 2, rel=1e-9)


def test_memory_is_per_device(plan):
    f = plan.finetune
    n = plan.params["unet"]
    # fsdp 4 shards the large kernels: well under a full float32 copy per device, over a
    # quarter of one (norms, biases and odd widths stay replicated).
    assert 4 * n / 4 <= f.params_bytes < 4 * n / 2
    assert f.ema_bytes == f.params_bytes
    assert 2 * f.params_bytes <= f.optimizer_bytes <= 2 * f.params_bytes + 64  # Adam's moments
    assert f.total_bytes >= f.params_bytes + f.optimizer_bytes + f.ema_bytes + f.batch_bytes
    assert f.batch == 8 and f.temp_bytes > 0
    assert plan.sampling_bytes > sum(p.params_bytes for p in plan.text.values())
    report = "\n".join(plan.report())
    assert "does not fit" in report and "data 2 x fsdp 4 x tensor 1" in report


def test_command_line(capsys):
    from ediffi_jax.info import main

    rc = main(["--pretrained", os.path.join(FIXTURES, "tiny_if"), "--no-finetune",
               "--steps", "4", "--size", "32x16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "U-Net input 32x16x3" in out and "params text_encoder" in out
    flops = float(out.split("FLOPs per image")[1].split()[0])
    call = float(out.split("U-Net call")[1].split()[0])
    assert flops > 4 * 2 * call  # 4 steps x 2 branches, plus the T5 prompts


@pytest.mark.parametrize("kwargs, message", [
    (dict(mesh_shape=(3, 1, 1), devices=8), "mesh"),
    (dict(size=(18, 16)), "18x16 is not a multiple of 4"),
])
def test_bad_layouts_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan_pretrained(SDXL, finetune=False, **kwargs)


def test_a_folder_without_a_unet_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unet/config.json"):
        plan_pretrained(str(tmp_path))

