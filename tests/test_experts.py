"""Expert intervals, the segment plan and routing of each denoiser evaluation to its expert."""
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from ediffi_jax.diffusion import intervals as iv
from ediffi_jax.diffusion.plan import build_plan
from ediffi_jax.diffusion.sampling import PlanRunner
from ediffi_jax.diffusion.schedules import karras_sigmas
from ediffi_jax.models.experts import ExpertEnsemble
from ediffi_jax.models.unet import UNet, abstract_params
from ediffi_jax.pipeline.denoise import unet_denoise_fn
from tiny import tiny_conditioning, tiny_params, tiny_unet_config


def sigma_from_quantile(q):  # independent of the library: scipy's log-normal
    return math.exp(-1.2 + 1.2 * norm.ppf(q)) if 0 < q < 1 else (0.0 if q <= 0 else math.inf)


def test_config_d_layout_boundaries():
    layout = iv.CONFIG_LAYOUTS["D"]
    assert [x.name for x in layout] == ["E^3_0", "M_C", "E^9_511"]
    assert layout[0].q_hi == Fraction(1, 8) and layout[2].q_lo == Fraction(511, 512)
    assert layout[0].sigma_bounds()[1] == pytest.approx(0.0757, abs=5e-4)
    assert layout[2].sigma_bounds()[0] == pytest.approx(9.61, abs=0.01)
    assert layout[1].sigma_bounds() == pytest.approx((layout[0].sigma_bounds()[1], layout[2].sigma_bounds()[0]))


def test_quantile_sigma_round_trip():
    dist = iv.ExpertInterval(0, 1).sigma_bounds  # noqa: F841 (import check)
    from ediffi_jax.diffusion.edm import LogNormalSigma

    d = LogNormalSigma()
    q = jnp.array([0.01, 0.125, 0.5, 0.9, 511 / 512])
    sig = d.sigma_at_quantile(q)
    np.testing.assert_allclose(sig, [sigma_from_quantile(float(x)) for x in q], rtol=1e-5)
    np.testing.assert_allclose(d.quantile_of_sigma(sig), q, rtol=1e-5)


def test_binary_tree_is_equal_mass():
    level = 3
    nodes = [iv.tree_node(level, i) for i in range(2**level)]
    iv.validate_layout(nodes)
    assert {n.q_hi - n.q_lo for n in nodes} == {Fraction(1, 8)}
    low, high = iv.split(iv.tree_node(1, 1))
    assert (low.q_lo, low.q_hi, high.q_hi) == (Fraction(1, 2), Fraction(3, 4), Fraction(1))
    with pytest.raises(ValueError, match="does not exist"):
        iv.tree_node(2, 4)


def test_truncated_sigma_samples_stay_in_interval():
    from ediffi_jax.diffusion.edm import LogNormalSigma

    e = iv.CONFIG_LAYOUTS["D"][2]
    lo, hi = e.sigma_bounds()
    s = LogNormalSigma().sample(jax.random.key(0), (20000,), float(e.q_lo), float(e.q_hi))
    assert float(s.min()) >= lo * (1 - 1e-5) and float(s.max()) <= 80 * 1e3
    # Within the interval the distribution is the truncated log-normal: its median is at q=1023/1024.
    assert float(jnp.median(s)) == pytest.approx(sigma_from_quantile(1023 / 1024), rel=0.03)


@pytest.mark.parametrize(
    "layout,message",
    [
        ([("0", "1/4"), ("1/2", "1")], "gap"),
        ([("0", "1/2"), ("1/4", "1")], "overlap"),
        ([("1/8", "1")], "gap"),
        ([("0", "1/2")], "gap"),
    ],
)
def test_bad_layouts_are_rejected(layout, message):
    with pytest.raises(ValueError, match=message):
        iv.resolve_layout(layout)


# ---- routing --------------------------------------------------------------------------------

def tagged_denoise(params, x, sigma, cond=None, settings=None):
    """D = x - sigma * tag, so every evaluation contributes d = (x - D)/sigma = tag exactly."""
    return x - sigma[:, None] * params["tag"]


