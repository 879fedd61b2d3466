"""The library's one sampling entry point: ediffi_jax.pipeline.load(path).sample(prompts)."""
import numpy as np
import pytest

from ediffi_jax import pipeline
from ediffi_jax.pipeline.generate import Paint, generate, sampling_with_overrides
from ediffi_jax.runs.store import load_ensemble

SHIPPED = "pretrained/tiny-shapes"
FAST = ["sampling.num_steps=4"]


def test_three_lines_give_what_the_pipeline_underneath_gives():
    """load + sample on the shipped export = generate() on the same run and seed, though the
    sampler shards its (padded) batch over every device and generate runs on one."""
    sampler = pipeline.load(SHIPPED, overrides=FAST)
    prompts = ["a red circle", "a blue square", "a green triangle"]
    images = sampler.sample(prompts, seed=3)
    run, ensemble = load_ensemble(SHIPPED)
    want = generate(run, ensemble, prompts, seed=3, sampling=sampling_with_overrides(run, FAST))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 20  # prompts matter

    # Paint as a plain {phrase: mask} dict is the Paint the CLI builds.
    mask = np.zeros((32, 32), np.float32)
    mask[:16] = 1.0
    painted = sampler.sample(prompts[:1], seed=3, paint={"red circle": (mask, 2.0)})
    same = sampler.sample(prompts[:1], seed=3, paint=Paint.from_masks({"red circle": (mask, 2.0)}))
    np.testing.assert_array_equal(painted, same)
    assert np.abs(painted.astype(int) - images[:1].astype(int)).max() > 0


def test_load_names_what_it_cannot_take(tmp_path):
    with pytest.raises(ValueError, match="stages= selects stages of a cascade file"):
        pipeline.load(SHIPPED, stages=["base"])
    with pytest.raises(Exception, match="does not exist"):
        pipeline.load(str(tmp_path / "nothing.json"))
