"""Precomputed conditioning inside dataset records: how it is stored and read back.

`train.precompute` runs the encoders once over a dataset; each record then carries a `cond`
dict holding only the real tokens (T5 and CLIP token rows up to their mask's length, so a
12-token caption stores 12 rows, not 128), the pooled CLIP vector and, when images were
encoded, the CLIP image embedding, in float16 or bfloat16 (kept as its uint16 bit pattern:
msgpack has no bfloat16). The sidecar's metadata["conditioning"] says which parts and dtype.
`UnpackConditioning` pads them back to the U-Net's fixed shapes with masks, as float32, in the
input pipeline, so training never runs an encoder.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import numpy as np

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
PARTS = ("t5", "clip_text", "clip_image")


def _to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(x, ml_dtypes.bfloat16).view(np.uint16)
    return np.asarray(x, dtype)


def _from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(x, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    return np.asarray(x, np.float32)


def pack(cond, i: int, parts, dtype: str) -> dict[str, np.ndarray]:
    """Example `i` of a (numpy) Conditioning batch as stored fields."""
    out = {}
    if "t5" in parts:
        n = int(cond.t5_mask[i].sum())
        out["t5_tokens"] = _to_storage(cond.t5_tokens[i, :n], dtype)
    if "clip_text" in parts:
        n = int(cond.clip_mask[i].sum())
        out["clip_tokens"] = _to_storage(cond.clip_tokens[i, :n], dtype)
        out["clip_pooled"] = _to_storage(cond.clip_pooled[i], dtype)
    if "clip_image" in parts:
        out["clip_image"] = _to_storage(cond.clip_image[i], dtype)
    return out


@dataclasses.dataclass(frozen=True)
class ConditioningLayout:
    """The U-Net's conditioning shapes (from a UNetConfig) and how records store it."""

    t5_length: int
    t5_dim: int
    clip_length: int
    clip_dim: int
    clip_pooled_dim: int
    clip_image_dim: int
    dtype: str = "float16"

    @classmethod
    def for_model(cls, model, dtype: str) -> "ConditioningLayout":
        return cls(model.t5_length, model.t5_dim, model.clip_length, model.clip_dim,
                   model.clip_pooled_dim, model.clip_image_dim, dtype)

    def check(self, features: Mapping[str, Any], where: str) -> None:
        """The stored widths (sidecar feature shapes of the first record) must fit the model."""
        stored = (features.get("cond") or {}).get("features", {})
        want = {"t5_tokens": self.t5_dim, "clip_tokens": self.clip_dim,
                "clip_pooled": self.clip_pooled_dim, "clip_image": self.clip_image_dim}
        for name, info in stored.items():
            width = info["shape"][-1] if info.get("shape") else None
            if name in want and width != want[name]:
                raise ValueError(f"{where}: stored {name} have width {width}, the model expects "
                                 f"{want[name]}; precompute with encoders that match the model")

    def unpack(self, stored: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stored fields -> the six fixed-shape float32 Conditioning fields (absent: zeros)."""

        def tokens(name, length, dim):
            x = np.zeros((length, dim), np.float32)
            mask = np.zeros((length,), np.float32)
            if name in stored:
                rows = _from_storage(stored[name], self.dtype)[:length]
                x[: len(rows)] = rows
                mask[: len(rows)] = 1.0
            return x, mask

        def vector(name, dim):
            return _from_storage(stored[name], self.dtype) if name in stored else np.zeros(dim, np.float32)

        t5, t5_mask = tokens("t5_tokens", self.t5_length, self.t5_dim)
        clip, clip_mask = tokens("clip_tokens", self.clip_length, self.clip_dim)
        return {"t5_tokens": t5, "t5_mask": t5_mask, "clip_tokens": clip, "clip_mask": clip_mask,
                "clip_pooled": vector("clip_pooled", self.clip_pooled_dim),
                "clip_image": vector("clip_image", self.clip_image_dim)}


class UnpackConditioning(grain.transforms.Map):
    """Pipeline step: a record's stored `cond` -> fixed-shape float32 conditioning fields."""

    def __init__(self, layout: ConditioningLayout):
        self.layout = layout

    def map(self, element: dict) -> dict:
        return {**element, "cond": self.layout.unpack(element["cond"])}
