"""The training step: sharding invariance, per-example randomness, dropout, non-finite skips."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.diffusion.edm import LogNormalSigma
from ediffi_jax.diffusion.intervals import CONFIG_LAYOUTS
from ediffi_jax.models.unet import UNet, boxed_init
from ediffi_jax.parallel.mesh import batch_sharding, logical_shardings, make_mesh
from tiny import tiny_conditioning, tiny_params, tiny_unet_config
from ediffi_jax.training.step import (TrainConfig, compute_grads, example_randomness, init_state, make_optimizer, state_shardings, train_step)

MODEL = tiny_unet_config(dropout=0.0)
UNET = UNet(MODEL)


def make_batch(n=8, offset=0):
    rng = np.random.default_rng(offset)
    return {
        "image": jnp.asarray(rng.uniform(-1, 1, (n, 16, 16, 3)), jnp.float32),
        "index": jnp.arange(offset, offset + n, dtype=jnp.int32),
        "cond": tiny_conditioning(MODEL, n),
    }


def step_fn(cfg):
    opt = make_optimizer(cfg)
    jitted = jax.jit(functools.partial(train_step, unet=UNET, cfg=cfg, optimizer=opt))
    return opt, lambda state, batch: jitted(state, batch, cfg.sigma_interval())


def test_sharded_step_equals_single_device():
    cfg = TrainConfig(batch_size=8, lr=1e-3, warmup_steps=2)
    opt, step = step_fn(cfg)
    params = jax.tree.map(jnp.array, tiny_params(MODEL))  # own copy: the sharded step donates
    state = init_state(params, opt)
    batches = [make_batch(offset=8 * i) for i in range(2)]
    single = state
    for b in batches:
        single, m_single = step(single, b)

    mesh = make_mesh((2, 2, 2))
    abstract = jax.eval_shape(lambda: boxed_init(MODEL, jax.random.key(0)))
    psh = logical_shardings(abstract, mesh)
    ssh = state_shardings(opt, jax.eval_shape(lambda: params), jax.tree.map(lambda s: s, psh), mesh)
    sharded_step = jax.jit(functools.partial(train_step, unet=UNET, cfg=cfg, optimizer=opt),
                           in_shardings=(ssh, None, None), out_shardings=(ssh, None),
                           donate_argnums=0)
    st = jax.device_put(init_state(params, opt), ssh)
    for b in batches:
        b = jax.tree.map(lambda a: jax.device_put(a, batch_sharding(mesh, a.ndim)), b)
        st, m_sharded = sharded_step(st, b, cfg.sigma_interval())
    assert not st.params["down0_res0"]["conv1"]["kernel"].sharding.is_fully_replicated
    np.testing.assert_allclose(m_sharded["loss"], m_single["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                 st.params, single.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
                 st.ema_params, single.ema_params)
    assert int(st.step) == 2


def test_gradient_accumulation_equals_one_big_batch():
    params = tiny_params(MODEL)
    batch = make_batch()
    out = {}
    for accum in (1, 4):
        cfg = TrainConfig(batch_size=8, grad_accum=accum)
        fn = jax.jit(functools.partial(compute_grads, unet=UNET, cfg=cfg))
        out[accum] = fn(params, batch, jax.random.key(0), cfg.sigma_interval())
    np.testing.assert_allclose(out[4][0], out[1][0], rtol=1e-6)  # loss
    np.testing.assert_allclose(out[4][1], out[1][1], rtol=1e-5)  # per-example losses
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4),
                 out[4][3], out[1][3])


def test_example_randomness_depends_only_on_the_index():
    cfg = TrainConfig()
    a = example_randomness(cfg, 17, (4, 4, 3), cfg.sigma_interval())
    b = jax.vmap(lambda i: example_randomness(cfg, i, (4, 4, 3), cfg.sigma_interval()))(jnp.arange(10, 20))
    np.testing.assert_array_equal(a[1], b[1][7])
    assert float(a[0]) == float(b[0][7])


def test_dropout_rates_match_targets():
    cfg = TrainConfig(drop_t5=0.25, drop_clip_text=0.2, drop_clip_image=0.9)
    n = 20000
    _, _, keep = jax.vmap(lambda i: example_randomness(cfg, i, (1,), cfg.sigma_interval()))(jnp.arange(n))
    dropped = 1 - np.asarray(keep, np.float64).mean(axis=0)
    se = np.sqrt(np.array([0.25 * 0.75, 0.2 * 0.8, 0.9 * 0.1]) / n)
    np.testing.assert_array_less(np.abs(dropped - [0.25, 0.2, 0.9]), 4 * se)
    # Independent: P(both T5 and CLIP text dropped) = 0.25 * 0.2.
    k = np.asarray(keep)
    both = np.mean(~k[:, 0] & ~k[:, 1])
    assert abs(both - 0.05) < 4 * np.sqrt(0.05 * 0.95 / n)


def test_sigma_samples_stay_in_the_expert_interval():
    expert = CONFIG_LAYOUTS["D"][0]  # E^3_0
    cfg = TrainConfig(sigma_quantiles=(str(expert.q_lo), str(expert.q_hi)))
    sigma, _, _ = jax.vmap(lambda i: example_randomness(cfg, i, (1,), cfg.sigma_interval()))(jnp.arange(5000))
    hi = expert.sigma_bounds()[1]
    assert float(sigma.max()) <= hi * (1 + 1e-5) and float(sigma.min()) > 0
    q = LogNormalSigma().quantile_of_sigma(sigma)
    # Uniform over the interval's mass.
    assert abs(float(jnp.mean(q)) - 1 / 16) < 0.005


def test_soft_intervals_draw_a_fraction_p_from_the_whole_range():
    """p of the sigmas from the whole log-normal, the rest from the interval; the in-interval
    draws and the noise are the hard interval's own, so p = 0 is exactly today's run."""
    n, lo, hi = 20000, "1/4", "1/2"
    hard = TrainConfig(sigma_quantiles=(lo, hi))
    soft = TrainConfig(sigma_quantiles=(lo, hi), soft_interval_p=0.25)
    draw = lambda cfg: jax.vmap(lambda i: example_randomness(  # noqa: E731
        cfg, i, (2,), cfg.sigma_interval()))(jnp.arange(n))
    s_hard, noise_hard, _ = draw(hard)
    s_soft, noise_soft, _ = draw(soft)
    np.testing.assert_array_equal(noise_hard, noise_soft)
    q = np.asarray(LogNormalSigma().quantile_of_sigma(s_soft))
    inside = (q >= 0.25 - 1e-4) & (q <= 0.5 + 1e-4)
    # Outside the interval: only whole-range draws, 0.75 of them (their mass outside it).
    assert abs(np.mean(~inside) - 0.25 * 0.75) < 4 * np.sqrt(0.1875 * 0.8125 / n)
    kept = np.asarray(s_hard) == np.asarray(s_soft)
    assert abs(np.mean(kept) - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)
    # The whole-range draws are the log-normal: uniform in mass.
    moved = ~kept
    assert abs(np.mean(q[moved]) - 0.5) < 0.02 and abs(np.mean(q[moved] < 0.25) - 0.25) < 0.02
    with pytest.raises(ValueError, match="soft_interval_p"):
        TrainConfig(soft_interval_p=1.5)


def test_sibling_experts_compile_to_one_program():
    """Only the interval differs between the experts of a tree: it is an argument, so their
    train steps lower to the same program and a persistent compilation cache serves all."""
    params = tiny_params(MODEL)
    texts = []
    for expert in CONFIG_LAYOUTS["D"]:
        cfg = TrainConfig(batch_size=8, sigma_quantiles=(str(expert.q_lo), str(expert.q_hi)))
        opt = make_optimizer(cfg)
        step = jax.jit(functools.partial(train_step, unet=UNET, cfg=cfg, optimizer=opt))
        texts.append(step.lower(init_state(params, opt), make_batch(),
                                cfg.sigma_interval()).as_text())
    assert texts[0] == texts[1] == texts[2]


def test_non_finite_steps_are_skipped_and_counted():
    cfg = TrainConfig(batch_size=8, lr=1e-3)
    opt, step = step_fn(cfg)
    state = init_state(tiny_params(MODEL), opt)
    bad = make_batch()
    bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)
    new, m = step(state, bad)
    assert not bool(m["finite"]) and int(new.nonfinite_run) == 1 and int(new.step) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 new.params, state.params)
    new, m = step(new, make_batch())
    assert bool(m["finite"]) and int(new.nonfinite_run) == 0 and int(new.nonfinite_total) == 1


def test_train_config_validation():
    with pytest.raises(ValueError, match="grad_accum 3 must divide batch_size 8"):
        TrainConfig(batch_size=8, grad_accum=3)
    with pytest.raises(ValueError, match="drop_t5"):
        TrainConfig(drop_t5=1.5)
    with pytest.raises(ValueError, match="sigma_quantiles"):
        TrainConfig(sigma_quantiles=("1/2", "1/4"))


def test_learning_rate_schedules():
    from ediffi_jax.training.step import learning_rate

    const = learning_rate(TrainConfig(lr=1e-3, warmup_steps=10, steps=100))
    assert float(const(5)) == pytest.approx(5e-4) and float(const(99)) == pytest.approx(1e-3)
    cos = learning_rate(TrainConfig(lr=1e-3, warmup_steps=10, steps=100, lr_decay="cosine"))
    assert float(cos(5)) == pytest.approx(5e-4) and float(cos(10)) == pytest.approx(1e-3)
    assert float(cos(55)) == pytest.approx(5e-4, rel=1e-5)  # half-way through the decay
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="linear")


def test_ema_warmup_applies_from_scratch_but_not_to_a_branched_child():
    from ediffi_jax.training.step import ema_decay

    step0 = jnp.zeros((), jnp.int32)
    assert float(ema_decay(TrainConfig(ema_decay=0.999), step0)) == pytest.approx(0.1)
    child = TrainConfig(ema_decay=0.999, init_from="runs/parent")
    assert float(ema_decay(child, step0)) == pytest.approx(0.999)
    half_life = TrainConfig(batch_size=10, ema_half_life_images=100.0, ema_warmup=False)
    assert float(ema_decay(half_life, step0)) == pytest.approx(0.5 ** 0.1)
