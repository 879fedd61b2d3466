"""The run format on disk, read and written in one place: a training run's workdir (its
checkpoints, read through `Checkpointer`), an export (`config.json` + `params.safetensors`: the EMA
weights without optimizer or pipeline state, a model to share), and an ensemble file
(`{"experts": [workdir, ...]}`, paths relative to the file) that groups expert runs.

Everything that takes a run takes an export too; a single workdir or export trained on the
whole noise interval is an ensemble of one.
"""
from __future__ import annotations

import json
import os
from fractions import Fraction

import jax
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ediffi_jax.atomic import atomic_directory
from ediffi_jax.config import ConfigError, read_json
from ediffi_jax.diffusion.intervals import ExpertInterval
from ediffi_jax.models.experts import ExpertEnsemble
from ediffi_jax.models.unet import abstract_params
from ediffi_jax.runs.checkpoint import open_run
from ediffi_jax.runs.spec import RunSpec, parse_run

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
DTYPES = ("float32", "float16", "bfloat16")


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, PARAMS_FILE))


def cast_params(flat: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
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
    config = run_config(workdir).to_dict()
    _, ema, saved_step = load_params(workdir, step=step)
    return _write_params(out, config, ema, dtype, saved_step, os.path.abspath(workdir))


def _write_params(out: str, config: dict, params, dtype: str, step: int, source: str) -> str:
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    flat = flatten_dict(jax_to_numpy(params), sep="/")
    bad = [k for k, v in flat.items() if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"{source} step {step}: non-finite EMA params in {bad[:3]}")
    flat = cast_params(flat, dtype)
    with atomic_directory(out) as tmp:
        save_file(flat, os.path.join(tmp, PARAMS_FILE),
                  metadata={"format": "ediffi-jax", "step": str(step), "source": source,
                            "dtype": dtype})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
    return out


def write_merged_export(path: str, out: str, dtype: str = "float32",
                        by_mass: bool = False) -> str:
    """One model from an ensemble's experts: their EMA weights averaged (equally, or weighted
    by each interval's share of the training noise mass), exported over the whole interval.
    The merge-back baseline of Decouple-Then-Merge: one network with the ensemble's compute."""
    _, ensemble = load_ensemble(path)
    if len(ensemble) < 2:
        raise ConfigError(f"{path} has one expert: nothing to merge")
    masses = [float(e.q_hi - e.q_lo) for e in ensemble.intervals]
    weights = np.asarray(masses if by_mass else [1.0] * len(masses), np.float64)
    weights = weights / weights.sum()
    merged = jax.tree.map(lambda *leaves: sum(float(w) * np.asarray(leaf, np.float32)
                                              for w, leaf in zip(weights, leaves)),
                          *ensemble.params)
    config = run_config(expert_workdirs(path)[0]).to_dict()
    config["train"]["sigma_quantiles"] = ["0", "1"]
    source = f"merged ({'by mass' if by_mass else 'equal'}) from {os.path.abspath(path)}"
    return _write_params(out, config, merged, dtype, 0, source)


def jax_to_numpy(tree):
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


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (saved in its newest checkpoint, or an export's)."""
    if is_export(workdir):
        return ml_collections.ConfigDict(read_config(workdir))
    ckpt, steps = open_run(workdir)  # creates nothing
    try:
        return ml_collections.ConfigDict(ckpt.restore_config(steps[-1]))
    finally:
        ckpt.close()


def expert_workdirs(path: str) -> list[str]:
    if os.path.isdir(path):
        return [path]
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist: give an ensemble.json, a run's workdir or an "
                          "export")
    spec = read_json(path, "the ensemble file")
    experts = spec.get("experts") if isinstance(spec, dict) else None
    if not experts or not isinstance(experts, list) or not all(isinstance(p, str) for p in experts):
        raise ConfigError(f"{path}: expected {{\"experts\": [workdir, ...]}}")
    base = os.path.dirname(os.path.abspath(path))
    return [os.path.join(base, p) for p in experts]


def load_params(workdir: str, shardings=None, step: int | None = None):
    """(params, ema_params, step) of a run's newest (or given) checkpoint, on this host's devices
    whatever the topology it was saved with: placed with `shardings` when given, else on the
    first device. An export (`train.export`) gives its weights as both params and EMA. A
    missing run is an error that creates nothing."""
    if is_export(workdir):
        model = parse_run(ml_collections.ConfigDict(read_config(workdir))).stage.model
        weights, saved = read_params(workdir, abstract_params(model))
        place = shardings if shardings is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        # Two device copies: params and EMA are separate buffers of a (donated) train state.
        return jax.device_put(weights, place), jax.device_put(weights, place), saved
    ckpt, steps = open_run(workdir)
    try:
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ConfigError(f"{workdir} has no checkpoint of step {step} (it has {steps})")
        params, ema = ckpt.restore_params(step, shardings)
    finally:
        ckpt.close()
    return params, ema, step


def load_ensemble(path: str, step: int | None = None, ema: bool = True) -> tuple[RunSpec, ExpertEnsemble]:
    """Experts ordered by noise, their EMA params, and the run spec of the first expert."""
    experts = []
    for workdir in expert_workdirs(path):
        run = parse_run(run_config(workdir))
        params, ema_params, s = load_params(workdir, step=step)
        q_lo, q_hi = (Fraction(q) for q in run.train.sigma_quantiles)
        experts.append((q_lo, ExpertInterval(q_lo, q_hi, os.path.basename(workdir.rstrip("/"))),
                        ema_params if ema else params, run))
    experts.sort(key=lambda e: e[0])
    models = {e[3].stage.model for e in experts}
    if len(models) != 1:
        raise ConfigError(f"the experts of {path} have different U-Net configs; they must share one")
    ensemble = ExpertEnsemble([e[1] for e in experts], [e[2] for e in experts])
    return experts[0][3], ensemble


def write_ensemble(out: str, workdirs: list[str]) -> None:
    base = os.path.dirname(os.path.abspath(out))
    rel = [os.path.relpath(os.path.abspath(w), base) for w in workdirs]
    tmp = f"{out}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"experts": rel}, f, indent=1)
    try:
        load_ensemble(tmp)  # validates: readable checkpoints, one architecture, a tiling layout
    except Exception:
        os.remove(tmp)
        raise
    os.replace(tmp, out)


