"""The sampling pipeline, one entry point for notebooks, servers and other trainers:

    from ediffi_jax import pipeline
    sampler = pipeline.load("runs/tiny/ensemble.json")   # a run, an export, an ensemble, a cascade
    images = sampler.sample(["a red circle"], seed=0)     # uint8 [N, H, W, 3]

`sample` takes `paint=` (a Paint, or {phrase: [H, W] mask in [0, 1]} at the output size),
`style_images=` (one reference image per prompt), `resolution=` (past the native size with the
stage's highres settings, e.g. overrides=["highres.method=scalecrafter"]) and `first_index=`
(example i of seed s is the same image in any batch). `sampler.each_stage(...)` yields every
cascade stage's images as it finishes.
"""
from __future__ import annotations

import os
from typing import Sequence

from ediffi_jax.config import read_json
from ediffi_jax.paint.bias import PaintSettings
from ediffi_jax.parallel.mesh import make_mesh
from ediffi_jax.pipeline.cascade import CascadeSampler, Stage, load_stage, read_cascade
from ediffi_jax.pipeline.generate import Paint

__all__ = ["CascadeSampler", "Paint", "PaintSettings", "Stage", "is_cascade_file", "load"]


def is_cascade_file(path: str) -> bool:
    """A cascade file ({"stages": [...]}), not an ensemble file, run or export."""
    return os.path.isfile(path) and "stages" in (read_json(path, "the pipeline file") or {})


def load(path: str, *, stages: Sequence[str] | None = None, overrides: Sequence[str] = (),
         mesh=None) -> CascadeSampler:
    """A sampler over `path`: a cascade file ({"stages": [...]}; `stages` picks a chain of
    them), or an ensemble file, a run's workdir or an export (one stage). `overrides` are
    `section.key=value` (or `stage.section.key=value` for one cascade stage) on the sampling and
    highres settings. `mesh` (default: every device on the data axis) shards each batch."""
    if is_cascade_file(path):
        chosen = read_cascade(path, list(stages or ()), overrides)
    else:
        if stages:
            raise ValueError(f"stages= selects stages of a cascade file; {path} is one ensemble")
        chosen = (load_stage(path, overrides),)
    return CascadeSampler(chosen, make_mesh((-1, 1, 1)) if mesh is None else mesh)

