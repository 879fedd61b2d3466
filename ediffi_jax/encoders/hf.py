"""Hugging Face checkpoints from a local directory, read with safetensors' numpy API (no torch).

A directory in Hugging Face layout holds `config.json` and either `model.safetensors` or a
sharded `*.safetensors.index.json` with its shard files. Each Flax model declares the Hugging
Face name of every parameter and how to convert it (`hf_names` in t5.py / clip.py); this module
reads, converts and checks them, and places each tensor straight onto its sharding (each device
gets only its shard, one tensor in host memory at a time), so a T5-XXL loads onto a mesh.
The reverse (`save`) writes the same layout: how the project makes its tiny encoders.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Mapping

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from ediffi_jax.atomic import atomic_directory

INDEX_SUFFIX = ".safetensors.index.json"

# How a Hugging Face (PyTorch) tensor becomes a Flax param, and back.
_TO_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda w: w.T,  # [out, in] -> [in, out]
    "conv": lambda w: w.transpose(2, 3, 1, 0),  # OIHW -> HWIO
    "embedding": lambda w: w,
    "norm": lambda w: w,
    "raw": lambda w: w,
}
_TO_HF: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda w: w.T,
    "conv": lambda w: w.transpose(3, 2, 0, 1),
    "embedding": lambda w: w,
    "norm": lambda w: w,
    "raw": lambda w: w,
}


class CheckpointError(ValueError):
    pass


def config_from_hf(cls, hf_config: Mapping, **overrides):
    """Dataclass `cls` from the config.json fields it names; config.json's `dtype` (the
    checkpoint's storage dtype) is not our `dtype` (the compute dtype), so it is never read."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)} - {"dtype"}
    return cls(**{**{k: v for k, v in hf_config.items() if k in fields}, **overrides})


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: expected a Hugging Face config.json there")
    with open(path) as f:
        return json.load(f)


