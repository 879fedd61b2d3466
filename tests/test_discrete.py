"""The discrete-time bridge against diffusers (fixture: tools/scheduler_fixtures.py): the train
schedule, the inference sigmas and timesteps, sigma_to_t, and whole sampling loops of
EulerDiscreteScheduler and DPMSolverMultistepScheduler reproduced by the project's samplers
(PlanRunner on a plan of diffusers' own sigmas) with vp_denoise around an analytic model."""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.diffusion.discrete import DiscreteSchedule, vp_denoise, vp_denoiser
from ediffi_jax.diffusion.edm import expand_to
from ediffi_jax.diffusion.plan import build_plan
from ediffi_jax.diffusion.sampling import PlanRunner, example_keys

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "schedulers.npz")
REF = np.load(FIXTURE)
CONFIGS = json.loads(str(REF["configs"]))
NAMES = sorted(CONFIGS)
SOLVERS = {"euler": "euler", "dpmsolver": "dpmpp_2m"}  # diffusers' scheduler -> our sampler


def schedule(name):
    return DiscreteSchedule.from_scheduler_config(CONFIGS[name])


def model(x, t, out_channels=None):
    """tools/scheduler_fixtures.py's analytic network, channels last."""
    t = jnp.reshape(t, t.shape + (1,) * (x.ndim - 1))
    f = jnp.tanh(0.3 * x) * jnp.cos(t / 500.0) + 0.1 * t / 1000.0
    if out_channels == 2 * x.shape[-1]:
        f = jnp.concatenate([f, 0.5 * x], axis=-1)
    return f


