"""Paint-with-words on diffusers checkpoints (the tiny SD and IF fixtures): phrases land on
their own token columns as each pipeline's tokenizer reads the prompt, the bias (eDiff-I's
w log(1 + sigma) stat(Q K^T) on the painted tokens, sigma from the discrete-time bridge) is
zero when nothing is painted, changes the conditional branch only, and reaches IF's
added-KV attention on its text keys."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.encoders.prompt import PromptEncoder
from ediffi_jax.paint.bias import PaintSettings
from ediffi_jax.paint.masks import PaintError, PhraseMask
from ediffi_jax.pipeline.pretrained import load_pretrained

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers")
SD, IF = os.path.join(ROOT, "tiny_sd"), os.path.join(ROOT, "tiny_if")


def _left_half(h, w):
    mask = np.zeros((h, w), np.float32)
    mask[:, : w // 2] = 1.0
    return mask


@pytest.mark.parametrize("folder", [SD, IF])
def test_phrase_masks_land_on_the_phrase_tokens(folder):
    """'circle' in 'a red circle': the painted columns are the ones the U-Net reads the
    phrase's tokens in (SD's CLIP stream: after BOS, 'a', 'red'; IF reads the text
    lower-cased, so 'CIRCLE' is found)."""
    encoder = PromptEncoder(folder)
    prompt = "a red CIRCLE" if folder == IF else "a red circle"
    masks = encoder.paint_masks([prompt], [PhraseMask("circle", _left_half(8, 8), 0.5)],
                                scale=2.0)
    assert masks.shape == (1, 8, 8, encoder.context_length())
    painted = [j for j in range(masks.shape[-1]) if masks[0, ..., j].any()]
    tokenizer = encoder.towers[0][0]
    ids = tokenizer(prompt.lower())["input_ids"]
    assert tokenizer.decode([ids[j] for j in painted]).strip() == "circle"
    assert tokenizer.decode([ids[j] for j in range(len(ids)) if j not in painted],
                            skip_special_tokens=True).split() == ["a", "red"]
    if folder == SD:
        assert painted[0] == 3  # BOS, a, red
    np.testing.assert_array_equal(masks[0, ..., painted[0]], _left_half(8, 8))  # 0.5 x 2
    with pytest.raises(PaintError, match="phrase 'square' is not in the prompt"):
        encoder.paint_masks(["a red circle"], [PhraseMask("square", _left_half(8, 8))])


def _denoised(pipe, cond, plan_paint, sigma=3.0, seed=0):
    import jax

    x = jax.random.normal(jax.random.key(seed), (cond.batch_size, 8, 8, 4)) * sigma
    plan = pipe.plan(1, sampler="euler", guidance_scale=1.0, sigmas=[sigma, 0.0],
                     paint=plan_paint)
    return np.asarray(pipe.denoise(plan, cond, x))


def test_bias_is_zero_unpainted_and_moves_the_conditional_branch_only():
    pipe = load_pretrained(SD)
    encoder = PromptEncoder(SD)
    cond = encoder.encode(["a red circle"], ["blurry"])
    masks = [PhraseMask("circle", _left_half(16, 16))]
    plain = _denoised(pipe, cond, None)
    zero = cond.replace(paint=jnp.asarray(encoder.paint_masks(["a red circle"], masks, 0.0)))
    np.testing.assert_allclose(_denoised(pipe, zero, PaintSettings("max")), plain, atol=1e-6)
    painted = cond.replace(paint=jnp.asarray(encoder.paint_masks(["a red circle"], masks, 4.0)))
    moved = _denoised(pipe, painted, PaintSettings("max"))
    assert np.abs(moved - plain).max() > 1e-3
    # The unconditional branch (the negative prompt) carries zero masks: untouched.
    uncond = painted.unconditional()
    assert float(jnp.abs(uncond.paint).max()) == 0.0
    np.testing.assert_allclose(_denoised(pipe, uncond, PaintSettings("max")),
                               _denoised(pipe, cond.unconditional(), None), atol=1e-6)


def test_if_added_kv_attention_paints_its_text_keys():
    """IF's attention attends to text and pixels; the bias covers the text keys (zero-padded
    over the pixels'): painting moves the output, zero masks do not."""
    import jax

    pipe = load_pretrained(IF)
    encoder = PromptEncoder(IF)
    cond = encoder.encode(["a red circle"], [""])
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, 3)) * 3.0

    def run(c, paint):
        plan = pipe.plan(1, sampler="euler", guidance_scale=1.0, sigmas=[3.0, 0.0], paint=paint)
        return np.asarray(pipe.denoise(plan, c, x))

    plain = run(cond, None)
    masks = [PhraseMask("circle", _left_half(16, 16))]
    zero = cond.replace(paint=jnp.asarray(encoder.paint_masks(["a red circle"], masks, 0.0)))
    np.testing.assert_allclose(run(zero, PaintSettings("max")), plain, atol=1e-6)
    painted = cond.replace(paint=jnp.asarray(encoder.paint_masks(["a red circle"], masks, 8.0)))
    assert np.abs(run(painted, PaintSettings("max")) - plain).max() > 1e-4
