"""ScaleCrafter: re-dilation (integer, fractional, progressive) against numpy references, the
dispersed-kernel solver's properties, noise-damped CFG, plans as segments, plan validation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.diffusion.sampling import PlanRunner
from ediffi_jax.highres.disperse import DISPERSED, dispersion_matrix, structure_equations
from ediffi_jax.highres.plans import HighResConfig, HighResPlan, conv_setting_for_factor, preset
from ediffi_jax.models.layers import ConvSetting, conv2d, redilated_conv
from ediffi_jax.models.unet import UNet, abstract_params, conv3x3_levels, conv_layer_paths
from ediffi_jax.pipeline.denoise import unet_denoise_fn
from tests.tiny import tiny_conditioning, tiny_params, tiny_unet_config


def np_resize_bilinear(x, h, w):
    """torch F.interpolate(bilinear, align_corners=False), NHWC, in numpy."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(x.shape[1], h)
    x0, x1, wx = axis(x.shape[2], w)
    rows = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]


def np_conv_same(x, k, d):
    """Stride-1 'same' zero-padded dilated correlation, NHWC x HWIO, in numpy."""
    kh = k.shape[0]
    r = d * (kh // 2)
    pad = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    out = np.zeros(x.shape[:3] + (k.shape[-1],))
    for i in range(kh):
        for j in range(kh):
            patch = pad[:, i * d: i * d + x.shape[1], j * d: j * d + x.shape[2]]
            out += patch @ k[i, j]
    return out


def test_integer_factor_is_plain_dilation():
    assert conv_setting_for_factor(2.0) == ConvSetting(dilation=2)
    assert conv_setting_for_factor(3) == ConvSetting(dilation=3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 3)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    np.testing.assert_array_equal(redilated_conv(x, k, 1, conv_setting_for_factor(2.0)),
                                  conv2d(x, k, dilation=2))


@pytest.mark.parametrize("pf", [2.5, 1.5, 3.2])
def test_fractional_redilation_matches_numpy(pf):
    setting = conv_setting_for_factor(pf)
    d = math.ceil(pf)
    assert setting.dilation == d and setting.scale == pytest.approx(d / pf)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 10, 14, 3)).astype(np.float32)
    k = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
    h, w = round(10 * d / pf), round(14 * d / pf)
    want = np_resize_bilinear(np_conv_same(np_resize_bilinear(x, h, w), k, d), 10, 14)
    got = redilated_conv(jnp.asarray(x), jnp.asarray(k), 1, setting)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_progressive_schedule_matches_the_formula():
    # 50 steps of which the first 37 have sigma >= sigma_tau: tau = 37 (the SD 2.1 2048 config).
    sigmas = np.concatenate([np.geomspace(80, 0.01, 50), [0.0]])
    plan = HighResPlan({"mid_res0/conv1": 4.0, "up1_res0/conv1": 3.0, "down1_res0/conv1": 2.0},
                       sigma_tau=float(sigmas[36]), progressive=True)
    fn = plan.layer_settings(sigmas)
    for i in range(50):
        got = dict(fn(i, sigmas[i]))
        if i >= 37:
            assert got == {}
            continue
        for path, pf in plan.dilation.items():
            want = min(pf, max(math.ceil(pf * (37 - i) / 37), 2))
            assert got[path].dilation == want, (i, path)
    # The reference's verified d=4, tau=37 schedule: 4 for steps 0-9, 3 for 10-18, 2 for 19-36.
    d4 = [dict(fn(i, 0.0)).get("mid_res0/conv1", ConvSetting()).dilation for i in range(37)]
    assert d4 == [4] * 10 + [3] * 9 + [2] * 18


