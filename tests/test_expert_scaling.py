"""The expert-scaling study in the paper's regime (benchmarks/expert_scaling.py): every arm's
compute is what its protocol says, every checkpoint it reads is one its runs save, every arm has
a compute-matched one model, and the plateau bar is read off the curve."""
import numpy as np
import pytest

from benchmarks.expert_scaling import (curve_table, loss_by_count, loss_table, matched_baseline,
                                       study_plan)


def test_every_arm_has_the_compute_its_protocol_says():
    launches, arms = study_plan(4000, 400)
    runs = {r.name: r for r in launches}
    for arm in arms:
        if arm.kind == "merged":
            source = next(a for a in arms if a.label == arm.merge_of)
            assert arm.compute == source.compute
            continue
        for name in arm.experts:  # the step is a checkpoint the run saves and keeps
            run = runs[name]
            assert arm.step <= run.steps and arm.step % run.every == 0
            assert run.steps // run.every <= 9  # keep_checkpoints=9 keeps them all
        spent = 0 if arm.protocol == "parent" else arm.step * len(arm.experts)
        assert spent == arm.compute, arm
    by = {a.label: a for a in arms}
    assert by["8 experts"].compute == by["1 model, +8S"].compute == 3200  # added: n x S
    assert by["8 experts, equal compute"].compute == by["1 model, +S"].compute == 400
    assert by["8 experts, equal compute"].step == 50
    assert by["Config-D (3 experts)"].experts == ("D_E3_0", "D_MC", "D_E9_511")
    assert {r.node for r in launches if r.name.startswith("L3_")} == {f"3/{i}" for i in range(8)}
    assert [r.soft for r in launches if r.name.startswith("soft")] == [0.2] * 10  # 2 and 8
    assert runs["B"].node == "0/0" and runs["B"].steps == 3200  # the fresh optimizer too


def test_each_non_baseline_arm_meets_the_one_model_of_its_compute():
    _, arms = study_plan(4000, 400)
    for arm in arms:
        base = matched_baseline(arm, arms)
        if arm.kind == "1 model":
            assert base is None
        else:
            assert base.experts == ("B",) and base.step == arm.compute


@pytest.mark.parametrize("kw, match", [
    (dict(parent_steps=4001, expert_steps=400), "multiples of 8"),
    (dict(parent_steps=4000, expert_steps=400, counts=(3,)), "2, 4 or 8"),
    (dict(parent_steps=4000, expert_steps=400, counts=(2,), soft_counts=(8,)), "soft counts"),
    (dict(parent_steps=4000, expert_steps=400, soft_p=1.5), "soft-p"),
])
def test_bad_study_numbers_fail_before_training(kw, match):
    with pytest.raises(ValueError, match=match):
        study_plan(**kw)


def test_plateau_is_the_change_over_the_last_quarter_and_losses_compare_per_seed():
    rows = [dict(seed=s, step=k * 100, bin=b, loss=1.0 + (8 - k) * 0.1 + (0.0 if k < 6 else
                                                                          -0.005 * (k - 6)))
            for s in (0, 1) for k in range(1, 9) for b in range(2)]
    _, change = curve_table(rows)
    # step 600 -> 800: (1.0 - 0.01) / 1.2 - 1
    assert change == pytest.approx({0: 0.99 / 1.2 - 1, 1: 0.99 / 1.2 - 1})
    _, arms = study_plan(4000, 400, counts=(2,), soft_counts=(), config_d=False)
    losses = [dict(layout=label, seed=s, bin=0, sigma=0.5, loss=loss)
              for s in (0, 1) for label, loss in (("2 experts", 0.9), ("1 model, +2S", 1.0))]
    table = loss_table(losses, arms)
    assert "| 2 experts vs 1 model, +2S | -10.0% ± 0.0 |" in table


def test_the_loss_table_leaves_out_arms_that_were_not_run():
    # --report's plan lists soft 8 by default; a study run with --soft-counts 2 has no rows for it
    _, arms = study_plan(4000, 400, counts=(2, 8), soft_counts=(2, 8), config_d=False)
    losses = [dict(layout=label, seed=0, bin=0, sigma=0.5, loss=1.0)
              for label in ("2 experts", "1 model, +2S")]
    table = loss_table(losses, arms)
    assert "2 experts vs" in table and "soft" not in table and "8 experts" not in table


def test_loss_by_count_is_each_arm_relative_to_its_seeds_parent():
    _, arms = study_plan(4000, 400, counts=(2, 4), soft_counts=(), config_d=False)
    loss = {"parent": (1.0, 2.0), "2 experts": (0.9, 1.9), "4 experts": (0.8, 1.6),
            "1 model, +S": (1.0, 2.0), "2 experts, equal compute": (1.0, 1.9)}
    rows = [dict(layout=k, seed=s, bin=b, loss=v[s] * (1 + b)) for k, v in loss.items()
            for s in (0, 1) for b in range(2)]
    series = loss_by_count(rows, arms)
    assert [n for n, _, _ in series["experts"]] == [2, 4]
    (_, m2, s2), (_, m4, s4) = series["experts"]
    assert m2 == pytest.approx(100 * ((0.9 - 1) + (1.9 / 2 - 1)) / 2)   # -7.5%
    assert m4 == pytest.approx(-20.0) and s4 == pytest.approx(0.0)
    assert s2 == pytest.approx(100 * np.std([-0.1, -0.05], ddof=1))
    assert series["experts, equal compute"] == [(2, pytest.approx(-2.5), pytest.approx(
        100 * np.std([0.0, -0.05], ddof=1)))]
    assert series["1 model"] == [(1, 0.0, 0.0)]   # B at S; +2S, +4S have no rows


def test_report_plots_inside_its_out_folder_unless_told_otherwise(tmp_path):
    # a --report (or a study) with no --plot once overwrote the committed docs/ figure
    import shutil

    from benchmarks.expert_scaling import main

    for name in ("results.jsonl", "loss.jsonl", "curve.jsonl"):
        shutil.copy(f"docs/expert-scaling8/{name}", tmp_path / name)
    assert main(["--report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "expert-scaling.png").stat().st_size > 10_000
    assert main(["--report", "--out", str(tmp_path), "--plot", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").exists()
