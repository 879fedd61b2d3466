"""Mesh construction, the logical rules, sharded init and a sharded U-Net forward."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ediffi_jax.models.unet import UNet, boxed_init
from ediffi_jax.parallel.mesh import (
    LOGICAL_AXIS_RULES, batch_sharding, logical_shardings, make_mesh, resolve_mesh_shape, sharded_init,
)
from tiny import tiny_conditioning, tiny_params, tiny_unet_config

CFG = tiny_unet_config()


def test_mesh_shape_fills_minus_one_and_rejects_misfits():
    assert resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    assert make_mesh((2, 2, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 12 devices, but 8 are available"):
        make_mesh((2, 2, 3))
    with pytest.raises(ValueError, match="not a multiple of 3"):
        make_mesh((-1, 3, 1))
    with pytest.raises(ValueError, match="at most one axis"):
        make_mesh((-1, -1, 2))


def test_rules_shard_params_and_keep_indivisible_dims_replicated():
    mesh = make_mesh((2, 2, 2))
    abstract = jax.eval_shape(lambda: boxed_init(CFG, jax.random.key(0)))
    shardings = logical_shardings(abstract, mesh)
    assert shardings["down0_res0"]["conv1"]["kernel"].spec == P(None, None, None, "fsdp")
    assert shardings["down1_attn0"]["self_qkv"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["down1_attn0"]["self_out"]["kernel"].spec == P("tensor", "fsdp")
    # conv_out has 3 output channels: fsdp=2 does not divide 3, so it stays replicated.
    assert shardings["conv_out"]["kernel"].spec == P(None, None, None, None)


@functools.partial(jax.jit, static_argnames=())
def _forward(params, x, c_noise, cond):
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        return UNet(CFG).apply({"params": params}, x, c_noise, cond)


def test_sharded_forward_equals_single_device():
    params = tiny_params(CFG)
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    c_noise = jnp.linspace(-1.5, 1.0, 8)
    cond = tiny_conditioning(CFG, 8)
    single = _forward(params, x, c_noise, cond)

    mesh = make_mesh((2, 2, 2))
    abstract = jax.eval_shape(lambda: boxed_init(CFG, jax.random.key(0)))
    p_sharded = jax.device_put(params, logical_shardings(abstract, mesh))
    x_s = jax.device_put(x, batch_sharding(mesh, 4))
    cond_s = jax.tree.map(lambda a: jax.device_put(a, batch_sharding(mesh, a.ndim)), cond)
    with jax.set_mesh(mesh):
        sharded = _forward(p_sharded, x_s, jax.device_put(c_noise, batch_sharding(mesh)), cond_s)
    assert not p_sharded["down0_res0"]["conv1"]["kernel"].sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)


def test_sharded_init_materialises_shards_and_matches_plain_init():
    from ediffi_jax.models.unet import init_params

    mesh = make_mesh((1, 4, 2))
    params, shardings = sharded_init(lambda: boxed_init(CFG, jax.random.key(0)), mesh)
    kernel = params["down1_res0"]["conv1"]["kernel"]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (3, 3, 8, 4)
    plain = init_params(CFG, jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), params, plain)


def test_the_train_step_constrains_activations_under_the_mesh_rules():
    """The U-Net's nn.with_logical_constraint on its activations acts in the trainer's step
    (and the dry run's, the same jit_train_step): on an fsdp mesh each [B, H, W, C] activation
    is pinned to batch over (data, fsdp). Without activation_rules the same step has none."""
    from ediffi_jax.config import load_config
    from ediffi_jax.runs.spec import run_schema
    from ediffi_jax.training import trainer
    from ediffi_jax.training.dry_run import plan_step
    from tests.test_faults_training import BASE

    config = load_config("configs/tiny.py", BASE + ["--config.mesh.shape=(1,8,1)"], run_schema())
    planned = plan_step(config, devices=8)
    args = (planned.state, planned.batch, planned.interval)
    text = planned.step.lower(*args).as_text()
    # The first res block's activations: batch 8, 16x16, 8 channels.
    pinned = re.findall(r'sdy\.sharding_constraint %\S+ <@mesh, \[\{"data", "fsdp"\}, \{\}, \{\}, \{\}\]>'
                        r' : tensor<8x16x16x8xf32>', text)
    assert len(pinned) >= 2, text.count("sharding_constraint")

    monkey = pytest.MonkeyPatch()
    with monkey.context() as m:  # the control: the same step traced without the rules
        m.setattr(trainer, "with_activation_rules", lambda fn, mesh: fn)
        bare = trainer.jit_train_step(
            UNet(planned.run.stage.model), planned.run.train, planned.optimizer,
            planned.state_shardings, planned.mesh,
            jax.tree.map(lambda x: x.sharding, planned.batch)).lower(*args).as_text()
    assert "sharding_constraint" not in bare


def test_the_sampler_constrains_activations_under_the_mesh_rules():
    """A PlanRunner given the mesh (as CascadeSampler gives it its own) traces each segment
    loop inside the activation rules: the guided batch (cond + uncond, 2 x 8) of every
    block's activation is pinned to batch over (data, fsdp). Without the mesh, none is."""
    from ediffi_jax.diffusion.plan import SamplingConfig
    from ediffi_jax.diffusion.sampling import PlanRunner, example_keys, initial_noise
    from ediffi_jax.pipeline.denoise import unet_denoise_fn
    from ediffi_jax.rng import sampling_key

    mesh = make_mesh((1, 8, 1))
    place = lambda t: jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), t)  # noqa: E731
    plan = SamplingConfig(sampler="euler", num_steps=2, guidance_scale=2.0).plan()
    cond = place(tiny_conditioning(CFG, 8))
    keys = example_keys(sampling_key(0), place(jnp.arange(8, dtype=jnp.uint32)))
    x = initial_noise(keys, (16, 16, 3), float(plan.sigmas[0]))
    lowered = lambda m: PlanRunner(unet_denoise_fn(UNet(CFG)), mesh=m).lower(  # noqa: E731
        plan, [tiny_params(CFG)], cond, keys, x).as_text()
    pinned = re.findall(r'sdy\.sharding_constraint %\S+ <@mesh, \[\{"data", "fsdp"\}, \{\}, \{\}, \{\}\]>'
                        r' : tensor<16x16x16x8xf32>', lowered(mesh))
    assert len(pinned) >= 2
    assert "sharding_constraint" not in lowered(None)