def test_dispersion_matrix_properties():
    r = dispersion_matrix()
    assert r.shape == (25, 9)
    centre = np.zeros(9)
    centre[4] = 1
    np.testing.assert_allclose(r @ centre, np.eye(25)[12], atol=1e-12)  # centre tap -> centre
    assert (r @ np.ones(9)).sum() / 9 == pytest.approx(1.084, abs=5e-4)  # DC gain
    # Structure-level residual on random kernels: below the baselines of inflating the 3x3
    # kernel by dilation 2 (what re-dilation does) and by nearest-neighbour resizing.
    s, s_prime = structure_equations(3, 5, 3)
    kernels = np.random.default_rng(0).normal(size=(9, 500))
    dilated = np.zeros((25, 9))
    nearest = np.zeros((25, 9))
    src = [0, 0, 1, 2, 2]
    for a in range(5):
        for b in range(5):
            nearest[a * 5 + b, src[a] * 3 + src[b]] = 9 / 25
    for a in range(3):
        for b in range(3):
            dilated[2 * a * 5 + 2 * b, a * 3 + b] = 1
    residual = lambda m: np.linalg.norm(s @ (m @ kernels) - s_prime @ kernels)  # noqa: E731
    assert residual(r) < 0.7 * residual(dilated) and residual(r) < residual(nearest)


def test_dispersed_conv_uses_the_5x5_kernel():
    from ediffi_jax.highres.disperse import disperse_kernel

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(1, 9, 9, 2)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32)
    setting = conv_setting_for_factor(4.0, dispersed=True)
    assert setting == ConvSetting(dilation=2, kernel_map=DISPERSED)
    np.testing.assert_allclose(redilated_conv(x, k, 1, setting),
                               np_conv_same(np.asarray(x), np.asarray(disperse_kernel(k)), 2),
                               atol=1e-4)


CFG = tiny_unet_config(resolution=16, channel_mult=(1, 2, 2), attention_resolutions=(4,))


def _sample(plan_fn, ndcfg_fn=None, steps=4, res=32):
    from ediffi_jax.diffusion.plan import SamplingConfig

    sampling = SamplingConfig(sampler="euler", num_steps=steps, guidance_scale=2.0)
    sigmas = sampling.sigmas()
    plan = sampling.plan(layer_settings=plan_fn(sigmas) if plan_fn else None,
                         uncond_layer_settings=ndcfg_fn(sigmas) if ndcfg_fn else None)
    calls = []

    def counting(params, x, sigma, cond, settings):
        calls.append(x.shape[0])
        return unet_denoise_fn(UNet(CFG))(params, x, sigma, cond, settings)

    runner = PlanRunner(counting)
    cond = tiny_conditioning(CFG, 2)
    out = runner.sample(plan, [tiny_params(CFG)], (res, res, 3), seed=0, example_indices=[0, 1],
                        cond=cond)
    return np.asarray(out), plan, runner, calls


def test_ndcfg_with_equal_plans_is_plain_cfg_and_runs_three_evaluations():
    levels = conv3x3_levels(CFG)
    full = preset(levels, 2.0, sigma_tau=0.5, ndcfg=False)
    same = HighResPlan(full.dilation, full.sigma_tau, ndcfg=dict(full.dilation))
    mild = HighResPlan(full.dilation, full.sigma_tau,
                       ndcfg={p: f for p, f in full.dilation.items() if levels[p] == 2})
    plain, plan, _, calls = _sample(full.layer_settings)
    assert all(s.settings.uncond_layers is None for s in plan.segments)
    assert sorted(set(calls)) == [4]  # cond + uncond in one batched call
    equal, plan, _, calls = _sample(same.layer_settings, same.uncond_layer_settings)
    assert any(s.settings.uncond_layers for s in plan.segments)
    assert sorted(set(calls)) == [2, 4]  # + the unconditional half only: 3 evaluations
    np.testing.assert_allclose(equal, plain, atol=2e-5)
    damped, _, _, _ = _sample(mild.layer_settings, mild.uncond_layer_settings)
    assert np.abs(damped - plain).max() > 1e-3


def test_each_distinct_dilation_setting_is_one_compiled_segment():
    levels = conv3x3_levels(CFG)
    plan_obj = preset(levels, 4.0, sigma_tau=0.3, progressive=True)
    _, plan, runner, _ = _sample(plan_obj.layer_settings, steps=8)
    distinct = plan.distinct_settings()
    assert len(distinct) >= 3  # several dilation phases plus the undilated tail
    assert runner.trace_count == len(distinct)
    assert all(a.settings != b.settings for a, b in zip(plan.segments, plan.segments[1:]))


