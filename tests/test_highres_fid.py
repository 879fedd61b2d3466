"""KID (ediffi_jax/eval/kid.py) against a double loop over its formula and on known
distributions; benchmarks/highres_fid.py end to end on tiny_sd (2x its side, 4 images, 2 steps)
with a cheap stand-in for Inception: every metric of both methods, resuming without
resampling, FID_b of direct sampling at the base size, and input errors before any sampling."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from benchmarks import highres_fid
from ediffi_jax.eval import kid

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_sd")
PROMPTS = ["a red circle", "a blue square", "two green triangles", "a small yellow star"]


# ----------------------------------------------------------------------------- KID

def loop_mmd2(x, y):
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, one pair at a time."""
    m, d = x.shape

    def k(a, b):
        return (sum(a[i] * b[i] for i in range(d)) / d + 1) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return within / (m * (m - 1)) - 2 * cross / (m * m)


def test_kid_is_the_mean_of_the_formula_over_seeded_subsets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(9, 5)), rng.normal(0.3, 1.2, size=(7, 5))
    got = kid.kernel_inception_distance(a, b, num_subsets=4, max_subset_size=5, seed=3)
    draws = np.random.default_rng(3)  # the subsets as the function draws them
    values = [loop_mmd2(a[draws.choice(9, 5, replace=False)], b[draws.choice(7, 5, replace=False)])
              for _ in range(4)]
    assert got.mean == pytest.approx(np.mean(values), rel=1e-12)
    assert got.std == pytest.approx(np.std(values), rel=1e-10)
    assert (got.subset_size, got.num_subsets) == (5, 4)
    again = kid.kernel_inception_distance(a, b, num_subsets=4, max_subset_size=5, seed=3)
    assert again == got


def test_kid_subsets_of_a_whole_set_are_the_full_estimate():
    """subset_size = min(n_a, n_b): the smaller set is taken whole every time (the default
    max_subset_size 1000 above both sizes here)."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 0.5
    got = kid.kernel_inception_distance(a, b, num_subsets=5)
    assert got.subset_size == 6
    assert got.mean == pytest.approx(loop_mmd2(a, b), rel=1e-12) and got.std < 1e-12


def test_kid_is_near_zero_within_a_distribution_and_positive_across_a_shift():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(400, 16))
    halves = rng.permutation(features)
    subsets = dict(num_subsets=20, max_subset_size=100)
    same = kid.kernel_inception_distance(halves[:200], halves[200:], **subsets)
    shifted = kid.kernel_inception_distance(features[:200], features[200:] + 0.5, **subsets)
    assert same.subset_size == shifted.subset_size == 100
    assert shifted.mean > 0.5 and shifted.mean > 5 * shifted.std
    assert abs(same.mean) < same.std and abs(same.mean) < 0.02 * shifted.mean


@pytest.mark.parametrize("a, b, message", [
    (np.zeros((1, 4)), np.zeros((5, 4)), r"N >= 2, D\]; the first set is \(1, 4\)"),
    (np.zeros((5, 4)), np.zeros(4), r"the second set is \(4,\)"),
    (np.zeros((5, 4)), np.zeros((5, 3)), "4 and 3 dimensions"),
    (np.full((5, 4), np.nan), np.zeros((5, 4)), "first feature set holds non-finite"),
])
def test_kid_rejects_too_few_features_and_mismatched_dimensions(a, b, message):
    with pytest.raises(ValueError, match=message):
        kid.kernel_inception_distance(a, b)


# ----------------------------------------------------------------------------- the benchmark

def block_features(images):
    """A cheap stand-in for Inception on its 299x299 input: 8 x 8 block means (192 values)."""
    x = np.asarray(images, np.float64)[:, :296, :296] / 255
    return x.reshape(len(x), 8, 37, 8, 37, 3).mean(axis=(2, 4)).reshape(len(x), -1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A prompts file and a reference folder of real-image stand-ins in two sizes."""
    root = tmp_path_factory.mktemp("highres_fid")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    rng = np.random.default_rng(0)
    for name, count in (("reference", 5), ("few", 3)):
        (root / name).mkdir()
        for i in range(count):
            shape = (40, 48, 3) if i % 2 else (36, 36, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
                root / name / f"{i}.png")
    return root


def arguments(inputs, out, *extra):
    return ["--pretrained", FIXTURE, "--prompts", str(inputs / "prompts.txt"),
            "--reference", str(inputs / "reference"), "--num", "4", "--steps", "2",
            "--batch", "4", "--out", str(out), *extra]


