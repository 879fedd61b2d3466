"""The U-Net's text/image conditioning as one pytree.

eDiff-I conditions on T5 tokens, CLIP text tokens + the pooled CLIP text vector, and a CLIP image
embedding (style). Each is dropped independently in training by zeroing it (tokens and their
padding mask alike), so at sampling any subset can be given and the rest left as zeros; all zeros
is the unconditional branch of classifier-free guidance.

A super-resolution stage is also conditioned on the low-resolution image; that is not text and
is never dropped: the unconditional branch keeps it (as in Imagen's cascades).
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

PARTS = ("t5", "clip_text", "clip_image")
FIELDS = ("t5_tokens", "t5_mask", "clip_tokens", "clip_mask", "clip_pooled", "clip_image")


@flax.struct.dataclass
class Conditioning:
    t5_tokens: jax.Array  # [B, L_t5, D_t5]
    t5_mask: jax.Array  # [B, L_t5], 1 where a real token is
    clip_tokens: jax.Array  # [B, L_clip, D_clip]
    clip_mask: jax.Array  # [B, L_clip]
    clip_pooled: jax.Array  # [B, D_pooled]
    clip_image: jax.Array  # [B, D_image]
    # Paint-with-words (sampling only): per context token, the strength-weighted phrase mask
    # [B, H_mask, W_mask, L_t5 + L_clip + 2]; zeros in the unconditional branch. None: off.
    paint: jax.Array | None = None
    # Super-resolution stages: the noise-augmented low-res image upsampled to the output size
    # [B, H, W, C] in [-1, 1] (plus noise), and its augmentation level sigma [B]. None: a base stage.
    lowres: jax.Array | None = None
    lowres_sigma: jax.Array | None = None

    @property
    def batch_size(self) -> int:
        return self.t5_tokens.shape[0]

    @classmethod
    def zeros(cls, batch: int, *, t5_length: int, t5_dim: int, clip_length: int, clip_dim: int,
              clip_pooled_dim: int, clip_image_dim: int, dtype=jnp.float32) -> "Conditioning":
        z = lambda *s: jnp.zeros(s, dtype)  # noqa: E731
        return cls(
            t5_tokens=z(batch, t5_length, t5_dim),
            t5_mask=z(batch, t5_length),
            clip_tokens=z(batch, clip_length, clip_dim),
            clip_mask=z(batch, clip_length),
            clip_pooled=z(batch, clip_pooled_dim),
            clip_image=z(batch, clip_image_dim),
        )

    def keep(self, t5=None, clip_text=None, clip_image=None) -> "Conditioning":
        """Zero the parts whose per-example keep flag [B] is False (None keeps everything)."""

        def gate(x, flag):
            if flag is None:
                return x
            flag = jnp.asarray(flag).astype(x.dtype)
            return x * flag.reshape(flag.shape + (1,) * (x.ndim - 1))

        return self.replace(
            t5_tokens=gate(self.t5_tokens, t5),
            t5_mask=gate(self.t5_mask, t5),
            clip_tokens=gate(self.clip_tokens, clip_text),
            clip_mask=gate(self.clip_mask, clip_text),
            clip_pooled=gate(self.clip_pooled, clip_text),
            clip_image=gate(self.clip_image, clip_image),
        )

    def unconditional(self) -> "Conditioning":
        """Every text/image part zeroed; the low-res image of an SR stage kept."""
        zeroed = jax.tree.map(jnp.zeros_like, self.replace(lowres=None, lowres_sigma=None))
        return zeroed.replace(lowres=self.lowres, lowres_sigma=self.lowres_sigma)

    def text_only(self) -> "Conditioning":
        """The style (CLIP image) embedding zeroed: separate style guidance's middle branch."""
        return self.replace(clip_image=jnp.zeros_like(self.clip_image))


@flax.struct.dataclass
class PromptConditioning:
    """A pretrained diffusers pipeline's conditioning: what its prompt encoder gives the U-Net
    (the token embeddings, SDXL's pooled text and size/crop ids), for the prompt and for the
    negative prompt. Classifier-free guidance's unconditional branch is the negative prompt's
    encoding (diffusers' convention: an empty negative prompt is encoded, not zeroed, unless
    the pipeline forces zeros), so `unconditional()` swaps it in; the ids are shared except
    the refiner's aesthetic score."""

    context: jax.Array  # [B, L, D] encoder_hidden_states
    context_mask: jax.Array  # [B, L], 1 where the U-Net may attend
    negative_context: jax.Array
    negative_mask: jax.Array
    pooled: jax.Array | None = None  # [B, P] SDXL's text_embeds
    negative_pooled: jax.Array | None = None
    time_ids: jax.Array | None = None  # [B, 6] (SDXL base) or [B, 5] (refiner)
    negative_time_ids: jax.Array | None = None  # the refiner's: its negative aesthetic score
    # Paint-with-words token masks [B, H_mask, W_mask, L] on the prompt's tokens, and on the
    # negative prompt's: negative_paint is the negative branch's paint (zeros without it), so
    # under CFG a region painted with a negative phrase is pushed away from it. Both branches
    # run as one batch: with negative_paint, paint is needed too (zeros if nothing is).
    paint: jax.Array | None = None
    negative_paint: jax.Array | None = None
    # A super-resolution stage's input (DeepFloyd IF stage II): the upsampled, noise-augmented
    # low-res image [B, H, W, C] (VP form, as the pipeline's image_noising_scheduler makes
    # it), concatenated to the U-Net's input, and its augmentation timestep [B], the U-Net's
    # class label; the same in both CFG branches.
    lowres: jax.Array | None = None
    noise_level: jax.Array | None = None

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def unconditional(self) -> "PromptConditioning":
        paint = self.paint
        if self.negative_paint is not None:
            if paint is None:
                raise ValueError("negative_paint needs paint too (zeros where the prompt is "
                                 "not painted): CFG runs both branches as one batch")
            paint = self.negative_paint
        elif paint is not None:
            paint = jnp.zeros_like(paint)
        return self.replace(
            context=self.negative_context, context_mask=self.negative_mask,
            pooled=self.negative_pooled,
            time_ids=self.time_ids if self.negative_time_ids is None else self.negative_time_ids,
            paint=paint)
