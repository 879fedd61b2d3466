"""CLIP score of images against their captions, with the user's CLIP weights (local, HF layout).

The definition is Hessel et al.'s CLIP-S with the weight 100 that torchmetrics' `CLIPScore`
documents (and text-to-image papers report): for each (image, caption) pair,
100 * max(cos(E_image, E_text), 0), averaged over the pairs, with E the projected embeddings of
CLIP's vision and text towers. Hessel et al. weigh by 2.5 (multiply by 0.025 to compare).
torchmetrics' code clamps the mean instead of each pair (max(mean(100 cos), 0)); the two agree
whenever no pair has a negative cosine, as with real CLIP models on their own captions.

The towers, their Hugging Face loading, the tokenizer and CLIP's image preprocessing (bicubic
resize of the short side, centre crop, mean/std) are the encoders package's own
(`encoders.conditioner.load_clip_text/vision`, `encoders.tokenizers`, `encoders.clip`); this
module only batches, jits and compares them. A CLIPModel directory serves both towers; separate
text and vision directories work too.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ediffi_jax.encoders.clip import preprocess_images
from ediffi_jax.encoders.conditioner import load_clip_text, load_clip_vision
from ediffi_jax.encoders.tokenizers import clip_tokenizer, tokenize
from ediffi_jax.parallel.mesh import batch_sharding

SCALE = 100.0  # torchmetrics' weight w (Hessel et al. use 2.5)


def clip_scores(image_embeds, text_embeds) -> np.ndarray:
    """Per pair, 100 * max(cos(image_embeds[i], text_embeds[i]), 0): float64 [N]. Embeddings
    need not be normalised (the cosine does it)."""
    a, b = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"clip_scores: image and text embeddings must both be [N, D], got "
                         f"{a.shape} and {b.shape}")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return SCALE * np.maximum(cos, 0.0)


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPScorer:
    """CLIP text and vision towers loaded once; embeddings come out unit-normalised.

    Each tower runs jitted on batches of `batch_size` (rounded up to the mesh's batch shards,
    the last batch padded), so one compile serves any number of images or captions.
    """

    def __init__(self, text_dir: str, vision_dir: str | None = None, *, dtype: str = "float32",
                 batch_size: int = 64, mesh=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.text_dir = text_dir
        self.text = load_clip_text(text_dir, dtype, mesh)
        self.vision = load_clip_vision(vision_dir or text_dir, dtype, mesh)
        t, v = self.text.config.projection_dim, self.vision.config.projection_dim
        if t != v:
            raise ValueError(f"the text tower projects to {t} dimensions, the vision tower to {v}: "
                             "they must come from one CLIP model")
        self.mesh = mesh
        self._shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-batch_size // self._shards) * self._shards
        text_module, vision_module = self.text.module, self.vision.module
        self._text_fn = jax.jit(
            lambda p, ids, mask: _unit(text_module.apply({"params": p}, ids, mask)[2]))
        self._vision_fn = jax.jit(lambda p, x: _unit(vision_module.apply({"params": p}, x)[2]))

    @functools.cached_property
    def tokenizer(self):
        return clip_tokenizer(self.text_dir)

    def _batched(self, fn, params, *arrays) -> np.ndarray:
        total = len(arrays[0])
        if total == 0:
            raise ValueError("CLIPScorer: nothing to embed")
        # A set smaller than a batch runs as one batch of its size (rounded up to the shards).
        step = min(self.batch_size, -(-total // self._shards) * self._shards)
        out = []
        for start in range(0, total, step):
            chunk = [np.asarray(a[start:start + step]) for a in arrays]
            count = len(chunk[0])
            chunk = [np.concatenate([c, np.zeros((step - count, *c.shape[1:]), c.dtype)])
                     if count < step else c for c in chunk]
            out.append(np.asarray(fn(params, *map(self._place, chunk)), np.float32)[:count])
        return np.concatenate(out)

    def _place(self, x):
        if self.mesh is None:
            return jnp.asarray(x)

        return jax.device_put(x, batch_sharding(self.mesh, x.ndim))

    def text_embeddings_from_ids(self, ids, mask) -> np.ndarray:
        """Unit text embeddings [N, P] of token ids and attention masks [N, L]."""
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        vocab = self.text.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}) for {self.text_dir}, got "
                             f"{ids.min()}..{ids.max()}: the tokenizer is not this model's")
        return self._batched(self._text_fn, self.text.params, ids, mask)

    def text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        """Unit text embeddings [N, P] of captions (tokenized to the tower's positions;
        longer captions are truncated with a warning, as torchmetrics does)."""
        ids, mask = tokenize(self.tokenizer, list(captions),
                             self.text.config.max_position_embeddings, "CLIP-score caption")
        return self.text_embeddings_from_ids(ids, mask)

    def pixel_embeddings(self, pixels) -> np.ndarray:
        """Unit image embeddings [N, P] of CLIP-preprocessed pixels [N, S, S, 3] (NHWC)."""
        return self._batched(self._vision_fn, self.vision.params, np.asarray(pixels, np.float32))

    def image_embeddings(self, images) -> np.ndarray:
        """Unit image embeddings [N, P] of uint8 images [N, H, W, 3] (or PIL images), through
        CLIP's preprocessing at the tower's size, a batch at a time."""
        size = self.vision.config.image_size
        out = [self.pixel_embeddings(preprocess_images(images[i:i + self.batch_size], size))
               for i in range(0, len(images), self.batch_size)]
        if not out:
            raise ValueError("CLIPScorer: no images")
        return np.concatenate(out)

    def scores(self, images, captions: Sequence[str]) -> np.ndarray:
        """Per pair CLIP score, float64 [N]."""
        if len(images) != len(captions):
            raise ValueError(f"CLIP score: {len(images)} images but {len(captions)} captions")
        return clip_scores(self.image_embeddings(images), self.text_embeddings(captions))

    def __call__(self, images, captions: Sequence[str]) -> float:
        """The CLIP score of a set: the mean over its (image, caption) pairs."""
        return float(self.scores(images, captions).mean())
