"""A Flax UNet2DConditionModel (models/diffusers_unet.py) written back in diffusers' own layout:
the inverse of pipeline/pretrained.py's load_component, so that an expert fine-tuned here is
read by diffusers (`UNet2DConditionModel.from_pretrained(out_dir)`) and by other tools.

    config, params = load_component(unet_dir, DiffusersUNetConfig, abstract_boxed, None)
    write_diffusers_unet("my-expert/unet", config, tuned_params, dtype="float16")

The folder holds `config.json` (the config as the loader read it, every field written out, so
diffusers builds the same architecture) and `diffusion_pytorch_model.safetensors`. The names
and layouts are the loader's own rules run backwards (hf.diffusers_names for the names,
hf.to_hf_tensors for the layouts: conv kernels HWIO -> OIHW, dense kernels transposed, norm
scales -> weight), so every tensor the loader reads is written and nothing else, and loading
the export gives back the params bit for bit (float32).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import flax.linen as nn
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ediffi_jax.atomic import atomic_directory
from ediffi_jax.encoders import hf
from ediffi_jax.models import diffusers_unet
from ediffi_jax.runs.store import DTYPES, cast_params  # train.export's dtypes and float16 check

CLASS_NAME = "UNet2DConditionModel"
WEIGHTS = "diffusion_pytorch_model"  # the stem pipeline/pretrained.py reads (WEIGHTS there)
CONFIG_FILE = "config.json"


def _as_config(config) -> diffusers_unet.DiffusersUNetConfig:
    if isinstance(config, diffusers_unet.DiffusersUNetConfig):
        return config
    if isinstance(config, Mapping):  # a config.json dict: checked as the loader checks it
        return diffusers_unet.DiffusersUNetConfig.from_hf(config)
    raise TypeError(f"config must be a DiffusersUNetConfig or a config.json dict, got "
                    f"{type(config).__name__}")


def unet_config_json(config) -> dict:
    """diffusers' config.json for `config`: every UNet2DConditionModel field as the loader
    resolved it (tuples as lists), under diffusers' class name."""
    fields = dataclasses.asdict(_as_config(config))
    return {"_class_name": CLASS_NAME, **json.loads(json.dumps(fields))}


def unet_tensors(config, params) -> dict[str, np.ndarray]:
    """`params` under their diffusers state-dict names and layouts, float32. The tree must be
    exactly the one `config` builds (as the loader's): a missing, extra or misshapen param is
    an error naming it."""
    abstract = flatten_dict(diffusers_unet.abstract_params(_as_config(config)))
    flat = flatten_dict(nn.meta.unbox(params))
    missing, extra = sorted(set(abstract) - set(flat)), sorted(set(flat) - set(abstract))
    if missing or extra:
        show = lambda paths: [("/".join(p)) for p in paths[:3]] + (  # noqa: E731
            [f"+{len(paths) - 3} more"] if len(paths) > 3 else [])
        raise ValueError(f"params do not match the config's U-Net: missing {show(missing)}, "
                         f"not in the config's U-Net {show(extra)}")
    for path, want in abstract.items():
        if tuple(np.shape(flat[path])) != tuple(want.shape):
            raise ValueError(f"param {'/'.join(path)} has shape {tuple(np.shape(flat[path]))}; "
                             f"the config's U-Net has {tuple(want.shape)}")
    names = hf.diffusers_names(unflatten_dict(abstract))
    if len({hf_name for hf_name, _ in names.values()}) != len(names):
        raise AssertionError("two params map to one diffusers name")  # the loader's rules are 1:1
    return hf.to_hf_tensors(unflatten_dict(flat), names)


def write_diffusers_unet(out_dir: str, config, params, dtype: str = "float32", *,
                         variant: str | None = None) -> str:
    """Write `params` (a DiffusersUNet's, float32 or any float dtype, numpy or jax) with
    `config` (a DiffusersUNetConfig, or a config.json dict) as a diffusers U-Net folder
    `out_dir`: config.json + diffusion_pytorch_model[.{variant}].safetensors, tensors stored
    as `dtype` (float32, float16 or bfloat16; float16 refuses values beyond its range).
    Atomic: a temporary sibling directory renamed into place, an existing `out_dir` replaced
    only on success. Non-finite params are an error naming them."""
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config = _as_config(config)
    tensors = unet_tensors(config, params)
    bad = [name for name, value in tensors.items() if not np.all(np.isfinite(value))]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError(f"non-finite params: {bad[:3]}{more}")
    tensors = {name: np.ascontiguousarray(v) for name, v in cast_params(tensors, dtype).items()}
    weights = f"{WEIGHTS}{f'.{variant}' if variant else ''}.safetensors"
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, os.path.join(tmp, weights), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(unet_config_json(config), f, indent=2, sort_keys=True)
            f.write("\n")
        # safetensors writes its file 0600; give it the umask's mode, as config.json has, so
        # the other tools (and users) the export is for can read it.
        mode = os.stat(os.path.join(tmp, CONFIG_FILE)).st_mode & 0o777
        os.chmod(os.path.join(tmp, weights), mode)
    return out_dir
