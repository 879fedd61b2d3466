"""A run's config, checked and turned into typed parts before any expensive work: the stage
(model, experts, sampling) that sampling needs, and the training, mesh, data and encoder
sections that a training run adds."""
from __future__ import annotations

import dataclasses
from typing import Any

from ediffi_jax.config import ConfigError, check_sections, section
from ediffi_jax.diffusion.intervals import ExpertInterval, resolve_layout
from ediffi_jax.diffusion.plan import SamplingConfig
from ediffi_jax.encoders.conditioner import EncodersConfig
from ediffi_jax.models.unet import UNetConfig
from ediffi_jax.parallel.distributed import DistributedConfig
from ediffi_jax.training.step import TrainConfig

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


DATASETS = ("shapes", "records")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` config section: the built-in procedural `shapes`, or ArrayRecords at `path`
    (written by `python -m ediffi_jax.data.prepare`)."""

    name: str = "shapes"
    path: str = ""
    shapes: Any = None  # ShapesConfig fields, for name == "shapes"
    # The whole training image's side (0: model.resolution); images of another size are resized
    # to it. Larger than model.resolution: patch training on random model.resolution crops.
    resolution: int = 0
    degrade: Any = None  # DegradeConfig fields (data/stage.py): an SR stage's low-res input

    def __post_init__(self):
        if self.name not in DATASETS:
            raise ValueError(f"data.name must be one of {DATASETS}, got {self.name!r}")
        if self.name == "records" and not self.path:
            raise ValueError("data.path must name an ArrayRecord dataset when data.name is 'records'")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    shape: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor); -1 fills the rest


@dataclasses.dataclass(frozen=True)
class RunSpec:
    stage: StageSpec
    train: TrainConfig
    mesh: MeshConfig
    data: DataConfig
    encoders: EncodersConfig


def run_schema() -> dict[str, type]:
    """The dataclass of each config section a training run reads (see config.load_config)."""
    return {"model": UNetConfig, "sampling": SamplingConfig, "train": TrainConfig,
            "mesh": MeshConfig, "data": DataConfig, "distributed": DistributedConfig,
            "encoders": EncodersConfig}


def parse_run(config) -> RunSpec:
    stage = parse_config(config)
    return RunSpec(
        stage=stage,
        train=section(TrainConfig, config.get("train"), "train"),
        mesh=section(MeshConfig, config.get("mesh"), "mesh"),
        data=section(DataConfig, config.get("data"), "data"),
        encoders=section(EncodersConfig, config.get("encoders"), "encoders"),
    )


def image_resolution(run: RunSpec) -> int:
    """The side of a whole training image (the model trains on patches of it when larger)."""
    return run.data.resolution or run.stage.model.resolution


def check_stage_sizes(run: RunSpec) -> None:
    """The whole image, the patch and the low-res input must nest."""
    model, full = run.stage.model, image_resolution(run)
    if full < model.resolution:
        raise ConfigError(f"data.resolution {full} is smaller than model.resolution "
                          f"{model.resolution}, the size the model trains on")
    if model.lowres_scale and full % model.lowres_scale:
        raise ConfigError(f"data.resolution {full} does not divide by model.lowres_scale "
                          f"{model.lowres_scale}")