SCALECRAFTER = ["--size", "32x32", "--scalecrafter-preset", "sd1", "--highres-skip-missing"]


def test_benchmark_measures_every_method_and_resumes_without_resampling(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = arguments(inputs, out, *SCALECRAFTER)
    assert highres_fid.main(args, features=block_features) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "ScaleCrafter preset sd1.5_1024x1024" in printed
    assert re.search(r"\| scalecrafter \| 32x32 \| [\d.]+ \|", printed)
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert set(metrics) == {"base", "direct", "scalecrafter", "attn-sf"}
    assert set(metrics["base"]) == {"fid_r", "kid_r", "kid_std_r"}
    for method in ("direct", "scalecrafter", "attn-sf"):
        assert set(metrics[method]) == {f"{m}_{s}" for m in ("fid", "kid", "kid_std")
                                        for s in "rbc"}
    assert all(np.isfinite(v) for row in metrics.values() for v in row.values())
    assert results["size"] == [32, 32] and results["base_size"] == [16, 16]
    assert "d2" in results["settings"]["scalecrafter"]["plan"]  # re-dilated steps
    assert "attention entropy x4" in results["settings"]["attn-sf"]["plan"]
    direct, scaled = ([np.asarray(Image.open(out / m / f"{i:05d}.png")) for i in range(4)]
                      for m in ("direct", "scalecrafter"))
    assert direct[0].shape == (32, 32, 3)
    assert np.asarray(Image.open(out / "base" / "00000.png")).shape == (16, 16, 3)
    assert np.abs(np.stack(direct).astype(int) - np.stack(scaled)).max() > 2

    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".png", ".npz")}
    assert len(written) == 16 + 5  # 4 sets of 4 images; features of them and the reference
    assert highres_fid.main(args, features=block_features) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("4 of 4 images there") == 4 and "sampling" not in printed
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert json.loads((out / "results.json").read_text())["metrics"] == metrics

    # other settings into the same folder: refused before sampling, nothing touched
    assert highres_fid.main(arguments(inputs, out, *SCALECRAFTER, "--guidance-scale", "5"),
                            features=block_features) == 2
    assert re.search(r"base holds images made with other settings \(guidance_scale, plan\)",
                     capsys.readouterr().err)
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_direct_sampling_at_the_base_size_keeps_the_base_set(inputs, tmp_path, capsys):
    """--size the U-Net's own with direct sampling: the images are the base set's, so FID_b is
    0 and FID_r the base's."""
    out = tmp_path / "out"
    assert highres_fid.main(arguments(inputs, out, "--size", "16x16", "--methods", "direct"),
                            features=block_features) == 0, capsys.readouterr().err
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert set(metrics) == {"base", "direct"}
    assert abs(metrics["direct"]["fid_b"]) < 1e-6
    assert metrics["direct"]["fid_r"] == pytest.approx(metrics["base"]["fid_r"], abs=1e-9)


@pytest.mark.parametrize("change, message", [
    ({"--reference": "{root}/nowhere"}, "nowhere: not a folder of images"),
    ({"--reference": "{root}/few"}, "holds 3 images, fewer than the 4 images per set"),
    ({"--size": "30x30"}, r"--size 30x30 is not a multiple of 4 \(the VAE's factor 2 x the "
                          r"U-Net's 2\)"),
    ({"--methods": "direct,upscale"}, "--methods 'direct,upscale': give some of direct, "
                                      "scalecrafter"),
    ({"--methods": "direct"}, "--scalecrafter-preset, --highres-skip-missing: only with "
                              "--methods including scalecrafter"),
    ({"--size": "8x8"}, "--crops takes 16x16 crops .* give --size at least that, or --crops 0"),
    ({"--num": "5"}, "holds 4 prompts, --num 5 asks for 5 images"),
    ({"--prompts": "{root}/none.txt"}, "none.txt: no such file"),
])
def test_bad_input_is_an_error_before_any_sampling(inputs, tmp_path, capsys, change, message):
    args = arguments(inputs, tmp_path / "out", *SCALECRAFTER)
    for flag, value in change.items():
        value = value.format(root=inputs)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert highres_fid.main(args, features=block_features) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_missing_inception_weights_are_an_error_before_any_sampling(inputs, tmp_path, capsys):
    args = arguments(inputs, tmp_path / "out", *SCALECRAFTER, "--weights",
                     str(tmp_path / "nothere.pt"))
    assert highres_fid.main(args) == 2
    assert "nothere.pt: no FID Inception weights there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
