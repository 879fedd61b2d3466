"""Prompts (and optional style images) -> the U-Net's `Conditioning`, in one place.

The `encoders` config section names local Hugging Face directories: `t5` (a T5 or T5 v1.1
checkpoint with its tokenizer), `clip_text` and `clip_vision` (CLIP checkpoints: one CLIPModel
directory may serve both). Each part may be absent; its conditioning is then zeros, as the
training dropout taught the U-Net. With none of them the built-in word embeddings
(`toy.WordEncoder`) stand in, which is what the CPU demo on `shapes` uses.

What the U-Net gets: T5 last hidden states (t5_length tokens, default 128, masked to the real
tokens); CLIP text last hidden states (77 tokens, masked through end-of-text) and the projected
pooled vector; the projected CLIP image embedding of the style image. Towers run jitted, with
the batch sharded over a mesh when one is given.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.config import ConfigError
from ediffi_jax.encoders import clip, hf, t5
from ediffi_jax.encoders.tokenizers import clip_tokenizer, load_tokenizer, tokenize
from ediffi_jax.encoders.toy import WordEncoder
from ediffi_jax.models.conditioning import Conditioning
from ediffi_jax.paint.masks import TokenStream
from ediffi_jax.parallel.mesh import batch_sharding, logical_shardings


@dataclasses.dataclass(frozen=True)
class EncodersConfig:
    """The `encoders` config section: local checkpoint directories, "" for an absent part."""

    t5: str = ""
    clip_text: str = ""
    clip_vision: str = ""
    dtype: str = "float32"  # compute dtype of the towers (bfloat16 on accelerators)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"encoders.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def pretrained(self) -> bool:
        return bool(self.t5 or self.clip_text or self.clip_vision)


@dataclasses.dataclass
class Tower:
    """One loaded encoder: its module, params and a jitted apply."""

    module: nn.Module
    params: Any
    config: Any
    directory: str
    apply: Callable = dataclasses.field(repr=False, default=None)

    def __post_init__(self):
        self.apply = jax.jit(lambda p, *args: self.module.apply({"params": p}, *args))


def _abstract_tower(directory, config_cls, module_cls, example_args, dtype):
    """(config, module, params as boxed ShapeDtypeStructs) from config.json alone."""
    cfg = config_cls.from_hf(hf.read_config(directory), dtype=dtype)
    module = module_cls(cfg)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args(cfg))["params"])
    return cfg, module, boxed


def abstract_text_tower(directory: str, dtype: str = "float32"):
    """(config, module, boxed abstract params) of a T5 or CLIP text tower's folder, by its
    config's model_type: what a planner needs without the weights."""
    if hf.read_config(directory).get("model_type") == "t5":
        return _abstract_tower(directory, t5.T5Config, t5.T5Encoder, _text_args, dtype)
    return _abstract_tower(directory, clip.CLIPTextConfig, clip.CLIPTextTower, _text_args, dtype)


def _load_tower(directory, config_cls, module_cls, hf_names, example_args, dtype, mesh) -> Tower:
    """Read config.json, build the module, load its params (sharded over `mesh` if given)."""
    cfg, module, boxed = _abstract_tower(directory, config_cls, module_cls, example_args, dtype)
    shardings = None
    if mesh is not None:
        shardings = logical_shardings(boxed, mesh)
    params = hf.load(directory, hf_names(cfg), nn.meta.unbox(boxed), shardings)
    if shardings is None:
        params = jax.tree.map(jnp.asarray, params)
    return Tower(module, params, cfg, directory)


def _text_args(cfg):
    ids = jnp.zeros((1, 4), jnp.int32)
    return ids, ids


def load_t5(directory: str, dtype: str = "float32", mesh=None) -> Tower:
    return _load_tower(directory, t5.T5Config, t5.T5Encoder, t5.hf_names, _text_args, dtype, mesh)


def load_clip_text(directory: str, dtype: str = "float32", mesh=None) -> Tower:
    return _load_tower(directory, clip.CLIPTextConfig, clip.CLIPTextTower, clip.text_hf_names,
                       _text_args, dtype, mesh)


def load_clip_vision(directory: str, dtype: str = "float32", mesh=None) -> Tower:
    pixels = lambda cfg: (jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels)),)  # noqa: E731
    return _load_tower(directory, clip.CLIPVisionConfig, clip.CLIPVisionTower,
                       clip.vision_hf_names, pixels, dtype, mesh)


BUCKET = 32  # text lengths are run at multiples of this (one compile per bucket)


