"""Deterministic word embeddings for the built-in datasets: conditioning with no weights to find.

Each lower-cased word maps to fixed random vectors seeded by a stable hash of the word (one
table per token stream), so captions get T5-like and CLIP-like token sequences, a pooled vector,
and padding masks of the shapes the U-Net expects. The network's projections learn to read them.
Real T5 and CLIP encoders replace this for real data; the interface is the same: captions in,
`Conditioning` out.

A word outside the training captions gets a vector like any other, one the network never learnt
to read: given the training `vocabulary`, `check_words` (which the samplers call once per batch;
training does not) warns about such words, and about prompts with more words than the token
streams hold.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
import zlib
from typing import Sequence

import numpy as np

from ediffi_jax.config import ConfigError
from ediffi_jax.models.conditioning import Conditioning
from ediffi_jax.paint.masks import TokenStream

_WORD = re.compile(r"[a-z0-9]+")
log = logging.getLogger(__name__)


def caption_words(text: str) -> list[str]:
    """The words the embeddings see: lower-cased runs of letters and digits."""
    return _WORD.findall(text.lower())


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
    vocabulary: frozenset[str] | None = None  # the training captions' words (None: unknown)
    clip_vision = None  # no image tower (PretrainedEncoder's attribute of the same name)

    @classmethod
    def for_model(cls, model, vocabulary=None) -> "WordEncoder":
        """Sizes from a UNetConfig."""
        return cls(model.t5_dim, model.t5_length, model.clip_dim, model.clip_length,
                   model.clip_pooled_dim, model.clip_image_dim,
                   None if vocabulary is None else frozenset(vocabulary))

    def check_words(self, captions: Sequence[str]) -> None:
        """Warn (a line each) about words the model never saw (if the vocabulary is known) and
        about prompts cut to the token streams' lengths (the pooled vector reads every word)."""
        prompts = list(dict.fromkeys(captions))
        if self.vocabulary is not None:
            unknown = {}
            for c in prompts:
                new = [w for w in dict.fromkeys(caption_words(c)) if w not in self.vocabulary]
                if new:
                    unknown[c] = new
            if unknown:
                words = ", ".join(dict.fromkeys(w for ws in unknown.values() for w in ws))
                named = ", ".join(repr(c) for c in list(unknown)[:3])
                more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
                log.warning("prompt%s %s%s: words the model never saw in training: %s (it "
                            "knows: %s)", "s" if len(unknown) > 1 else "", named, more, words,
                            ", ".join(sorted(self.vocabulary)))
        keep = min(self.t5_length, self.clip_length)
        cut = [c for c in prompts if len(caption_words(c)) > keep]
        if cut:
            n = len(caption_words(cut[0]))
            log.warning("%d of %d prompts have more words than the context holds (T5 tokens: %d, "
                        "CLIP tokens: %d) and are cut, e.g. %r: %d words, %d dropped from the T5 "
                        "tokens and %d from the CLIP tokens", len(cut), len(prompts),
                        self.t5_length, self.clip_length, cut[0], n,
                        max(0, n - self.t5_length), max(0, n - self.clip_length))

    def _tokens(self, words, stream, dim, length):
        tokens = np.zeros((length, dim), np.float32)
        mask = np.zeros((length,), np.float32)
        for i, w in enumerate(words[:length]):
            tokens[i] = _word_vector(w, stream, dim)
            mask[i] = 1.0
        return tokens, mask

    def token_streams(self, prompt: str):
        """The prompt's words as the T5-like and CLIP-like streams see them (paint-with-words)."""
        words = tuple(caption_words(prompt))
        return [TokenStream("t5", 0, words[: self.t5_length], words[: self.t5_length]),
                TokenStream("clip", self.t5_length, words[: self.clip_length],
                            words[: self.clip_length])]

    def phrase_tokens(self, stream: str, phrase: str):
        words = tuple(caption_words(phrase))
        return TokenStream(stream, 0, words, words)

    def encode(self, captions: Sequence[str], images=None) -> Conditioning:
        """Captions -> Conditioning (numpy arrays; the CLIP image embedding is zeros)."""
        if images is not None:
            raise ConfigError("style images need a CLIP vision tower: the built-in word "
                              "embeddings have none (set encoders.clip_vision)")
        t5, t5m, clip, clipm, pooled = [], [], [], [], []
        for caption in captions:
            words = caption_words(caption)
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
