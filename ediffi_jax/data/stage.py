"""A cascade stage's training examples, made on the host in the grain pipeline: the image at the
stage's resolution, for a super-resolution stage a degraded low-resolution copy (eDiff-I trains
its SR stages on randomly degraded inputs so they learn to remove the previous stage's
artefacts: blur, a random resampling filter, JPEG compression), and a random patch for
patch-trained stages (the paper's SR1024 trains on 256 crops and samples the whole image).

The low-res copy stays whole; the train step upsamples it and cuts out the same window as the
image's patch (`crop`, top-left corner), so the patch sees exactly what the whole image would.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageFilter

FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
           "box": Image.BOX, "lanczos": Image.LANCZOS}


@dataclasses.dataclass(frozen=True)
class DegradeConfig:
    """The `data.degrade` section: random degradations of an SR stage's low-res input."""

    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.2, 1.0)  # Gaussian blur at the high resolution, pixels
    filters: tuple[str, ...] = ("bicubic", "bilinear", "box", "lanczos")  # downsampling, uniform
    jpeg_prob: float = 0.3
    jpeg_quality: tuple[int, int] = (50, 95)

    def __post_init__(self):
        for name in ("blur_sigma", "filters", "jpeg_quality"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("blur_prob", "jpeg_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        unknown = [f for f in self.filters if f not in FILTERS]
        if unknown or not self.filters:
            raise ValueError(f"filters {list(self.filters)}: each must be one of {sorted(FILTERS)}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ValueError(f"blur_sigma must be (lo, hi) with 0 < lo <= hi, got {self.blur_sigma}")
        q_lo, q_hi = self.jpeg_quality
        if not 1 <= q_lo <= q_hi <= 100:
            raise ValueError(f"jpeg_quality must be (lo, hi) in [1, 100], got {self.jpeg_quality}")


def resize(image: np.ndarray, size: int, resample=Image.LANCZOS) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C] (PIL: antialiased when shrinking)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), resample))


def degrade(image: np.ndarray, size: int, cfg: DegradeConfig, rng: np.random.Generator) -> np.ndarray:
    """A random degraded low-res copy of a uint8 image: maybe blur, resample to `size` with a
    random filter, maybe JPEG-compress."""
    pil = Image.fromarray(image)
    if rng.random() < cfg.blur_prob:
        pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(*cfg.blur_sigma))))
    pil = pil.resize((size, size), FILTERS[cfg.filters[int(rng.integers(len(cfg.filters)))]])
    if rng.random() < cfg.jpeg_prob:
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(rng.integers(cfg.jpeg_quality[0],
                                                                 cfg.jpeg_quality[1] + 1)))
        pil = Image.open(io.BytesIO(buffer.getvalue())).convert(pil.mode)
    return np.asarray(pil)


class StageExample(grain.transforms.RandomMap):
    """example["image"] -> the stage's view of it: resized to `resolution` (the whole training
    image), a `patch` x `patch` window of it (patch < resolution), and for `lowres_scale` > 0
    the degraded whole low-res image ("lowres") and the window's corner ("crop", int32 [2])."""

    def __init__(self, resolution: int, patch: int, lowres_scale: int = 0,
                 degrade_config: DegradeConfig | None = None):
        if patch > resolution:
            raise ValueError(f"patch {patch} is larger than the image resolution {resolution}")
        if lowres_scale and resolution % lowres_scale:
            raise ValueError(f"resolution {resolution} does not divide by lowres_scale {lowres_scale}")
        self.resolution, self.patch, self.lowres_scale = resolution, patch, lowres_scale
        self.degrade_config = degrade_config or DegradeConfig()

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = resize(np.asarray(element["image"], np.uint8), self.resolution)
        out = dict(element)
        if self.lowres_scale:
            out["lowres"] = degrade(image, self.resolution // self.lowres_scale,
                                    self.degrade_config, rng)
        y, x = (int(v) for v in rng.integers(0, self.resolution - self.patch + 1, size=2))
        out["image"] = image[y:y + self.patch, x:x + self.patch]
        if self.lowres_scale:
            out["crop"] = np.asarray([y, x], np.int32)
        return out
