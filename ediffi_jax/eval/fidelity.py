"""Prompt fidelity on the built-in shapes data, read from generated pixels alone.

Two measures, both thin layers over the checker in `ediffi_jax.data.shapes` (which owns every
threshold and the caption grammar):

- `prompt_fidelity`: per-attribute rates (colour, shape, count, and size / position where the
  caption states them) of images against their own captions; `all` is the x axis of the
  guidance sweep (eDiff-I's Figure 7 plots FID against CLIP score; on shapes the checker is an
  exact stand-in for "does the image show the prompt").
- `paint_position_accuracy`: for paint-with-words, whether the objects of each painted colour
  sit in that colour's painted cells of the 3 x 3 grid (each centroid inside a painted cell).
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


def paint_position_accuracy(images, targets: Sequence[Sequence[tuple[str, Sequence[str]]]],
                            *, min_area: int | None = None) -> dict:
    """Paint-with-words position accuracy of a batch. `targets[i]` lists image i's painted
    objects as (colour, cells), e.g. `[("red", ["left"]), ("blue", ["right"])]`. Returns
    `{"n", "placed", "one_per_region", "objects_placed"}`: the rates of images whose every
    target passes `paint_placement` (placed; one per region), and the rate over all targets."""
    if len(images) != len(targets):
        raise ValueError(f"paint_position_accuracy: {len(images)} images but {len(targets)} "
                         f"target lists")
    if not len(images):
        raise ValueError("paint_position_accuracy: no images")
    if not all(len(t) for t in targets):
        raise ValueError("paint_position_accuracy: every image needs at least one target")
    hits = [np.array([paint_placement(im, c, r, min_area) for c, r in t]) for im, t in
            zip(images, targets)]
    return {"n": len(hits), "placed": float(np.mean([h[:, 0].all() for h in hits])),
            "one_per_region": float(np.mean([h[:, 1].all() for h in hits])),
            "objects_placed": float(np.concatenate([h[:, 0] for h in hits]).mean())}