@pytest.mark.parametrize("name", NAMES)
def test_alphas_cumprod(name):
    # float32 in diffusers' order of operations: bit-exact, except that torch's sqrt (in
    # rescale_zero_terminal_snr) is not correctly rounded on every CPU.
    rtol = 1e-5 if CONFIGS[name].get("rescale_betas_zero_snr") else 1e-6
    np.testing.assert_allclose(schedule(name).alphas_cumprod(), REF[f"{name}/alphas_cumprod"],
                               rtol=rtol, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_sigma_to_t(name):
    t = np.asarray(jax.jit(schedule(name).sigma_to_t)(REF["probe_sigmas"]))
    np.testing.assert_allclose(t, REF[f"{name}/sigma_to_t"], rtol=0, atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("solver", ["euler", "dpmsolver"])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("n", [10, 25])
def test_discrete_sigmas_and_timesteps(name, solver, karras, n):
    s = schedule(name)
    key = f"{name}/{solver}{'_karras' if karras else ''}/{n}"
    sigmas = s.discrete_sigmas(n, solver, karras)
    np.testing.assert_allclose(sigmas, REF[key + "/sigmas"], rtol=1e-6, atol=0)
    ref_t = REF[key + "/timesteps"]
    if not karras:  # the spaced train timesteps themselves
        np.testing.assert_array_equal(s.discrete_timesteps(n, solver), ref_t)
    elif solver == "euler":  # Euler feeds the model sigma_to_t of its Karras sigmas
        np.testing.assert_allclose(s.sigma_to_t(sigmas[:-1]), ref_t, rtol=0, atol=2e-4)
    elif s.beta_schedule != "squaredcos_cap_v2":  # DPM-Solver rounds them
        np.testing.assert_array_equal(s.sigma_to_t(sigmas[:-1], round_t=True), ref_t)
    ref_init = float(REF[key + "/init_noise_sigma"])
    if solver == "euler":
        assert s.init_noise_sigma(sigmas, solver) == pytest.approx(ref_init, rel=1e-6)
    else:  # diffusers' DPM starts its VP sample at unit noise: sqrt(sigma_max^2 + 1) here
        assert ref_init == 1.0
        assert s.init_noise_sigma(sigmas, solver) == pytest.approx(
            np.sqrt(sigmas[0] ** 2 + 1.0), rel=1e-6)


# (fixture name, config, diffusers scheduler, karras, steps), as tools/scheduler_fixtures.py ran them
TRAJECTORIES = [tuple(t) for t in json.loads(str(REF["trajectories"]))]


@pytest.mark.parametrize("traj", TRAJECTORIES, ids=[t[0] for t in TRAJECTORIES])
def test_sampling_matches_diffusers(traj):
    name, cfg, solver, karras, n = traj
    s = schedule(cfg)
    sigmas = s.discrete_sigmas(n, solver, karras)
    noise = REF["noise"]
    out_channels = 2 * noise.shape[-1] if CONFIGS[cfg].get("variance_type") else None
    # diffusers' DPM-Solver feeds rounded timesteps with Karras sigmas
    round_t = solver == "dpmsolver" and karras
    network = lambda x_in, t: model(x_in, t, out_channels)  # noqa: E731

    def denoise_fn(params, x, sigma, cond, settings):
        return vp_denoise(network, x, sigma, s, round_t=round_t)

    plan = build_plan(sigmas, sampler=SOLVERS[solver], guidance_scale=1.0)
    keys = example_keys(jax.random.PRNGKey(0), np.arange(noise.shape[0]))
    x = jnp.asarray(noise) * s.init_noise_sigma(sigmas, solver)
    final = PlanRunner(denoise_fn).run(plan, [{}], None, keys, x)
    ref = REF[f"final/{name}"]
    assert np.abs(ref).max() > 0.05  # a loop that did something
    np.testing.assert_allclose(np.asarray(final), ref, rtol=0, atol=1e-4)


def test_vp_denoise_predictions():
    """x0 from epsilon, v and sample predictions at one sigma, against the VP algebra:
    x = (alpha x0 + s_t n) / alpha with alpha = 1/sqrt(1+sigma^2), s_t = sigma alpha,
    eps = n, v = alpha n - s_t x0."""
    rng = np.random.default_rng(1)
    x0, n = rng.standard_normal((2, 2, 3, 3, 4)).astype(np.float32)
    sigma = np.array([0.7, 3.0], np.float32)
    sig = sigma[:, None, None, None]
    alpha = 1 / np.sqrt(1 + sig**2)
    x = x0 + sig * n
    preds = {"epsilon": n, "v_prediction": alpha * n - sig * alpha * x0, "sample": x0}
    for kind, pred in preds.items():
        s = DiscreteSchedule(prediction_type=kind)
        seen = {}

        def network(x_in, t, pred=pred, seen=seen):
            seen["x_in"], seen["t"] = x_in, t
            return jnp.asarray(pred)

        d = vp_denoiser(network, s)(jnp.asarray(x), jnp.asarray(sigma))
        np.testing.assert_allclose(np.asarray(d), x0, rtol=0, atol=2e-5)
        np.testing.assert_allclose(np.asarray(seen["x_in"]), alpha * x, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(seen["t"]), np.asarray(s.sigma_to_t(sigma)))
    # IF-style learned variance: the second half of the channels is dropped
    s = DiscreteSchedule()
    d = vp_denoise(lambda x_in, t: jnp.concatenate([jnp.asarray(n), 9 + 0 * x_in], -1),
                   jnp.asarray(x), jnp.asarray(sigma), s)
    np.testing.assert_allclose(np.asarray(d), x0, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="channels"):
        vp_denoise(lambda x_in, t: x_in[..., :3], jnp.asarray(x), jnp.asarray(sigma), s)


def test_config_errors_name_the_field():
    base = dict(CONFIGS["if_nothreshold"])
    with pytest.raises(ValueError, match="'use_flow_sigmas'"):
        DiscreteSchedule.from_scheduler_config({**base, "use_flow_sigmas": True})
    with pytest.raises(ValueError, match="'frobnicate'"):
        DiscreteSchedule.from_scheduler_config({**base, "frobnicate": 1})
    with pytest.raises(ValueError, match="timestep_spacing"):
        DiscreteSchedule.from_scheduler_config({**base, "timestep_spacing": "uniform"})
    with pytest.raises(ValueError, match="prediction_type"):
        DiscreteSchedule.from_scheduler_config({**base, "prediction_type": "flow_prediction"})
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteSchedule.from_scheduler_config({**base, "beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="'final_sigmas_type'"):
        DiscreteSchedule.from_scheduler_config({**base, "final_sigmas_type": "sigma_min"})
    with pytest.raises(ValueError, match="solver"):
        DiscreteSchedule().discrete_sigmas(10, solver="ddim")
    with pytest.raises(ValueError, match="'lambda_min_clipped'"):
        DiscreteSchedule.from_scheduler_config({**base, "lambda_min_clipped": -5.1})
    assert DiscreteSchedule.from_scheduler_config(
        {**base, "lambda_min_clipped": float("-inf")}) == schedule("if_nothreshold")


def test_dynamic_thresholding_clips_the_guided_x0_per_example():
    """IF's thresholding (diffusers' _threshold_sample), against numpy: the 0.95 quantile of
    |x0| per example, clamped to [1, 1.5], clips and rescales that example only. PlanRunner
    applies it to the guided x0, as diffusers does: not to each CFG branch."""
    from ediffi_jax.diffusion.discrete import dynamic_threshold, guided_transform

    rng = np.random.default_rng(0)
    scales = np.array([0.3, 1.3, 4.0])[:, None, None, None]
    x0 = (rng.normal(size=(3, 4, 5, 3)) * scales).astype(np.float32)
    got = np.asarray(dynamic_threshold(jnp.asarray(x0), 0.95, 1.5))
    for i in range(3):
        q = np.clip(np.quantile(np.abs(x0[i]), 0.95), 1.0, 1.5)
        np.testing.assert_allclose(got[i], np.clip(x0[i], -q, q) / q, rtol=1e-6)
    np.testing.assert_allclose(got[0], x0[0], rtol=1e-6)  # below 1: untouched
    assert guided_transform(schedule("if_nothreshold")) is None
    s = DiscreteSchedule.from_scheduler_config({**CONFIGS["if_nothreshold"], "thresholding": True,
                                                "dynamic_thresholding_ratio": 0.95,
                                                "sample_max_value": 1.5})
    np.testing.assert_allclose(np.asarray(guided_transform(s)(jnp.asarray(x0))), got, rtol=1e-6)
    # PlanRunner thresholds the guided x0: one Euler step to sigma 0 lands on T(D_u + w (D_c
    # - D_u)), which differs from guiding the thresholded branches.
    cond = _Branch(jnp.ones((3,)))
    network = lambda params, x, sigma, c, settings: (  # noqa: E731 (branches stacked)
        jnp.concatenate([jnp.asarray(x0)] * (x.shape[0] // 3)) * expand_to(c.scale, x))
    plan = build_plan(np.array([1.0, 0.0]), sampler="euler", guidance_scale=3.0)
    keys = example_keys(jax.random.PRNGKey(0), np.arange(3))
    final = PlanRunner(network, guided_transform=guided_transform(s)).run(
        plan, [{}], cond, keys, jnp.zeros_like(x0))
    want = dynamic_threshold(jnp.asarray(0.5 * x0 + 3.0 * (x0 - 0.5 * x0)), 0.95, 1.5)
    np.testing.assert_allclose(np.asarray(final), np.asarray(want), rtol=1e-5, atol=1e-6)
    half = dynamic_threshold(jnp.asarray(0.5 * x0), 0.95, 1.5)
    per_branch = half + 3.0 * (got - half)
    assert np.abs(np.asarray(per_branch) - np.asarray(want)).max() > 0.1


@flax.struct.dataclass
class _Branch:
    """A conditioning whose denoiser output is scale * x0: 1 conditional, 0.5 unconditional."""
    scale: jax.Array

    def unconditional(self):
        return _Branch(self.scale * 0.5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_training_pair_is_what_vp_denoise_inverts(prediction):
    """A network that returns exactly its training target denoises x_t back to x0: the
    training pair and the sampling bridge are one parameterisation (x = x_t / sqrt(a_t) at
    sigma(t))."""
    from ediffi_jax.diffusion.discrete import vp_training_pair

    s = DiscreteSchedule.from_scheduler_config({**CONFIGS["if_nothreshold"],
                                                "prediction_type": prediction})
    rng = np.random.default_rng(3)
    x0, noise = (jnp.asarray(rng.normal(size=(4, 3, 2, 2)), jnp.float32) for _ in range(2))
    t = jnp.asarray([0, 250, 600, 999])
    x_t, target = vp_training_pair(s, x0, noise, t)
    a = s.alphas_cumprod()[np.asarray(t)][:, None, None, None]
    np.testing.assert_allclose(np.asarray(x_t), np.sqrt(a) * x0 + np.sqrt(1 - a) * noise,
                               rtol=1e-6)
    sigma = np.sqrt((1 - a) / a).reshape(-1)
    network = lambda x_in, t_in: target  # noqa: E731
    np.testing.assert_allclose(np.asarray(t), s.sigma_to_t(jnp.asarray(sigma)), atol=2e-3)
    d = np.asarray(vp_denoise(network, x_t / np.sqrt(a), jnp.asarray(sigma, jnp.float32), s))
    # float32: x = x0 + sigma n holds x0 to about 1e-7 sigma, per example
    err = np.abs(d - np.asarray(x0)).reshape(4, -1).max(axis=1)
    assert (err <= 1e-5 + 2e-7 * sigma).all(), (err, sigma)