def test_conv_levels_list_every_3x3_conv():
    params = abstract_params(CFG)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = {"/".join(k.key for k in path[:-1]): leaf.shape for path, leaf in flat
              if path[-1].key == "kernel" and leaf.ndim == 4}
    assert set(conv3x3_levels(CFG)) == {p for p in conv_layer_paths(params) if shapes[p][0] == 3}


def test_presets_redilate_every_inner_level_by_the_factor():
    levels = conv3x3_levels(CFG)
    inner = {p for p, lvl in levels.items() if lvl >= 1}
    p2, p4 = preset(levels, 2.0), preset(levels, 4.0)
    assert p2.dilation == {p: 2.0 for p in inner}
    # From 4x side also the outermost decoder level by 2 and the upsampler into it by 4 (the
    # official SD 2.1 2048^2 pattern); never the encoder's outermost level.
    outer_decoder = {p for p, lvl in levels.items() if lvl == 0 and p.startswith("up")}
    assert outer_decoder == {"up1_upsample/conv"} | {
        f"up0_res{i}/conv{j}" for i in range(CFG.num_res_blocks + 1) for j in (1, 2)}
    assert p4.dilation == {**{p: 4.0 for p in inner}, **{p: 2.0 for p in outer_decoder},
                           "up1_upsample/conv": 4.0}
    assert not any(p.startswith("down0_") for p in p4.dilation)
    assert p2.disperse == () and set(p4.disperse) == set(p4.dilation)  # from 16x area on
    assert not p4.progressive and p4.ndcfg is None
    mild = preset(levels, 4.0, ndcfg=True).ndcfg  # the outermost re-dilated level at half
    assert mild == {p: (pf / 2 if levels[p] == 0 else pf) for p, pf in p4.dilation.items()}
    mild2 = preset(levels, 2.0, ndcfg=True).ndcfg
    assert {mild2[p] for p in inner if levels[p] == 1} == {1.0}
    assert {mild2[p] for p in inner if levels[p] == 2} == {2.0}
    assert preset(levels, 1.0) is None
    assert HighResConfig(method="scalecrafter").plan(levels, 4.0) == p4
    assert HighResConfig().plan(levels, 4.0) is None


def test_plan_validation_errors():
    levels = conv3x3_levels(CFG)
    with pytest.raises(ValueError, match="not a 3x3 conv of this U-Net; did you mean"):
        HighResPlan({"mid_res0/conv3": 2}).validate(levels)
    with pytest.raises(ValueError, match="outermost encoder level"):
        HighResPlan({"down0_res0/conv1": 2}).validate(levels)
    with pytest.raises(ValueError, match="outermost encoder level"):
        HighResPlan({"down0_downsample/conv": 2}).validate(levels)
    with pytest.raises(ValueError, match="outermost encoder level"):
        HighResPlan({"conv_in": 2}).validate(levels)
    HighResPlan({"up0_res0/conv1": 2, "up1_upsample/conv": 4}).validate(levels)  # decoder: allowed
    with pytest.raises(ValueError, match="not a 3x3 conv"):
        HighResPlan({"down1_res0/skip": 2}).validate(levels)
    with pytest.raises(ValueError, match="factors are >= 1"):
        HighResPlan({"mid_res0/conv1": 0.5})
    with pytest.raises(ValueError, match="without a dilation factor"):
        HighResPlan({"mid_res0/conv1": 2}, disperse=("mid_res1/conv1",))
    with pytest.raises(ValueError, match="needs >= 2"):
        HighResPlan({"mid_res0/conv1": 1.5}, disperse=("mid_res0/conv1",))
    with pytest.raises(ValueError, match="highres.method must be one of"):
        HighResConfig(method="fouriscale")
    with pytest.raises(ValueError, match="ndcfg names 'down0_res0/conv1'"):
        HighResConfig(method="scalecrafter", dilation={"mid_res0/conv1": 2},
                      ndcfg_dilation={"down0_res0/conv1": 2}).plan(levels, 2.0)