class SafetensorsDir:
    """The tensors of a directory's `{stem}[.{variant}].safetensors` or its sharded index,
    read on demand. transformers names the files `model.*`, diffusers
    `diffusion_pytorch_model.*`; a variant ("fp16", "bf16") picks e.g. `model.fp16.safetensors`
    or the index `model.safetensors.index.fp16.json`."""

    def __init__(self, directory: str, stem: str = "model", variant: str | None = None):
        from safetensors import safe_open

        self.directory = directory
        suffix = f".{variant}" if variant else ""
        single = os.path.join(directory, f"{stem}{suffix}.safetensors")
        index = os.path.join(directory, f"{stem}.safetensors.index{suffix}.json")
        indexes = [index] if os.path.isfile(index) else (
            [] if variant else sorted(glob.glob(os.path.join(directory, f"*{INDEX_SUFFIX}"))))
        if os.path.isfile(single):
            files = {None: single}
        elif indexes:
            with open(indexes[0]) as f:
                weight_map = json.load(f)["weight_map"]
            files = {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not os.path.isfile(shard):
                    raise CheckpointError(f"{indexes[0]} lists {os.path.basename(shard)}, which is "
                                          f"not in {directory}")
        else:
            present = sorted(os.path.basename(f) for f in glob.glob(os.path.join(directory, "*.safetensors*")))
            raise CheckpointError(f"{directory}: expected {os.path.basename(single)} or a sharded "
                                  f"{os.path.basename(index)} with its shards"
                                  f"{f' (found {present})' if present else ''}")
        self._handles = {}
        self._where = {}
        for path in sorted(set(files.values())):
            try:
                handle = safe_open(path, framework="numpy")
            except Exception as e:  # safetensors raises its own types for damaged files
                raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from e
            self._handles[path] = handle
            for name in handle.keys():
                self._where[name] = path

    def names(self) -> list[str]:
        return sorted(self._where)

    def get(self, name: str) -> np.ndarray:
        """`name`, or the first present of alternatives written "a|b"."""
        for candidate in name.split("|"):
            if candidate in self._where:
                return self._handles[self._where[candidate]].get_tensor(candidate)
        raise CheckpointError(f"{self.directory}: tensor {name.replace('|', ' or ')} is missing "
                              f"({len(self._where)} tensors there)")


# Buffers transformers saves beside the weights in some checkpoints: not parameters.
_BUFFERS = ("position_ids",)


def diffusers_names(abstract_params) -> dict[tuple[str, ...], tuple[str, str]]:
    """Hugging Face names of a params tree whose module names are diffusers' dotted names
    (relative to their parent, so '.'.join(path) is the state-dict module name):
    kernel -> weight (a conv if 4-d, else linear), scale -> weight (a norm),
    embedding -> weight; any other leaf (bias, a bare nn.Parameter) keeps its name."""
    names = {}
    for path, leaf in flatten_dict(abstract_params).items():
        module, last = ".".join(path[:-1]), path[-1]
        if last == "kernel":
            names[path] = (f"{module}.weight", "conv" if len(leaf.shape) == 4 else "linear")
        elif last == "scale":
            names[path] = (f"{module}.weight", "norm")
        elif last == "embedding":
            names[path] = (f"{module}.weight", "embedding")
        else:  # bias, or a bare nn.Parameter such as IF's pool.positional_embedding
            names[path] = (f"{module}.{last}", "raw")
    return names


def unused_tensors(tensors: "SafetensorsDir", names, whole_file: bool = False) -> list[str]:
    """Tensors of the module's own namespaces (the first name component of what `names` reads,
    e.g. `encoder` for T5, `text_model` for CLIP's text tower) that no param reads: weights the
    config does not ask for (more layers than `num_layers`, say), which a loader must not drop
    silently. Other towers of the same file (T5's decoder, CLIPModel's other tower) are not
    the module's and are left alone."""
    candidates = {c for hf_name, _ in names.values() for c in hf_name.split("|")}
    owned = {c.split(".")[0] for c in candidates}
    return [n for n in tensors.names() if (whole_file or n.split(".")[0] in owned)
            and n not in candidates and not n.endswith(_BUFFERS)]


def load(directory: str, names: Mapping[tuple[str, ...], tuple[str, str]], abstract_params,
         shardings=None, dtype=np.float32, strict: bool = True, stem: str = "model",
         variant: str | None = None, whole_file: bool = False):
    """The params tree of `abstract_params` read from `directory`. With `shardings` (a tree
    like abstract_params) each leaf is a global jax.Array on its sharding; without, numpy.

    Every param must be named in `names` and present in the checkpoint with the expected
    shape: errors name the Hugging Face tensor and the Flax path. Tensors of the module's
    namespaces (`whole_file`: of the whole file, as for a diffusers component) that no param
    reads are an error too (`strict=False`: a warning naming them). `stem` / `variant` pick the
    files (SafetensorsDir); a float16 variant is cast to `dtype` tensor by tensor."""
    tensors = SafetensorsDir(directory, stem, variant)
    unused = unused_tensors(tensors, names, whole_file)
    if unused:
        listed = f"{', '.join(unused[:4])}{f' (+{len(unused) - 4} more)' if len(unused) > 4 else ''}"
        message = (f"{directory}: {len(unused)} tensors that its config.json does not use: "
                   f"{listed} (a config with fewer layers than the weights?)")
        if strict:
            raise CheckpointError(message + "; load with strict=False to ignore them")
        import logging

        logging.getLogger(__name__).warning("%s; ignored (strict=False)", message)
    flat = flatten_dict(abstract_params)
    unnamed = sorted(set(flat) - set(names))
    if unnamed:
        raise CheckpointError(f"no Hugging Face name for params {['/'.join(p) for p in unnamed[:3]]}")
    flat_shardings = flatten_dict(shardings) if shardings is not None else {}
    out = {}
    for path, want in flat.items():
        hf_name, kind = names[path]
        value = _TO_FLAX[kind](tensors.get(hf_name))
        if value.shape != tuple(want.shape):
            raise CheckpointError(
                f"{directory}: tensor {hf_name} has shape {_TO_HF[kind](value).shape}; the config "
                f"implies {_TO_HF[kind](np.empty(want.shape, np.int8)).shape} (Flax param "
                f"{'/'.join(path)} {tuple(want.shape)})")
        value = np.ascontiguousarray(value, dtype=dtype)
        if path in flat_shardings:
            sharding = flat_shardings[path]
            value = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])
        out[path] = value
    return unflatten_dict(out)


def to_hf_tensors(params, names: Mapping[tuple[str, ...], tuple[str, str]]) -> dict[str, np.ndarray]:
    """Params under their Hugging Face names and layouts (the inverse of `load`)."""
    tensors = {}
    for path, value in flatten_dict(params).items():
        hf_name, kind = names[path]
        tensors[hf_name.split("|")[0]] = np.ascontiguousarray(
            _TO_HF[kind](np.asarray(value, np.float32)))
    return tensors


def save(directory: str, tensors: Mapping[str, np.ndarray], config: dict,
         extra_files: Mapping[str, str | bytes] | None = None) -> None:
    """Write config.json + model.safetensors (+ files such as the tokenizer's), atomically:
    a temporary directory renamed into place."""
    from safetensors.numpy import save_file

    with atomic_directory(directory) as tmp:
        save_file(dict(tensors), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        for name, content in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
