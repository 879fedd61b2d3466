"""SD 1.x / 2.x prompt encoding (encoders/prompt.py) against what diffusers' encode_prompt
gave for the tiny pipeline (tools/sd_pipeline_fixture.py): the pipeline's own tokenizer, the
plain CLIPTextModel (no projection), the negative prompts as CFG's unconditional branch."""
import os

import numpy as np
import pytest

from ediffi_jax.encoders.prompt import PromptEncoder

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_sd")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="module")
def encoder():
    return PromptEncoder(FIXTURE)


def test_prompts_encode_as_diffusers(encoder, ref):
    np.testing.assert_array_equal(encoder.token_ids("a red circle"), ref["text_ids"])
    cond = encoder.encode(["a red circle", "two blue squares on grass"], ["", "blurry"])
    np.testing.assert_allclose(np.asarray(cond.context), ref["text_cond"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(cond.negative_context), ref["text_uncond"], atol=1e-4)
    # The unconditional branch is the negative prompts' encoding, not zeros.
    uncond = cond.unconditional()
    np.testing.assert_array_equal(np.asarray(uncond.context), np.asarray(cond.negative_context))


def test_default_negative_prompt_is_the_empty_prompt(encoder, ref):
    cond = encoder.encode(["a red circle"])
    np.testing.assert_allclose(np.asarray(cond.negative_context), ref["text_uncond"][:1],
                               atol=1e-4)


def test_negative_prompt_count_must_match(encoder):
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        encoder.encode(["a", "b"], ["c"])
