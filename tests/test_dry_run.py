"""The --dry_run planner: sizes from the shardings, FLOPs of the compiled step, the fit verdict,
and layouts that cannot work rejected before anything compiles. One compile for the module."""
import dataclasses
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from ediffi_jax.config import ConfigError, load_config
from ediffi_jax.info import forward_flops
from ediffi_jax.models.unet import boxed_init
from ediffi_jax.parallel.mesh import logical_shardings, make_mesh
from ediffi_jax.runs.spec import parse_run, run_schema
from ediffi_jax.training.dry_run import Plan, _per_device_bytes, plan_run

# The tiny config, smaller still: compile time is what this test costs.
SMALL = ["model.resolution=16", "model.channels=16", "model.channel_mult=(1,2)",
         "model.num_res_blocks=1", "model.attention_resolutions=(8,)", "train.batch_size=16"]
# For the CLI, one level and no attention.
MINIMAL = ["model.resolution=8", "model.channels=8", "model.channel_mult=(1,)",
           "model.num_res_blocks=1", "model.attention_resolutions=()", "train.batch_size=16"]


def small_config(*overrides):
    return load_config("configs/tiny.py", SMALL + list(overrides), run_schema())


def abstract_boxed(config):
    model = parse_run(config).stage.model
    return jax.eval_shape(lambda: boxed_init(model, jax.random.key(0)))


@pytest.fixture(scope="module")
def plan() -> Plan:
    return plan_run(small_config("mesh.shape=(2,2,2)"), devices=8)


def test_param_bytes_follow_the_shardings(plan):
    boxed = abstract_boxed(small_config())
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(boxed)))
    assert plan.params == count
    # Independently of shard_shape: each leaf's bytes over the mesh sizes its spec names.
    mesh = make_mesh((2, 2, 2), jax.devices()[:8])
    expected = 0
    for leaf, sh in zip(jax.tree.leaves(nn.meta.unbox(boxed)),
                        jax.tree.leaves(logical_shardings(boxed, mesh))):
        axes = [a for entry in sh.spec if entry for a in ((entry,) if isinstance(entry, str)
                                                          else entry)]
        expected += math.prod(leaf.shape) * 4 // math.prod(mesh.shape[a] for a in axes)
    assert plan.params_bytes == expected
    assert count * 4 / 4 <= plan.params_bytes < count * 4  # fsdp x tensor shard most weights
    assert plan.ema_bytes == plan.params_bytes
    assert 2 * plan.params_bytes <= plan.optimizer_bytes <= 2 * plan.params_bytes + 64  # Adam
    assert plan.per_device_batch == 16 // 4 and plan.mesh == {"data": 2, "fsdp": 2, "tensor": 2}
    assert plan.temp_bytes > 0
    assert plan.total_bytes >= plan.params_bytes + plan.optimizer_bytes + plan.ema_bytes


def test_replicated_layout_holds_every_parameter():
    boxed = abstract_boxed(small_config())
    mesh = make_mesh((8, 1, 1), jax.devices()[:8])
    tree = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.meta.unbox(boxed), logical_shardings(boxed, mesh))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    assert _per_device_bytes(tree) == count * 4


def test_flops_are_about_three_forwards(plan):
    # XLA counts the per-device program (1 vs 2 devices halves it); the plan sums the devices,
    # and compute replicated over `tensor` is counted once per device, so allow some slack.
    fwd = forward_flops(parse_run(small_config()).stage.model, batch=16)
    assert 2 * fwd < plan.flops_per_step < 6 * fwd
    assert plan.flops_per_step == plan.flops_per_device * 8


def test_verdict(plan):
    assert plan.fits and plan.report()[-1].startswith("fits:")
    tight = dataclasses.replace(plan, device_memory=plan.total_bytes - 1)
    assert not tight.fits
    verdict = tight.report()[-1]
    assert verdict.startswith("does not fit:")
    for hint in ("fsdp", "grad_accum", "remat", "bf16"):
        assert hint in verdict