class PretrainedEncoder:
    """T5 + CLIP text + CLIP vision, each optional, sized for one U-Net config."""

    def __init__(self, cfg: EncodersConfig, model, mesh=None, vocabulary=None):
        self.model, self.mesh = model, mesh
        self.t5 = load_t5(cfg.t5, cfg.dtype, mesh) if cfg.t5 else None
        self.clip_text = load_clip_text(cfg.clip_text, cfg.dtype, mesh) if cfg.clip_text else None
        self.clip_vision = (load_clip_vision(cfg.clip_vision, cfg.dtype, mesh)
                            if cfg.clip_vision else None)
        self.t5_tokenizer = load_tokenizer(cfg.t5) if cfg.t5 else None
        self.clip_tokenizer = clip_tokenizer(cfg.clip_text) if cfg.clip_text else None
        # No text encoder at all (a CLIP image tower alone): the word vectors give the text.
        self.words = (None if (cfg.t5 or cfg.clip_text)
                      else WordEncoder.for_model(model, vocabulary))
        checks = []
        if self.t5:
            checks.append(("model.t5_dim", model.t5_dim, "encoders.t5 d_model", self.t5.config.d_model))
        if self.clip_text:
            c = self.clip_text.config
            checks += [("model.clip_dim", model.clip_dim, "encoders.clip_text hidden_size", c.hidden_size),
                       ("model.clip_pooled_dim", model.clip_pooled_dim,
                        "encoders.clip_text projection_dim", c.projection_dim)]
            if model.clip_length > c.max_position_embeddings:
                raise ConfigError(f"model.clip_length {model.clip_length} exceeds the CLIP text "
                                  f"tower's {c.max_position_embeddings} positions")
        if self.clip_vision:
            checks.append(("model.clip_image_dim", model.clip_image_dim,
                           "encoders.clip_vision projection_dim", self.clip_vision.config.projection_dim))
        for mine, a, theirs, b in checks:
            if a != b:
                raise ConfigError(f"{mine} is {a} but {theirs} is {b}: they must agree")

    def _shard(self, x):
        if self.mesh is None:
            return jnp.asarray(x)

        return jax.device_put(x, batch_sharding(self.mesh, np.ndim(x)))

    def _run_text(self, tower, ids, mask):
        """The tower on the shortest length bucket (a multiple of 32) that holds every prompt's
        tokens, its hidden states zero-padded back: exact, since keys past a prompt are masked
        (T5: relative positions; CLIP: causal), and short captions cost a fraction of the full
        length (0.23x at 32 of 128 tokens for T5-small, benchmarks/t5_encode.py)."""
        vocab = tower.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):  # the lookup would give NaN

            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise ConfigError(f"token id {bad} is outside the vocabulary of {tower.directory} "
                              f"({vocab} ids): the tokenizer does not belong to this checkpoint")
        length = ids.shape[1]
        bucket = min(length, max(BUCKET, -(-int(mask.sum(1).max()) // BUCKET) * BUCKET))
        out = tower.apply(tower.params, self._shard(ids[:, :bucket]), self._shard(mask[:, :bucket]))
        hidden, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        hidden = np.asarray(hidden, np.float32) * mask[:, :bucket, None]
        padded = np.zeros(ids.shape + hidden.shape[-1:], np.float32)
        padded[:, :bucket] = hidden
        return (padded, *(np.asarray(r, np.float32) for r in rest))

    def encode(self, captions: Sequence[str], images=None) -> Conditioning:
        """float32 numpy Conditioning for `captions`; `images` (one per caption, or None to
        leave the CLIP image embedding zero) are style references."""
        m = self.model
        if self.words is not None:
            out = self.words.encode(captions)
        else:
            out = jax.tree.map(np.asarray, m.zero_conditioning(len(captions)))
        parts = {}
        if self.t5 is not None:
            ids, mask = tokenize(self.t5_tokenizer, captions, m.t5_length, "T5 prompt")
            parts["t5_tokens"], = self._run_text(self.t5, ids, mask)
            parts["t5_mask"] = mask.astype(np.float32)
        if self.clip_text is not None:
            ids, mask = tokenize(self.clip_tokenizer, captions, m.clip_length, "CLIP prompt")
            parts["clip_tokens"], _, parts["clip_pooled"] = self._run_text(self.clip_text, ids, mask)
            parts["clip_mask"] = mask.astype(np.float32)
        if images is not None:
            parts["clip_image"] = self.encode_images(images)
        return out.replace(**parts)

    def check_words(self, captions: Sequence[str]) -> None:
        """The word encoder's warnings where it gives the text (the tokenizers warn about cut
        prompts as they encode)."""
        if self.words is not None:
            self.words.check_words(captions)

    def token_streams(self, prompt: str):
        """The prompt's tokens in each present stream, with their context offsets (T5 tokens
        first, then CLIP's), as `encode` feeds them (paint-with-words maps phrases onto them)."""
        if self.words is not None:
            return self.words.token_streams(prompt)
        m, out = self.model, []
        for name, tok, length, offset, present in (
                ("t5", self.t5_tokenizer, m.t5_length, 0, self.t5),
                ("clip", self.clip_tokenizer, m.clip_length, m.t5_length, self.clip_text)):
            if present is None:
                continue
            ids, mask = tokenize(tok, [prompt], length, f"{name} prompt")
            ids = tuple(int(i) for i in ids[0, : int(mask[0].sum())])
            out.append(TokenStream(name, offset, tuple(tok.convert_ids_to_tokens(list(ids))), ids))
        return out

    def phrase_tokens(self, stream: str, phrase: str):
        if self.words is not None:
            return self.words.phrase_tokens(stream, phrase)
        tok = self.t5_tokenizer if stream == "t5" else self.clip_tokenizer
        ids = tuple(tok(phrase, add_special_tokens=False)["input_ids"])
        return TokenStream(stream, 0, tuple(tok.convert_ids_to_tokens(list(ids))), ids)

    def encode_images(self, images) -> np.ndarray:
        """[N, clip_image_dim] projected CLIP image embeddings of style images."""
        if self.clip_vision is None:
            raise ConfigError("a style image needs a CLIP vision tower: set encoders.clip_vision")
        pixels = clip.preprocess_images(images, self.clip_vision.config.image_size)
        _, _, projected = self.clip_vision.apply(self.clip_vision.params, self._shard(pixels))
        return np.asarray(projected, np.float32)


def make_conditioner(cfg: EncodersConfig, model, mesh=None, vocabulary=None):
    """The conditioning source a run uses: its pretrained encoders, else the word embeddings
    (which also stand in for the text when only a CLIP image tower is configured; given the
    training captions' `vocabulary`, their `check_words` names words outside it)."""
    if cfg.pretrained:
        return PretrainedEncoder(cfg, model, mesh, vocabulary)
    return WordEncoder.for_model(model, vocabulary)
