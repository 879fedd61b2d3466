"""Prompt fidelity on the built-in shapes data, read from generated pixels alone.

Two measures, both thin layers over the checker in `ediffi_jax.data.shapes` (which owns every
threshold and the caption grammar):

- `prompt_fidelity`: per-attribute rates (colour, shape, count, and size / position where the
  caption states them) of images against their own captions; `all` is the x axis of the
  guidance sweep (eDiff-I's Figure 7 plots FID against CLIP score; on shapes the checker is an
  exact stand-in for "does the image show the prompt").
- `paint_position_accuracy`: for paint-with-words, whether the objects of the asked colour sit
  in the painted cells of the 3 x 3 grid (each centroid inside a painted cell).
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


def paint_placement(image, colour: str, regions: Sequence[str],
                    min_area: int | None = None) -> tuple[bool, bool]:
    """(placed, one per region) for one image painted with `regions` (cell names of
    `shapes.REGIONS`): placed when there is at least one object of `colour` and every one has
    its centroid inside a painted cell; one per region when, further, the objects' cells are
    exactly the painted cells (one object in each)."""
    unknown = [r for r in regions if r not in shapes.REGIONS]
    if unknown:
        raise ValueError(f"unknown regions {unknown}; allowed: {list(shapes.REGIONS)}")
    res = np.asarray(image).shape[0]
    cells = [shapes.region_of(x, y, res)
             for x, y in shapes.object_centroids(image, colour, min_area)]
    inside = bool(cells) and all(c in regions for c in cells)
    return inside, inside and sorted(cells) == sorted(regions)


def paint_position_accuracy(images, colours: Sequence[str], regions: Sequence[Sequence[str]],
                            *, min_area: int | None = None) -> dict:
    """Paint-with-words position accuracy of a batch: `{"n", "placed", "one_per_region"}`, the
    rates of `paint_placement` over images, their asked colours and their painted cells."""
    if not len(images) == len(colours) == len(regions):
        raise ValueError(f"paint_position_accuracy: {len(images)} images, {len(colours)} colours "
                         f"and {len(regions)} region sets")
    if not len(images):
        raise ValueError("paint_position_accuracy: no images")
    hits = np.array([paint_placement(im, c, r, min_area) for im, c, r in zip(images, colours,
                                                                            regions)])
    return {"n": len(hits), "placed": float(hits[:, 0].mean()),
            "one_per_region": float(hits[:, 1].mean())}
