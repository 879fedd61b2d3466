"""What a run's data is, for those that sample or grade it: the built-in shapes config it trained
on, the held-out split of it, and the words its captions can contain."""
from __future__ import annotations

import dataclasses

from ediffi_jax.config import ConfigError, section, to_dict
from ediffi_jax.data.shapes import REGIONS, ShapesConfig, ShapesSource, make_caption
from ediffi_jax.encoders.toy import caption_words

HELD_OUT_SEED_OFFSET = 1000  # the held-out shapes split: training's seed + 1000


def shapes_config(run):
    """The run's built-in shapes data (its data.shapes section); a run trained on other data
    is an error (its captions are not shapes captions)."""
    if run.data.name != "shapes":
        raise ConfigError(f"the run was trained on data.name={run.data.name!r}, not the "
                          "built-in shapes")
    return section(ShapesConfig, dict(to_dict(run.data.shapes) or {}), "data.shapes")


def held_out_shapes(run):
    """The shapes source of the held-out split (the run's data.shapes at the model's
    resolution, its seed + 1000): what sample.evaluate grades and the sweep prompts with."""
    train = shapes_config(run)
    return ShapesSource(dataclasses.replace(train, resolution=run.stage.model.resolution,
                                            seed=train.seed + HELD_OUT_SEED_OFFSET))


def training_vocabulary(run) -> frozenset[str] | None:
    """The words of every caption the run's data can make, for the word encoder's warnings:
    the built-in shapes data's are fixed by its colour, shape, size and position lists (every
    caption of each count is made once); None for ArrayRecord data (only a pass over every
    record would tell)."""
    if run.data.name != "shapes":
        return None
    cfg = shapes_config(run)
    # A mixed scene joins one single-object caption per object with "and".
    counts = (1,) if cfg.mixed else range(cfg.min_objects, cfg.max_objects + 1)
    words = {"and"} if cfg.mixed and cfg.max_objects > 1 else set()
    for colour in cfg.colours:
        for shape in cfg.shapes:
            for size in cfg.sizes:
                for n in counts:
                    for r in range(len(REGIONS)):  # every cell starts some set of n cells
                        cells = [REGIONS[(r + k) % len(REGIONS)] for k in range(n)]
                        words.update(caption_words(make_caption(colour, shape, size, cells,
                                                                cfg.caption_style)))
    return frozenset(words)
