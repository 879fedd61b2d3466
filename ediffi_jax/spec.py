"""A config, checked and turned into typed parts before any expensive work."""
from __future__ import annotations

import dataclasses

from ediffi_jax.config import ConfigError, check_sections, section
from ediffi_jax.diffusion.intervals import ExpertInterval, resolve_layout
from ediffi_jax.diffusion.plan import SamplingConfig
from ediffi_jax.models.unet import UNetConfig

SECTIONS = ("name", "model", "experts", "sampling", "train", "mesh", "data", "distributed",
            "encoders")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    model: UNetConfig
    experts: tuple[ExpertInterval, ...]
    sampling: SamplingConfig


def parse_config(config) -> StageSpec:
    check_sections(config, SECTIONS)
    try:
        experts = resolve_layout(config.get("experts", "A"))
    except ValueError as e:
        raise ConfigError(f"experts: {e}") from e
    return StageSpec(
        name=config.get("name", "stage"),
        model=section(UNetConfig, config.get("model"), "model"),
        experts=experts,
        sampling=section(SamplingConfig, config.get("sampling"), "sampling"),
    )
