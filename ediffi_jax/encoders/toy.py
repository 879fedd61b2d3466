"""Deterministic word embeddings for the built-in datasets: conditioning with no weights to find.

Each lower-cased word maps to fixed random vectors seeded by a stable hash of the word (one
table per token stream), so captions get T5-like and CLIP-like token sequences, a pooled vector,
and padding masks of the shapes the U-Net expects. The network's projections learn to read them.
Real T5 and CLIP encoders replace this for real data; the interface is the same: captions in,
`Conditioning` out.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from typing import Sequence

import numpy as np

from ediffi_jax.models.conditioning import Conditioning

_WORD = re.compile(r"[a-z0-9]+")


@functools.lru_cache(maxsize=65536)
def _word_vector(word: str, stream: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng([zlib.crc32(word.encode()), stream, dim])
    return rng.standard_normal(dim).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WordEncoder:
    t5_dim: int
    t5_length: int
    clip_dim: int
    clip_length: int
    clip_pooled_dim: int
    clip_image_dim: int
    clip_vision = None  # no image tower (PretrainedEncoder's attribute of the same name)

    @classmethod
    def for_model(cls, model) -> "WordEncoder":
        """Sizes from a UNetConfig."""
        return cls(model.t5_dim, model.t5_length, model.clip_dim, model.clip_length,
                   model.clip_pooled_dim, model.clip_image_dim)

    def _tokens(self, words, stream, dim, length):
        tokens = np.zeros((length, dim), np.float32)
        mask = np.zeros((length,), np.float32)
        for i, w in enumerate(words[:length]):
            tokens[i] = _word_vector(w, stream, dim)
            mask[i] = 1.0
        return tokens, mask

    def token_streams(self, prompt: str):
        """The prompt's words as the T5-like and CLIP-like streams see them (paint-with-words)."""
        from ediffi_jax.paint.masks import TokenStream

        words = tuple(_WORD.findall(prompt.lower()))
        return [TokenStream("t5", 0, words[: self.t5_length], words[: self.t5_length]),
                TokenStream("clip", self.t5_length, words[: self.clip_length],
                            words[: self.clip_length])]

    def phrase_tokens(self, stream: str, phrase: str):
        from ediffi_jax.paint.masks import TokenStream

        words = tuple(_WORD.findall(phrase.lower()))
        return TokenStream(stream, 0, words, words)

    def encode(self, captions: Sequence[str], images=None) -> Conditioning:
        """Captions -> Conditioning (numpy arrays; the CLIP image embedding is zeros)."""
        if images is not None:
            from ediffi_jax.config import ConfigError

            raise ConfigError("style images need a CLIP vision tower: the built-in word "
                              "embeddings have none (set encoders.clip_vision)")
        t5, t5m, clip, clipm, pooled = [], [], [], [], []
        for caption in captions:
            words = _WORD.findall(caption.lower())
            a, am = self._tokens(words, 0, self.t5_dim, self.t5_length)
            b, bm = self._tokens(words, 1, self.clip_dim, self.clip_length)
            bag = sum((_word_vector(w, 2, self.clip_pooled_dim) for w in words),
                      np.zeros(self.clip_pooled_dim, np.float32))
            t5.append(a), t5m.append(am), clip.append(b), clipm.append(bm)
            pooled.append(bag / max(1.0, np.sqrt(len(words))))
        n = len(captions)
        return Conditioning(
            t5_tokens=np.stack(t5), t5_mask=np.stack(t5m),
            clip_tokens=np.stack(clip), clip_mask=np.stack(clipm),
            clip_pooled=np.stack(pooled),
            clip_image=np.zeros((n, self.clip_image_dim), np.float32),
        )