def expected_final(plan, layout, tags):
    """x_0 - x_T = sum over steps of (sigma_next - sigma_hat) * (mean of the evaluating experts'
    tags), with owners computed independently from scipy's log-normal quantiles."""
    bounds = [(sigma_from_quantile(float(e.q_lo)), sigma_from_quantile(float(e.q_hi))) for e in layout]
    own = lambda s: next(i for i, (lo, hi) in enumerate(bounds) if lo < s <= hi)  # noqa: E731
    total = 0.0
    for i in range(plan.num_steps):
        s, s_next = plan.sigmas[i], plan.sigmas[i + 1]
        evals = [s] + ([s_next] if s_next > 0 else [])
        total += (s_next - s) * np.mean([tags[own(e)] for e in evals])
    return total


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_each_evaluation_uses_the_expert_owning_its_sigma(sampler):
    layout = iv.CONFIG_LAYOUTS["D"]
    tags = [1.0, 10.0, 100.0]
    plan = build_plan(karras_sigmas(40), layout, sampler=sampler)
    assert len({s.experts for s in plan.segments}) >= 3
    runner = PlanRunner(tagged_denoise)
    x = jnp.zeros((2, 1))
    out = runner.run(plan, [{"tag": jnp.float32(t)} for t in tags], None, None, x)
    want = expected_final(plan, layout, tags) if sampler == "heun" else sum(
        (plan.sigmas[i + 1] - plan.sigmas[i]) * tags[iv.owner(layout, plan.sigmas[i])]
        for i in range(plan.num_steps))
    np.testing.assert_allclose(np.asarray(out)[:, 0], want, rtol=1e-5)
    assert runner.trace_count == 1  # every segment shares one compiled loop


def test_plan_segments_follow_expert_boundaries():
    layout = iv.CONFIG_LAYOUTS["D"]
    plan = build_plan(karras_sigmas(32), layout, sampler="heun", guidance_scale=[2.0, 3.0, 4.0])
    covered = [i for s in plan.segments for i in range(s.start, s.stop)]
    assert covered == list(range(32))
    lo, hi = layout[0].sigma_bounds()[1], layout[2].sigma_bounds()[0]
    for s in plan.segments:
        for i in range(s.start, s.stop):
            assert s.experts[0] == iv.owner(layout, plan.sigmas[i])
        # A per-expert guidance scale follows the expert of the step's first evaluation.
        assert s.guidance_scale == [2.0, 3.0, 4.0][s.experts[0]]
    # Transition steps (two experts in one Heun step) are one step long.
    for s in plan.segments:
        if s.experts[0] != s.experts[1]:
            assert s.num_steps == 1 and plan.sigmas[s.start] > (lo if s.experts[1] == 0 else hi) >= plan.sigmas[s.stop]
    assert len(plan.distinct_settings()) == 1


def test_identical_experts_are_bit_identical_to_one_model():
    cfg = tiny_unet_config()
    params = tiny_params(cfg)
    runner = PlanRunner(unet_denoise_fn(UNet(cfg)))
    cond = tiny_conditioning(cfg, 2)
    kw = dict(seed=1, example_indices=[0, 1], cond=cond)
    shape = (cfg.resolution, cfg.resolution, 3)
    one = runner.sample(build_plan(karras_sigmas(12), guidance_scale=2.0), [params], shape, **kw)
    ens = ExpertEnsemble(iv.CONFIG_LAYOUTS["D"], [params] * 3)
    plan = build_plan(karras_sigmas(12), ens.intervals, guidance_scale=2.0)
    assert len(plan.segments) > 1
    three = runner.sample(plan, ens.params, shape, **kw)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(three))
    assert runner.trace_count == 1


def test_ensemble_rejects_mismatched_experts():
    p = abstract_params(tiny_unet_config())
    with pytest.raises(ValueError, match="3 expert intervals but 2"):
        ExpertEnsemble(iv.CONFIG_LAYOUTS["D"], [p, p])
    other = abstract_params(tiny_unet_config(channels=16))
    with pytest.raises(ValueError, match="different architecture"):
        ExpertEnsemble(iv.CONFIG_LAYOUTS["C"], [p, other])


def test_merge_back_averages_the_experts_into_one_whole_range_model(tmp_path):
    """train.merge: the experts' weights averaged (equally, or by noise mass) into an export
    over (0, 1) that loads as an ensemble of one; one expert alone is refused."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    from ediffi_jax.runs.store import PARAMS_FILE, load_ensemble
    from train.merge import main

    shipped = "pretrained/tiny-shapes"
    base = {k: v.astype(np.float32) for k, v in load_file(f"{shipped}/{PARAMS_FILE}").items()}
    for name, q, shift in (("low", ["0", "1/4"], 0.0), ("high", ["1/4", "1"], 1.0)):
        shutil.copytree(shipped, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["train"]["sigma_quantiles"] = q
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        save_file({k: v + shift for k, v in base.items()}, str(tmp_path / name / PARAMS_FILE))
    (tmp_path / "ensemble.json").write_text(json.dumps({"experts": ["low", "high"]}))
    for flag, shift in (([], 0.5), (["--by-mass"], 0.75)):
        out = tmp_path / f"merged{shift}"
        assert main([str(tmp_path / "ensemble.json"), "--out", str(out)] + flag) == 0
        merged = load_file(str(out / PARAMS_FILE))
        assert set(merged) == set(base)
        for k, v in base.items():
            np.testing.assert_allclose(merged[k], v + shift, atol=1e-6)
        run, ensemble = load_ensemble(str(out))
        assert len(ensemble) == 1 and run.train.sigma_quantiles == ("0", "1")
    assert main([str(tmp_path / "low"), "--out", str(tmp_path / "one")]) == 2
