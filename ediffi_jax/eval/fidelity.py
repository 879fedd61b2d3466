"""Prompt fidelity on the built-in shapes data, read from generated pixels alone.

Two measures, both thin layers over the checker in `ediffi_jax.data.shapes` (which owns every
threshold and the caption grammar):

- `prompt_fidelity`: per-attribute rates (colour, shape, count, and size / position where the
  caption states them) of images against their own captions; `all` is the x axis of the
  guidance sweep (eDiff-I's Figure 7 plots FID against CLIP score; on shapes the checker is an
  exact stand-in for "does the image show the prompt").
- `paint_position_accuracy`: for paint-with-words, whether the objects of each painted colour
  sit in that colour's painted region (each centroid inside it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ediffi_jax.data import shapes


def prompt_fidelity(images, captions: Sequence[str], *, min_area: int | None = None) -> dict:
    """Rates at which `images` (uint8 [N, H, W, 3]) show their shapes `captions`:
    `{"n", "colour", "shape", "colour_shape", "count", "size", "region", "all"}` as
    `shapes.caption_accuracy` defines them (size / region None for short captions)."""
    if len(images) != len(captions):
        raise ValueError(f"prompt_fidelity: {len(images)} images but {len(captions)} captions")
    truths = [shapes.parse_caption(c) for c in captions]  # a non-shapes caption raises, naming it
    return shapes.caption_accuracy(images, truths, min_area=min_area)


def paint_placement(image, colour: str, region, min_area: int | None = None) -> bool:
    """Whether paint-with-words put `colour` where painted: at least one object of `colour`,
    and every one has its centroid inside `region` (a mask [H, W] like the image; the pixel
    under the centroid at >= 0.5)."""
    region = np.asarray(region)
    if region.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"paint_placement: region {region.shape} but image "
                         f"{np.asarray(image).shape[:2]}")
    h, w = region.shape
    centroids = shapes.object_centroids(image, colour, min_area)
    return bool(centroids) and all(region[min(int(y), h - 1), min(int(x), w - 1)] >= 0.5
                                   for x, y in centroids)


def paint_position_accuracy(images, targets, *, min_area: int | None = None) -> dict:
    """Paint-with-words position accuracy of a batch. `targets[i]` lists image i's painted
    objects as (colour, region mask), e.g. `[("red", left_half), ("blue", right_half)]`.
    Returns `{"n", "placed", "objects_placed"}`: the rate of images whose every target passes
    `paint_placement`, and the rate over all targets."""
    if len(images) != len(targets):
        raise ValueError(f"paint_position_accuracy: {len(images)} images but {len(targets)} "
                         f"target lists")
    if not len(images):
        raise ValueError("paint_position_accuracy: no images")
    if not all(len(t) for t in targets):
        raise ValueError("paint_position_accuracy: every image needs at least one target")
    hits = [[paint_placement(im, c, r, min_area) for c, r in t] for im, t in zip(images, targets)]
    return {"n": len(hits), "placed": float(np.mean([all(h) for h in hits])),
            "objects_placed": float(np.mean([x for h in hits for x in h]))}
