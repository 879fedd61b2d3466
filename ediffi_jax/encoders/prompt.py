"""Prompts encoded as diffusers' Stable Diffusion pipelines encode them, on the project's CLIP
text tower, with each pipeline's own tokenizer folders (ids padded to model_max_length, 77,
and truncated; no attention mask).

- SD 1.x / 2.x (tokenizer/ + text_encoder/: CLIP ViT-L/14, or OpenCLIP ViT-H/14 in
  transformers layout): the last hidden state after the final LayerNorm; with clip_skip k,
  hidden_states[-(k + 1)] through the final LayerNorm.
- SDXL (tokenizer_2/ + text_encoder_2/, a CLIPTextModelWithProjection, and for the base also
  tokenizer/ + text_encoder/): each tower's hidden_states[-(k + 2)] as it is, concatenated on
  the feature axis; the pooled text is the second tower's projection; the size / crop ids
  (and the refiner's aesthetic score) become time_ids; with `force_zeros_for_empty_prompt`
  and no negative prompt, the negative embeddings are zeros.

- DeepFloyd IF (tokenizer/ + a T5EncoderModel text_encoder/): T5's last hidden state with the
  padding mask, the text lower-cased and stripped (IF's pipeline with clean_caption=False; its
  default caption cleaning needs bs4 and ftfy and is not reproduced).

The negative prompts (default "") are classifier-free guidance's unconditional branch; as in
diffusers, clip_skip changes the prompts' embeddings only, not the negative prompts'.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.encoders import hf
from ediffi_jax.encoders.conditioner import load_clip_text, load_t5
from ediffi_jax.encoders.tokenizers import load_tokenizer, tokenize
from ediffi_jax.models.conditioning import PromptConditioning
from ediffi_jax.paint.masks import TokenStream, batch_token_masks

TOWERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' refiner defaults
IF_TOKENS = 77  # IF's pipeline pads T5's input to 77 tokens


def _model_index(pipeline_dir: str) -> dict:
    path = os.path.join(pipeline_dir, "model_index.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _has(index: dict, pipeline_dir: str, name: str) -> bool:
    """Whether the pipeline has component `name`: listed (not null) in model_index.json, or
    without one, a folder of that name."""
    path = os.path.join(pipeline_dir, name)
    listed = (index.get(name) or [None, None])[1] is not None if index else os.path.isdir(path)
    if listed and not os.path.isdir(path):
        raise ValueError(f"{pipeline_dir}: model_index.json lists {name}/, which is missing")
    return listed


class PromptEncoder:
    """The text side of a diffusers SD / SDXL pipeline folder. `clip_skip`: layers skipped from
    the end (diffusers' argument of the same name)."""

    def __init__(self, pipeline_dir: str, dtype: str = "float32", mesh=None,
                 clip_skip: int | None = None):
        index = _model_index(pipeline_dir)
        names = [(tok, enc) for tok, enc in TOWERS if _has(index, pipeline_dir, enc)]
        if not names:
            raise ValueError(f"{pipeline_dir}: no text_encoder/ or text_encoder_2/ to encode "
                             "prompts with")
        first = os.path.join(pipeline_dir, names[0][1])
        self.t5 = hf.read_config(first).get("model_type") == "t5"  # DeepFloyd IF
        if self.t5:
            self.towers = [(load_tokenizer(os.path.join(pipeline_dir, names[0][0])),
                            load_t5(first, dtype, mesh))]
        else:
            self.towers = [(load_tokenizer(os.path.join(pipeline_dir, tok)),
                            load_clip_text(os.path.join(pipeline_dir, enc), dtype, mesh))
                           for tok, enc in names]
        self.xl = _has(index, pipeline_dir, "text_encoder_2")  # the refiner has only that one
        if self.xl and not self.towers[-1][1].config.projection:
            raise ValueError(f"{pipeline_dir}/text_encoder_2 has no text_projection (SDXL's "
                             "pooled text is its projection)")
        self.force_zeros = self.xl and bool(index.get("force_zeros_for_empty_prompt", True))
        self.aesthetics = bool(index.get("requires_aesthetics_score", False))
        if clip_skip is not None and self.t5:
            raise ValueError("clip_skip: this pipeline's text encoder is T5, not CLIP")
        if clip_skip is not None and not 0 <= clip_skip < min(
                t.config.num_hidden_layers for _, t in self.towers):
            raise ValueError(f"clip_skip {clip_skip} must be >= 0 and below the text towers' "
                             "depth")
        self.clip_skip = clip_skip
        if self.t5:
            self._apply = [jax.jit(lambda p, ids, mask, layer, norm, m=self.towers[0][1].module:
                                   (m.apply({"params": p}, ids, mask), None, None),
                                   static_argnums=(3, 4))]
        else:
            self._apply = [jax.jit(lambda p, ids, mask, layer, norm, m=tower.module: m.apply(
                {"params": p}, ids, None, layer, norm), static_argnums=(3, 4))
                for _, tower in self.towers]

    def _layer(self, clip_skip):
        """(hidden_layer, norm_hidden) of the towers for this clip_skip."""
        if self.xl:
            return -((clip_skip or 0) + 2), False
        return (None, False) if clip_skip is None else (-(clip_skip + 1), True)

    def _tower_hidden(self, i, prompts, what, clip_skip):
        tokenizer, tower = self.towers[i]
        # IF: lower-cased, attended with T5's padding mask
        prompts = [self._as_read(p) for p in prompts]
        ids, mask = tokenize(tokenizer, prompts, self.context_length(i), what)
        hidden, _, projected = self._apply[i](tower.params, jnp.asarray(ids), jnp.asarray(mask),
                                              *self._layer(clip_skip))
        return hidden, projected

    def embed(self, prompts: Sequence[str], what: str = "prompt", clip_skip: int | None = None):
        """(token embeddings [B, 77, D], pooled text [B, P] or None for SD 1.x / 2.x)."""
        outs = [self._tower_hidden(i, prompts, what, clip_skip) for i in range(len(self.towers))]
        context = jnp.concatenate([h for h, _ in outs], axis=-1)
        return context, (outs[-1][1] if self.xl else None)

    def time_ids(self, size: tuple[int, int] | None, batch: int, negative: bool = False):
        """SDXL's added ids: original size + crop top-left (0, 0) + target size (the base), or
        + the aesthetic score (the refiner), for a `size` = (H, W) image."""
        if not self.xl:
            return None
        if size is None:
            raise ValueError("an SDXL pipeline's conditioning needs the image size (its "
                             "size and crop ids)")
        h, w = size
        tail = ((NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE,) if self.aesthetics
                else (h, w))
        return jnp.asarray(np.tile(np.asarray((h, w, 0, 0) + tail, np.float32), (batch, 1)))

    def encode(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None = None,
               size: tuple[int, int] | None = None) -> PromptConditioning:
        """The conditioning of `prompts` with `negative_prompts` (None: "" each, or zeros where
        the pipeline forces zeros for an empty negative prompt) for an image of `size`."""
        prompts = list(prompts)
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} "
                             "prompts")
        context, pooled = self.embed(prompts, clip_skip=self.clip_skip)
        if negative_prompts is None and self.force_zeros:
            negative_context = jnp.zeros_like(context)
            negative_pooled = None if pooled is None else jnp.zeros_like(pooled)
        else:
            negative = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
            # As diffusers does: clip_skip applies to the prompts, not to the negative prompts.
            negative_context, negative_pooled = self.embed(negative, "negative prompt")
        ones = jnp.ones(context.shape[:2], jnp.float32)
        ids = self.time_ids(size, len(prompts))
        return PromptConditioning(context=context, context_mask=ones,
                                  negative_context=negative_context, negative_mask=ones,
                                  pooled=pooled, negative_pooled=negative_pooled, time_ids=ids,
                                  negative_time_ids=self.time_ids(size, len(prompts), True)
                                  if self.aesthetics else None)

    def context_length(self, tower: int = 0) -> int:
        """Tokens per prompt as the U-Net reads them (padded and truncated to this)."""
        if self.t5:
            return IF_TOKENS
        tokenizer, encoder = self.towers[tower]
        return min(int(tokenizer.model_max_length), encoder.config.max_position_embeddings)

    def _as_read(self, text: str) -> str:
        return text.lower().strip() if self.t5 else text  # as IF's pipeline reads it

    def token_streams(self, prompt: str) -> list[TokenStream]:
        """The prompt's tokens at their context columns (paint-with-words maps phrases onto
        them): the first tower's; SDXL's two towers tokenize alike and share the positions
        (their states are concatenated on the feature axis)."""
        tokenizer = self.towers[0][0]
        ids, mask = tokenize(tokenizer, [self._as_read(prompt)], self.context_length(),
                             "prompt")
        ids = tuple(int(i) for i in ids[0, : int(mask[0].sum())])
        name = "t5" if self.t5 else "clip"
        return [TokenStream(name, 0, tuple(tokenizer.convert_ids_to_tokens(list(ids))), ids)]

    def phrase_tokens(self, stream: str, phrase: str) -> TokenStream:
        tokenizer = self.towers[0][0]
        ids = tuple(tokenizer(self._as_read(phrase), add_special_tokens=False)["input_ids"])
        return TokenStream(stream, 0, tuple(tokenizer.convert_ids_to_tokens(list(ids))), ids)

    def paint_masks(self, prompts: Sequence[str], masks, scale: float = 1.0,
                    negative: bool = False) -> np.ndarray:
        """PromptConditioning.paint [B, H, W, L] (L: context_length()): each phrase's mask x
        strength x `scale` in the columns of its tokens (every occurrence); `masks`
        PhraseMasks shared by every prompt, or one sequence per prompt (an empty one:
        zeros). A phrase missing from a prompt is a PaintError naming both token lists.
        `negative`: `prompts` are the negative prompts, the result negative_paint (the
        negative prompts tokenize as the prompts do; only the errors say which is meant)."""
        return batch_token_masks(self, prompts, masks, self.context_length(), scale,
                                 "negative prompt" if negative else "prompt")

    def token_ids(self, prompt: str, tower: int = 0) -> np.ndarray:
        return np.asarray(self.towers[tower][0](prompt)["input_ids"], np.int32)
