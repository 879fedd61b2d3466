"""The model-FLOP count behind MFU (benchmarks/vs_diffusers.py's jaxpr walk, used by
benchmarks/train_mfu.py), and why XLA's cost analysis is not used for it: XLA counts a loop
body once and skips SAME padding taps; the walk counts scans times their length, every tap, and
with remat off, no recompute. Trace-only for the train steps, two tiny compiles."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks.train_mfu import model_flops_per_step
from benchmarks.vs_diffusers import matmul_flops
from ediffi_jax.config import load_config
from ediffi_jax.training.dry_run import cost_of
from ediffi_jax.runs.spec import run_schema
from ediffi_jax.training.dry_run import plan_step

SMALL = ["model.resolution=16", "model.channels=16", "model.channel_mult=(1,2)",
         "model.num_res_blocks=1", "model.attention_resolutions=(8,)", "train.batch_size=16",
         "mesh.shape=(1,1,1)"]


def walk(f, *args) -> float:
    return matmul_flops(jax.make_jaxpr(f)(*args).jaxpr)


def test_conv_counts_every_tap_where_xla_skips_padding():
    x, w = jnp.zeros((1, 8, 8, 16)), jnp.zeros((3, 3, 16, 32))
    dn = ("NHWC", "HWIO", "NHWC")
    same = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)  # noqa: E731
    valid = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dn)  # noqa: E731
    assert walk(same, x, w) == 2 * 8 * 8 * 32 * 3 * 3 * 16
    assert walk(valid, x, w) == 2 * 6 * 6 * 32 * 3 * 3 * 16 == cost_of(jax.jit(valid).lower(x, w).compile())
    # XLA: only taps inside the image, 22 of the 24 per row and per column.
    assert cost_of(jax.jit(same).lower(x, w).compile()) == 2 * 32 * 16 * 22 * 22


def test_scan_counts_its_length_where_xla_counts_the_body_once():
    a = jnp.zeros((64, 64))
    f = lambda a: jax.lax.scan(lambda c, _: (c @ c, None), a, None, length=4)[0]  # noqa: E731
    assert walk(f, a) == 4 * 2 * 64**3
    assert cost_of(jax.jit(f).lower(a).compile()) == pytest.approx(2 * 64**3, abs=16)


def model_flops(*overrides):
    planned = plan_step(load_config("configs/tiny.py", SMALL + list(overrides), run_schema()),
                        devices=1)
    walked = walk(planned.step, planned.state, planned.batch, planned.interval)
    return model_flops_per_step(planned, planned.state, planned.batch, planned.interval), walked


def test_model_flops_ignore_remat_and_grad_accum():
    base, walked = model_flops()
    assert walked == base
    remat, remat_walked = model_flops("model.remat=True")
    assert remat == base and remat_walked > 1.1 * base  # the walk of the remat step recomputes
    accum, accum_walked = model_flops("train.grad_accum=4")
    assert accum == accum_walked == base  # 4 microbatches of 4, the same as one of 16
