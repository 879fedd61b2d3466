"""A tiny DeepFloyd-IF-like stage I (tools/if_pipeline_fixture.py) against what diffusers'
IFPipeline made with it: T5 prompts (lower-cased, stripped, padding-masked), then the whole
pixel-space CFG loop with DPM-Solver++(2M) from the noise the pipeline drew, with IF's dynamic
thresholding of the guided x0 and without it."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.encoders.prompt import PromptEncoder
from ediffi_jax.pipeline.pretrained import load_pretrained

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_if")
PROMPTS = ["A Red Circle ", "two blue squares on grass"]
NEGATIVE = ["blurry", ""]


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="module")
def cond():
    return PromptEncoder(FIXTURE).encode(PROMPTS, NEGATIVE)


def test_t5_prompts_encode_as_diffusers(ref, cond):
    np.testing.assert_allclose(np.asarray(cond.context), ref["context"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(cond.negative_context), ref["negative"], atol=1e-4)
    assert cond.pooled is None and cond.time_ids is None
    # IF's U-Net attends to all 77 positions (the pipeline passes no encoder mask).
    assert np.asarray(cond.context_mask).min() == 1.0


@pytest.mark.parametrize("case", ["threshold", "plain"])
def test_sampling_matches_diffusers(ref, cond, case):
    pipe = load_pretrained(FIXTURE)
    assert pipe.vae is None and pipe.schedule.thresholding
    if case == "plain":
        pipe = dataclasses.replace(pipe, schedule=dataclasses.replace(pipe.schedule,
                                                                      thresholding=False))
    steps = int(ref["steps"])
    sigmas = pipe.sigmas(steps, sampler="dpmpp_2m")
    np.testing.assert_allclose(sigmas, ref[f"{case}_sigmas"], rtol=1e-5)
    plan = pipe.plan(steps, sampler="dpmpp_2m", guidance_scale=float(ref["guidance"]))
    x = jnp.asarray(ref["noise"].transpose(0, 2, 3, 1)) * pipe.schedule.init_noise_sigma(
        sigmas, "dpmsolver")
    images = np.asarray(pipe.denoise(plan, cond, x))
    want = ref[f"{case}_images"].transpose(0, 2, 3, 1)
    scale = np.abs(want).max()
    if case == "threshold":
        # Every x0 clipped into [-1, 1], so the image is in range; the per-image quantile
        # amplifies float32 rounding a little (measured 1.2e-4-2.8e-4): the 1e-3 bar.
        assert scale <= 1.0 + 1e-6
        np.testing.assert_allclose(images, want, atol=1e-3)
    else:  # the random model's unclipped x0 runs far out of range: compare relative to it
        assert scale > 10.0
        np.testing.assert_allclose(images / scale, want / scale, atol=1e-4)


def test_command_line_samples_the_if_folder(tmp_path, capsys, cond):
    """`python -m sample --pretrained` on a pixel-space IF folder (no VAE): the U-Net's own
    sample size, the pipeline's DPM-Solver++ with thresholding; the PNG is pipe.sample's."""
    from PIL import Image

    from ediffi_jax.pipeline.generate import to_uint8
    from sample.__main__ import main

    out = tmp_path / "out"
    rc = main(["--pretrained", FIXTURE, "--prompt", PROMPTS[0], "--negative-prompt", NEGATIVE[0],
               "--num", "1", "--steps", "3", "--sampler", "dpmpp_2m", "--guidance-scale", "7",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    (name,) = [p.name for p in out.iterdir() if p.name != "grid.png"]
    png = np.asarray(Image.open(out / name))
    assert png.shape == (16, 16, 3)
    pipe = load_pretrained(FIXTURE)
    one = PromptEncoder(FIXTURE).encode(PROMPTS[:1], NEGATIVE[:1])
    want = np.asarray(to_uint8(pipe.sample(pipe.plan(3, sampler="dpmpp_2m", guidance_scale=7.0),
                                           one, seed=0, size=(16, 16))))[0]
    assert np.abs(png.astype(int) - want.astype(int)).max() <= 1
    assert png.std() > 10  # an image, not a constant


STAGE_TWO = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_if2")


def test_stage_two_matches_diffusers_super_resolution(cond):
    """IF stage II (IFSuperResolutionPipeline) from stage I's images: the low-res input
    upsampled with aligned corners and noised by the image_noising_scheduler, concatenated to
    the U-Net's input with its noise level as the class label in both CFG branches, then
    DPM-Solver++(2M) with thresholding, from the noises the pipeline drew."""
    ref = dict(np.load(os.path.join(STAGE_TWO, "reference.npz")))
    pipe = load_pretrained(STAGE_TWO)
    assert pipe.latent_channels == 3 and pipe.noising_schedule is not None
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))  # noqa: E731
    staged = pipe.with_lowres(cond, nhwc(ref["lowres_input"]), noise_level=int(ref["noise_level"]),
                              noise=nhwc(ref["augmentation_noise"]))
    np.testing.assert_allclose(np.asarray(staged.lowres), nhwc(ref["lowres"]), atol=1e-5)
    assert staged.unconditional().lowres is staged.lowres  # one low-res for both branches
    steps = int(ref["steps"])
    plan = pipe.plan(steps, sampler="dpmpp_2m", guidance_scale=float(ref["guidance"]))
    x = nhwc(ref["noise"]) * pipe.schedule.init_noise_sigma(np.asarray(plan.sigmas), "dpmsolver")
    images = np.asarray(pipe.denoise(plan, staged, x))
    err = np.abs(images - np.asarray(nhwc(ref["images"]))).reshape(2, -1)
    # One image agrees to float32 rounding; in the other, rounding moves which pixel sits at
    # the 0.95 quantile of |x0|, so thresholding rescales its whole x0 a little (measured
    # max 3.1e-3, median 3e-7): the median holds both to rounding.
    assert np.median(err) < 1e-5
    assert err.max(axis=1).min() < 1e-4 and err.max() < 5e-3
    # Its own draws: a 32 x 32 sample from a seed, per example deterministic.
    drawn = pipe.with_lowres(cond, nhwc(ref["lowres_input"]), seed=3)
    out = np.asarray(pipe.sample(plan, drawn, seed=3, size=(32, 32)))
    assert out.shape == (2, 32, 32, 3) and np.abs(out).max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="super-resolution stage"):
        pipe.sample(plan, cond, size=(32, 32))
    with pytest.raises(ValueError, match="one per prompt"):
        pipe.with_lowres(cond, nhwc(ref["lowres_input"])[:1])
    with pytest.raises(ValueError, match="not a super-resolution stage"):
        load_pretrained(FIXTURE).with_lowres(cond, nhwc(ref["lowres_input"]))


def _cascade_file(tmp_path, **second):
    import json

    path = tmp_path / "if.json"
    path.write_text(json.dumps({"stages": [
        {"pretrained": os.path.relpath(FIXTURE, tmp_path), "steps": 2, "guidance_scale": 7.0},
        {"pretrained": os.path.relpath(STAGE_TWO, tmp_path), "steps": 2, "guidance_scale": 4.0,
         "noise_level": 100, **second}]}))
    return str(path)


def _pngs(directory):
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)) for p in sorted(directory.iterdir())
            if p.name != "grid.png"}


def test_cascade_file_chains_if_stage_one_into_stage_two(tmp_path, capsys):
    """`python -m sample --cascade if.json`: stage I's PNGs are its pipeline sampled alone
    (stage 0 keys); stage II's are the chain (stage I's images clipped, upsampled and noised
    at the file's noise_level from stage 1's keys, then sampled), the batch sharded over the
    default 8-device data mesh; the augmentation stream is per example, so batches agree."""
    from ediffi_jax.pipeline.generate import to_uint8
    from ediffi_jax.pipeline.pretrained import PretrainedCascade, read_pretrained_cascade
    from ediffi_jax.rng import sampling_key
    from sample.__main__ import main

    path = _cascade_file(tmp_path)
    args = ["--cascade", path, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
            "--negative-prompt", NEGATIVE[0], "--num", "1", "--sampler", "dpmpp_2m", "--seed", "4"]
    assert main(args + ["--out", str(tmp_path / "all")]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["tiny_if", "tiny_if2"]
    one = np.stack(list(_pngs(tmp_path / "all" / "tiny_if").values())).astype(int)
    two = np.stack(list(_pngs(tmp_path / "all" / "tiny_if2").values())).astype(int)
    assert one.shape == (2, 16, 16, 3) and two.shape == (2, 32, 32, 3)

    stages = read_pretrained_cascade(path)
    pipes = [load_pretrained(s.pretrained) for s in stages]
    cond = PromptEncoder(FIXTURE).encode(PROMPTS, NEGATIVE[:1] * 2)
    plans = [p.plan(2, sampler="dpmpp_2m", guidance_scale=g) for p, g in zip(pipes, (7.0, 4.0))]
    first = np.clip(np.asarray(pipes[0].sample(plans[0], cond, seed=4, size=(16, 16))), -1, 1)
    assert np.abs(one - np.asarray(to_uint8(first)).astype(int)).max() <= 1
    key = sampling_key(4, 1)
    want = pipes[1].sample(plans[1], pipes[1].with_lowres(cond, first, noise_level=100, seed=key,
                                                          size=(32, 32)),
                           seed=key, size=(32, 32))
    got = list(PretrainedCascade(pipes, [250, 100]).each_stage(
        plans, cond, sizes=[(16, 16), (32, 32)], seed=4))
    np.testing.assert_allclose(got[0], first, atol=1e-6)
    # The low-res augmentation is drawn per example: batch [1:] from first_index 1 is row 1.
    whole = pipes[1].with_lowres(cond, first, seed=key)
    part = pipes[1].with_lowres(jax.tree.map(lambda a: a[1:], cond), first[1:], seed=key,
                                first_index=1)
    np.testing.assert_allclose(np.asarray(part.lowres), np.asarray(whole.lowres)[1:], atol=1e-6)
    np.testing.assert_allclose(got[1], np.clip(np.asarray(want), -1, 1), atol=1e-5)
    assert np.abs(two - np.asarray(to_uint8(got[1])).astype(int)).max() <= 1


@pytest.mark.parametrize("change, message", [
    (dict(order="reversed"), "is a super-resolution stage: it needs a stage before it"),
    (dict(second={"sigma": 1}), "unknown keys ['sigma']"),
    (dict(mesh="3,1,1"), "mesh shape"),
])
def test_cascade_file_bad_input_is_named_before_sampling(tmp_path, capsys, change, message):
    import json

    from sample.__main__ import main

    path = _cascade_file(tmp_path, **change.get("second", {}))
    if change.get("order"):
        spec = json.loads(open(path).read())
        spec["stages"].reverse()
        open(path, "w").write(json.dumps(spec))
    rc = main(["--cascade", path, "--prompt", "a red circle", "--out", str(tmp_path / "out"),
               f"--mesh={change.get('mesh', '-1,1,1')}"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cascade_scalecrafter_on_the_last_stage_and_paint_on_both(tmp_path, capsys):
    """IF stage I + II from one cascade file with ScaleCrafter (2x stage II's side) and a
    phrase painted: both stages' plans paint (the bias itself on IF's added-KV attention is
    tests/test_pretrained_paint.py's), only stage II's re-dilates, and stage II samples at
    twice its side (ScaleCrafter's effect on the image: tests/test_pretrained_highres.py)."""
    from PIL import Image

    from ediffi_jax.models.diffusers_unet import DiffusersUNetConfig, conv3x3_levels
    from ediffi_jax.pipeline.pretrained import read_component_config
    from sample.__main__ import main

    levels = conv3x3_levels(read_component_config(os.path.join(STAGE_TWO, "unet"),
                                                  DiffusersUNetConfig))
    settings = tmp_path / "dilate.txt"
    settings.write_text("".join(f"{name}:2\n" for name, level in levels.items() if level >= 1))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rc = main(["--cascade", _cascade_file(tmp_path), "--prompt", "a red circle", "--num", "1",
               "--seed", "1", "--size", "64x64", "--highres", "scalecrafter",
               "--dilate-settings", str(settings), "--dilate-tau", "50",
               "--paint-mask", f"red circle={tmp_path / 'mask.png'}:3.0",
               "--out", str(tmp_path / "out")])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    one, two = printed.out.split("tiny_if2: ")
    assert "16x16" in one and "paint-with-words" in one and "layers [" not in one
    assert "64x64" in two and "paint-with-words" in two and "layers [d2 x" in two
    images = {s: np.stack(list(_pngs(tmp_path / "out" / s).values())).astype(int)
              for s in ("tiny_if", "tiny_if2")}
    assert images["tiny_if"].shape == (1, 16, 16, 3)
    assert images["tiny_if2"].shape == (1, 64, 64, 3) and images["tiny_if2"].std() > 1
