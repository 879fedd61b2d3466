"""Prompts encoded as a diffusers Stable Diffusion 1.x / 2.x pipeline encodes them, on the
project's CLIP text tower: the tokenizer of the pipeline's tokenizer/ folder, ids padded to
its model_max_length (77) and truncated, no attention mask, the tower's last hidden state
after its final LayerNorm (SD 1.x: CLIP ViT-L/14; SD 2.x: OpenCLIP ViT-H/14 in transformers
layout, gelu, 23 layers). The negative prompts (default "") are encoded the same way: they
are classifier-free guidance's unconditional branch."""
from __future__ import annotations

import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from ediffi_jax.encoders.conditioner import load_clip_text
from ediffi_jax.encoders.tokenizers import load_tokenizer, tokenize
from ediffi_jax.models.conditioning import PromptConditioning


class SDPromptEncoder:
    def __init__(self, pipeline_dir: str, dtype: str = "float32", mesh=None):
        self.tokenizer = load_tokenizer(os.path.join(pipeline_dir, "tokenizer"))
        self.tower = load_clip_text(os.path.join(pipeline_dir, "text_encoder"), dtype, mesh)
        self.max_length = min(int(self.tokenizer.model_max_length),
                              self.tower.config.max_position_embeddings)

    def embed(self, prompts: Sequence[str], what: str = "prompt") -> jnp.ndarray:
        ids, _ = tokenize(self.tokenizer, prompts, self.max_length, what)
        hidden, _, _ = self.tower.apply(self.tower.params, jnp.asarray(ids), None)
        return hidden

    def encode(self, prompts: Sequence[str],
               negative_prompts: Sequence[str] | None = None) -> PromptConditioning:
        prompts = list(prompts)
        negative = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        context = self.embed(prompts)
        negative_context = self.embed(negative, "negative prompt")
        ones = jnp.ones(context.shape[:2], jnp.float32)
        return PromptConditioning(context=context, context_mask=ones,
                                  negative_context=negative_context, negative_mask=ones)

    def token_ids(self, prompt: str) -> np.ndarray:
        return np.asarray(self.tokenizer(prompt)["input_ids"], np.int32)
