"""The expert-scaling study's bookkeeping: equal samples seen, launch order, probe, table."""
import numpy as np
import pytest

from benchmarks.expert_study import (loss_table, needed, ridge_classifier, samples_seen,
                                     study_plan, summarise)


def test_every_ensemble_has_seen_the_same_samples():
    launches, experts = study_plan("r", steps=1000, shared=500, level1=100)
    assert {layout: samples_seen(launches, experts, layout, batch=32)
            for layout in experts} == {"1": 32000, "2": 32000, "3": 32000, "1r": 32000}
    assert experts["3"] == ["r/E2_0", "r/MC", "r/E2_3"]


def test_children_branch_from_the_step_the_recipe_says():
    launches, _ = study_plan("r", steps=1000, shared=500, level1=100)
    reached, branched_at = {}, {}
    for run in launches:
        if run.parent:
            assert run.parent in reached, "a parent is trained before its child"
            branched_at.setdefault(run.workdir, (run.parent, reached[run.parent]))
        assert run.steps > reached.get(run.workdir, 0), "a resumed run goes forward"
        reached[run.workdir] = run.steps
    assert branched_at == {"r/E1_0": ("r/base", 500), "r/E1_1": ("r/base", 500),
                           "r/E2_0": ("r/E1_0", 100), "r/E2_3": ("r/E1_1", 100),
                           "r/MC": ("r/base", 500), "r/R": ("r/base", 500)}
    assert reached == {"r/base": 1000, "r/E1_0": 250, "r/E1_1": 250, "r/E2_0": 100,
                       "r/E2_3": 100, "r/MC": 100, "r/R": 500}


def test_a_layout_needs_its_experts_and_their_ancestors_only():
    launches, experts = study_plan("r", steps=1000, shared=500, level1=100)
    assert needed(launches, experts, ["1r"]) == {"r/R", "r/base"}
    assert needed(launches, experts, ["3"]) == {"r/E2_0", "r/E1_0", "r/MC", "r/E2_3", "r/E1_1",
                                                "r/base"}


@pytest.mark.parametrize("steps, shared, level1, match", [
    (1000, 1000, 0, "strictly between"), (1000, 505, 99, "divide by 10"),
    (1000, 500, 50, "level1 must be"),
])
def test_plan_rejects_unequal_compute(steps, shared, level1, match):
    with pytest.raises(ValueError, match=match):
        study_plan("r", steps, shared, level1)


def test_ridge_classifier_separates_clusters_and_follows_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    labels = rng.integers(0, 3, 300)
    features = centres[labels] + rng.normal(size=(300, 8))
    predict = ridge_classifier(features, labels, 3, lam=1e-3)
    test_labels = rng.integers(0, 3, 100)
    test = centres[test_labels] + rng.normal(size=(100, 8))
    assert np.mean(predict(test) == test_labels) > 0.95
    permuted = ridge_classifier(features, (labels + 1) % 3, 3, lam=1e-3)
    assert np.mean(permuted(test) == (test_labels + 1) % 3) > 0.95


def test_summary_is_mean_and_sample_std_over_seeds():
    points = [{"experts": 2, "guidance_scale": 1.0, "seed": s, "fid": f, "accuracy": a}
              for s, f, a in ((0, 10.0, 0.5), (1, 12.0, 0.7), (2, 14.0, 0.6))]
    got = summarise(points + [{"experts": 1, "guidance_scale": 1.0, "seed": 0, "fid": 9.0,
                               "accuracy": 0.1}])
    assert got[("2", 1.0)]["fid"] == pytest.approx((12.0, 2.0, 3))
    assert got[("2", 1.0)]["accuracy"] == pytest.approx((0.6, 0.1, 3))
    assert got[("1", 1.0)]["fid"] == (9.0, 0.0, 1)


def test_loss_table_is_relative_to_the_one_model_per_seed():
    rows = [{"layout": layout, "experts": 2, "seed": seed, "bin": 0, "sigma": 0.05, "loss": loss}
            for layout, seed, loss in (("1", 0, 0.10), ("1", 1, 0.20), ("2", 0, 0.11),
                                       ("2", 1, 0.16))]
    table = loss_table(rows).splitlines()
    # 1 model: mean 0.15; 2 experts: +10% and -20% per seed -> mean -5%, sample std 21.2.
    assert table[2] == "| 0.05 | 0.1500 | -5.0% ± 21.2 |"
