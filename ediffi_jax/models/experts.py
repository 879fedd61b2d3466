"""An ensemble of expert denoisers: N parameter trees of one architecture, each owning a noise
interval. Sampling switches parameter sets per interval (diffusion/plan.py decides where)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from ediffi_jax.diffusion.intervals import ExpertInterval, validate_layout


@dataclasses.dataclass(frozen=True)
class ExpertEnsemble:
    intervals: tuple[ExpertInterval, ...]  # ordered by increasing noise, tiling (0, inf)
    params: tuple[Any, ...]  # one params tree per interval, all of the same structure

    def __post_init__(self):
        object.__setattr__(self, "intervals", tuple(self.intervals))
        object.__setattr__(self, "params", tuple(self.params))
        validate_layout(self.intervals)
        if len(self.params) != len(self.intervals):
            raise ValueError(
                f"{len(self.intervals)} expert intervals but {len(self.params)} params trees"
            )
        shapes = [jax.tree.map(lambda p: (p.shape, p.dtype), t) for t in self.params]
        for i, s in enumerate(shapes[1:], 1):
            if s != shapes[0]:
                raise ValueError(
                    f"expert {i} ({self.intervals[i].name}) has a different architecture from "
                    "expert 0; experts of one stage must share one U-Net config"
                )

    @classmethod
    def single(cls, params) -> "ExpertEnsemble":
        return cls((ExpertInterval(0, 1, "all"),), (params,))

    def __len__(self) -> int:
        return len(self.params)
