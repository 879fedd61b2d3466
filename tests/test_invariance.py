"""Samples do not depend on batch composition or device count; CFG's endpoints are exact."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ediffi_jax.diffusion.guidance import guided_denoise
from ediffi_jax.diffusion.intervals import CONFIG_LAYOUTS
from ediffi_jax.diffusion.plan import SegmentSettings, build_plan
from ediffi_jax.diffusion.sampling import PlanRunner
from ediffi_jax.diffusion.schedules import karras_sigmas
from ediffi_jax.models.unet import UNet
from ediffi_jax.parallel.mesh import batch_sharding, make_mesh
from ediffi_jax.pipeline.denoise import unet_denoise_fn
from tiny import tiny_conditioning, tiny_params, tiny_unet_config

CFG = tiny_unet_config()
SHAPE = (CFG.resolution, CFG.resolution, 3)


@pytest.fixture(scope="module")
def setup():
    params = [tiny_params(CFG, seed) for seed in range(3)]
    runner = PlanRunner(unet_denoise_fn(UNet(CFG)))
    # Stochastic Heun across the three Config-D experts with CFG: every source of randomness.
    plan = build_plan(karras_sigmas(10), CONFIG_LAYOUTS["D"], sampler="heun",
                      guidance_scale=2.5, s_churn=5.0)
    return params, runner, plan


def conditioning(indices):
    """Per-example conditioning that depends only on the example index."""
    full = tiny_conditioning(CFG, 8)
    return jax.tree.map(lambda a: a[np.asarray(indices)], full)


def test_one_image_equals_its_row_in_a_batch_of_8(setup):
    params, runner, plan = setup
    idx = list(range(8))
    cond = conditioning(idx)
    batch = runner.sample(plan, params, SHAPE, seed=7, example_indices=idx, cond=cond)
    alone = runner.sample(plan, params, SHAPE, seed=7, example_indices=[5], cond=conditioning([5]))
    np.testing.assert_allclose(alone[0], batch[5], atol=1e-5)
    assert float(jnp.abs(batch[5] - batch[4]).max()) > 0.1  # examples differ


def test_8_devices_equal_1_device(setup):
    params, runner, plan = setup
    idx = list(range(8))
    cond = conditioning(idx)
    single = runner.sample(plan, params, SHAPE, seed=7, example_indices=idx, cond=cond)
    mesh = make_mesh((8, 1, 1))
    shard = batch_sharding(mesh)
    cond_s = jax.tree.map(lambda a: jax.device_put(a, batch_sharding(mesh, a.ndim)), cond)
    params_r = jax.device_put(params, NamedSharding(mesh, P()))
    sharded = runner.sample(plan, params_r, SHAPE, seed=7, example_indices=idx, cond=cond_s, batch_sharding=shard)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


@functools.partial(jax.jit, static_argnames=("use_cfg",))
def _guided(params, x, sigma, cond, uncond, scale, use_cfg):
    fn = functools.partial(unet_denoise_fn(UNet(CFG)), settings=SegmentSettings())
    return guided_denoise(fn, params, x, sigma, cond, uncond, scale, use_cfg)


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    params = tiny_params(CFG)
    x = jax.random.normal(jax.random.key(0), (2,) + SHAPE)
    sigma = jnp.array([0.7, 3.0])
    cond = conditioning([0, 1])
    uncond = cond.unconditional()
    d_cond = _guided(params, x, sigma, cond, uncond, 1.0, use_cfg=False)
    d_uncond = _guided(params, x, sigma, uncond, uncond, 1.0, use_cfg=False)
    assert float(jnp.abs(d_cond - d_uncond).max()) > 1e-3
    np.testing.assert_allclose(_guided(params, x, sigma, cond, uncond, 1.0, use_cfg=True), d_cond, atol=1e-5)
    np.testing.assert_allclose(_guided(params, x, sigma, cond, uncond, 0.0, use_cfg=True), d_uncond, atol=1e-5)
    w = 3.0
    np.testing.assert_allclose(_guided(params, x, sigma, cond, uncond, w, use_cfg=True),
                               d_uncond + w * (d_cond - d_uncond), atol=1e-4)