@pytest.mark.parametrize("overrides, devices, match", [
    (["mesh.shape=(3,1,1)"], 8, "needs 3 devices"),
    (["mesh.shape=(-1,3,1)"], 8, "not a multiple of 3"),
    (["train.batch_size=12"], 8, "does not divide"),
    (["train.batch_size=16", "train.grad_accum=4"], 8, "microbatch 4"),
    ([], 9, "only 8 devices"),
])
def test_bad_layouts_fail_before_compiling(monkeypatch, overrides, devices, match):
    def no_compile(*a, **k):
        raise AssertionError("compiled a layout that cannot work")

    monkeypatch.setattr(jax, "jit", no_compile)
    with pytest.raises(ConfigError, match=match):
        plan_run(small_config(*overrides), devices=devices)


def test_cli_simulates_devices_and_exits_3_when_it_does_not_fit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # not conftest's 8 devices
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--dry_run",
         "--devices", "4", "--device_memory_gib", "0.001", *(f"--config.{o}" for o in MINIMAL)],
        cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 3, out.stderr
    assert "data 4 x fsdp 1 x tensor 1 (4 cpu devices)" in out.stdout
    assert "does not fit" in out.stdout.splitlines()[-1]


def test_gradient_accumulation_cuts_activation_memory_on_a_sharded_batch():
    """Strided microbatches keep all 8 devices busy, so each holds 1/4 of its activations."""
    one = plan_run(small_config("mesh.shape=(8,1,1)", "train.batch_size=32"), devices=8)
    four = plan_run(small_config("mesh.shape=(8,1,1)", "train.batch_size=32",
                                 "train.grad_accum=4"), devices=8)
    assert four.per_device_batch == one.per_device_batch // 4
    assert four.temp_bytes < 0.5 * one.temp_bytes


def test_dry_run_plans_a_patch_trained_sr_stage():
    """An SR stage's batch: 8x8 patches, whole 8x8 low-res images of the 16x16 originals and the
    patch corners, besides the text conditioning."""
    config = load_config("configs/tiny.py", MINIMAL + [
        "model.lowres_scale=2", "data.resolution=16", "mesh.shape=(2,1,1)"], run_schema())
    plan = plan_run(config, devices=2)
    base = plan_run(load_config("configs/tiny.py", MINIMAL + ["mesh.shape=(2,1,1)"], run_schema()),
                    devices=2)
    per_device = 16 // 2
    assert plan.batch_bytes - base.batch_bytes == per_device * (8 * 8 * 3 * 4 + 2 * 4)
    with pytest.raises(ConfigError, match="smaller than model.resolution"):
        plan_run(load_config("configs/tiny.py", MINIMAL + ["model.lowres_scale=2",
                                                           "data.resolution=4"], run_schema()))


def test_mfu_benchmark_runs_the_planned_step_and_reports_its_plan(plan):
    """benchmarks/train_mfu.py: the executable it times is the one the planner sizes (same
    bytes and FLOPs as plan_run's), its steps really run, and MFU is the stated ratio."""
    from benchmarks.train_mfu import measure, peak_tflops

    r = measure(small_config("mesh.shape=(2,2,2)"), steps=2, peak=0.5)
    assert r["planned_bytes"] == plan.total_bytes and r["xla_flops_per_step"] == plan.flops_per_step
    assert r["steps_run"] == 4 and math.isfinite(r["loss"]) and r["batch"] == 16
    assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / r["seconds_per_step"] / 8 / 0.5e12)
    # Convs and dots of forward + backward: the order of XLA's count of the whole program.
    assert 0.5 * plan.flops_per_step < r["model_flops_per_step"] <= 1.5 * plan.flops_per_step
    assert r["peak_bytes_in_use"] is None  # CPU devices keep no memory statistics
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("cpu") is None
