"""Export a run's EMA params as a small self-contained model directory, and read one back.

    python -m train.export --workdir runs/tiny/shared --out pretrained/tiny-shapes [--dtype float16]

The directory holds `config.json` (the run's config, as saved in its checkpoint) and
`params.safetensors` (the EMA params under '/'-joined names, the step and source in the
metadata). It is what a run is without its optimizer and input-pipeline state: a model to share
or ship. Everything that takes a run's workdir (`train.branch --parent`, `train.ensemble`,
`sample --ensemble`) takes an export too; a child branched from one starts with params = EMA =
the exported weights.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ediffi_jax.config import read_json

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
DTYPES = ("float32", "float16", "bfloat16")


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PARAMS_FILE))


def _cast(flat: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    import ml_dtypes

    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    if dtype == "float16":
        for name, value in flat.items():
            peak = float(np.max(np.abs(value))) if value.size else 0.0
            if peak > float(np.finfo(np.float16).max):
                raise ValueError(f"{name} has |value| {peak:.3g}, beyond float16's range: "
                                 "export with --dtype bfloat16 or float32")
    return {k: v.astype(target) for k, v in flat.items()}


def write_export(workdir: str, out: str, dtype: str = "float32", step: int | None = None) -> str:
    """Write the export of `workdir`'s newest (or given) checkpoint to `out` (atomically:
    a temporary directory renamed into place, an existing `out` replaced only on success)."""
    from safetensors.numpy import save_file

    from ediffi_jax.atomic import atomic_directory
    from sample.generate import run_config
    from train.trainer import load_params

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config = run_config(workdir).to_dict()
    _, ema, saved_step = load_params(workdir, step=step)
    flat = flatten_dict(jax_to_numpy(ema), sep="/")
    bad = [k for k, v in flat.items() if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"{workdir} step {saved_step}: non-finite EMA params in {bad[:3]}")
    flat = _cast(flat, dtype)
    with atomic_directory(out) as tmp:
        save_file(flat, os.path.join(tmp, PARAMS_FILE),
                  metadata={"format": "ediffi-jax", "step": str(saved_step),
                            "source": os.path.abspath(workdir), "dtype": dtype})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
    return out


def jax_to_numpy(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), tree)


def read_config(path: str) -> dict:
    return read_json(os.path.join(path, CONFIG_FILE), "the export's config")


def read_params(path: str, abstract_params) -> tuple[dict, int]:
    """(float32 numpy params in the tree of `abstract_params`, step). A missing or extra
    tensor, or one of another shape, is an error that names it."""
    from safetensors import safe_open

    file = os.path.join(path, PARAMS_FILE)
    try:
        with safe_open(file, framework="numpy") as f:
            step = int((f.metadata() or {}).get("step", 0))
            flat = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{file} is unreadable ({type(e).__name__}: {e})") from e
    expected = flatten_dict(abstract_params, sep="/")
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f"{file} does not match its config.json's model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, want in expected.items():
        if flat[name].shape != tuple(want.shape):
            raise ValueError(f"{file}: {name} has shape {flat[name].shape}, the model expects "
                             f"{tuple(want.shape)}")
    return unflatten_dict(flat, sep="/"), step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the run to export")
    p.add_argument("--out", required=True, help="the export directory (replaced if it exists)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="storage dtype")
    p.add_argument("--step", type=int, help="a checkpoint step (default: the newest)")
    args = p.parse_args(argv)
    from ediffi_jax.config import ConfigError

    try:
        write_export(args.workdir, args.out, args.dtype, args.step)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = os.path.getsize(os.path.join(args.out, PARAMS_FILE))
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB of {args.dtype} params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
