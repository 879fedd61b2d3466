"""A tiny SDXL-like pipeline (tools/sdxl_pipeline_fixture.py) against what diffusers'
StableDiffusionXLPipeline made with it: the two text towers' penultimate states, the pooled
projection, zeros for an absent negative prompt, clip_skip, the size / crop ids, and the whole
CFG sampling loop from the same initial latents, decoded."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.encoders.prompt import PromptEncoder
from ediffi_jax.pipeline.pretrained import load_pretrained

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_sdxl")
PROMPTS = ["a red circle", "two blue squares on grass"]
NEGATIVE = ["blurry", ""]
CASES = {"zeros": (None, None), "negative": (NEGATIVE, None), "skip": (NEGATIVE, 1)}


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="module")
def pipe():
    return load_pretrained(FIXTURE)


def _encode(case, ref):
    negative, clip_skip = CASES[case]
    return PromptEncoder(FIXTURE, clip_skip=clip_skip).encode(
        PROMPTS, negative, size=tuple(int(v) for v in ref["size"]))


@pytest.mark.parametrize("case", CASES)
def test_prompts_encode_as_diffusers(ref, case):
    cond = _encode(case, ref)
    for field, key in (("context", "context"), ("negative_context", "negative"),
                       ("pooled", "pooled"), ("negative_pooled", "negative_pooled")):
        np.testing.assert_allclose(np.asarray(getattr(cond, field)), ref[f"{case}_{key}"],
                                   atol=1e-4, err_msg=field)
    np.testing.assert_array_equal(np.asarray(cond.time_ids),
                                  np.tile(ref["time_ids"], (len(PROMPTS), 1)))


@pytest.mark.parametrize("case", CASES)
def test_sampling_matches_diffusers(pipe, ref, case):
    sigmas = pipe.sigmas(int(ref["steps"]))
    np.testing.assert_allclose(sigmas, ref["sigmas"], rtol=1e-5)
    plan = pipe.plan(int(ref["steps"]), sampler="euler", guidance_scale=float(ref["guidance"]))
    x = jnp.asarray(ref["noise"].transpose(0, 2, 3, 1)) * pipe.schedule.init_noise_sigma(sigmas)
    latents = np.asarray(pipe.denoise(plan, _encode(case, ref), x))
    want = ref[f"{case}_latents"].transpose(0, 2, 3, 1)
    scale = np.abs(want).max()
    np.testing.assert_allclose(latents / scale, want / scale, atol=1e-4)
    image = np.asarray(pipe.decode(jnp.asarray(latents)))
    np.testing.assert_allclose(image, ref[f"{case}_image"].transpose(0, 2, 3, 1), atol=1e-3)


def test_sdxl_needs_the_image_size(ref):
    with pytest.raises(ValueError, match="needs the image size"):
        PromptEncoder(FIXTURE).encode(PROMPTS)


def test_clip_skip_must_fit_the_towers():
    with pytest.raises(ValueError, match="clip_skip 3"):
        PromptEncoder(FIXTURE, clip_skip=3)


def test_refiner_layout_uses_the_second_tower_and_aesthetic_ids(tmp_path, ref):
    """The SDXL refiner's pipeline has only text_encoder_2 and requires_aesthetics_score: its
    ids are original size + crop + score (6.0; 2.5 in the negative branch, as diffusers'
    defaults)."""
    import json
    import shutil

    target = tmp_path / "refiner"
    shutil.copytree(FIXTURE, target)
    shutil.rmtree(target / "text_encoder")
    index = json.loads((target / "model_index.json").read_text())
    index.update(text_encoder=[None, None], tokenizer=[None, None],
                 requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    (target / "model_index.json").write_text(json.dumps(index))
    cond = PromptEncoder(str(target)).encode(PROMPTS, size=(16, 24))
    full = _encode("negative", ref)
    np.testing.assert_allclose(np.asarray(cond.context), np.asarray(full.context)[..., 16:],
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cond.time_ids)[0], [16, 24, 0, 0, 6.0])
    uncond = cond.unconditional()
    np.testing.assert_array_equal(np.asarray(uncond.time_ids)[0], [16, 24, 0, 0, 2.5])
    assert np.abs(np.asarray(uncond.context)).max() > 0  # "" encoded, not zeros


def test_command_line_samples_an_sdxl_folder(tmp_path, capsys):
    from sample.__main__ import main

    out = tmp_path / "out"
    rc = main(["--pretrained", FIXTURE, "--prompt", "a red circle", "--steps", "2",
               "--size", "16x24", "--clip-skip", "1", "--num", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["0000_a_red_circle.png", "grid.png"]
