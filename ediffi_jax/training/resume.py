"""What a resumed run may change: the saved config against the requested one.

A workdir holds one run. Resuming it with another model, data, noise interval or seed would
silently train a different run on top of it (or, with another architecture, fail to restore
and look like damage), so those are errors. What only steers the rest of the run may change:
how long it runs and how it logs are taken and logged; optimisation settings (learning rate,
schedule, EMA, dropout rates, sampling defaults) only when named with `--change KEY`, so a
typo'd config file cannot change them unnoticed.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from ediffi_jax.atomic import write_atomically
from ediffi_jax.config import ConfigError

# Taken as requested, and logged.
FREE = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
        "train.max_nonfinite", "mesh", "distributed")
# Taken only when named with --change.
CHANGEABLE = ("train.lr", "train.warmup_steps", "train.lr_decay", "train.weight_decay",
              "train.b1", "train.b2", "train.grad_clip", "train.ema_decay",
              "train.ema_half_life_images", "train.ema_warmup", "train.grad_accum",
              "train.drop_t5", "train.drop_clip_text", "train.drop_clip_image", "sampling")
# Everything else (model, data, encoders, train.seed, train.sigma_quantiles, train.batch_size,
# train.init_from, name, ...) identifies the run and may not change.


def _under(key: str, prefixes: Iterable[str]) -> bool:
    """`key` is one of `prefixes` or lies below one (`sampling` covers `sampling.num_steps`)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def kind(key: str, saved: Mapping[str, Any]) -> str:
    """'free', 'changeable' or 'fixed'. With a cosine decay, `steps` sets the schedule: a new
    length changes the learning rate of every remaining step, so it needs --change."""
    if key == "train.steps" and saved.get("train.lr_decay") == "cosine":
        return "changeable"
    if _under(key, FREE):
        return "free"
    return "changeable" if _under(key, CHANGEABLE) else "fixed"


def check_changes(changes: Iterable[str], requested: Mapping) -> None:
    """--change KEY names must be real keys that may change (checked before any work)."""
    flat = _flatten(requested)
    for key in changes:
        if key not in flat and not any(k.startswith(key + ".") for k in flat):
            raise ConfigError(f"--change {key}: no such config key")
        if not (_under(key, FREE + CHANGEABLE) or any(_under(p, [key]) for p in FREE + CHANGEABLE)):
            raise ConfigError(f"--change {key}: {key} identifies the run and cannot change on "
                              "resume; start a new --workdir (or branch with train.branch)")


def check_resume(saved: Mapping, requested: Mapping, changes: Iterable[str], where: str,
                 log: Callable[[str], None] = print) -> None:
    """Compare the config saved in a run with the requested one: raise ConfigError naming every
    field that may not change (or may only with --change), log the changes that are taken."""
    old, new = _flatten(saved), _flatten(requested)
    changes = tuple(changes)
    fixed, unasked, taken = [], [], []
    for key in sorted(set(old) | set(new)):
        if key not in old:  # a field this version added: the saved run predates it
            log(f"resume: {key} is not in the saved config (an older version); using {new[key]!r}")
            continue
        if key not in new or old[key] == new[key]:
            continue
        line = f"{key}: saved {old[key]!r}, requested {new[key]!r}"
        k = kind(key, old)
        if key == "train.steps" and k == "changeable":
            line += " (with train.lr_decay='cosine' the length sets every step's learning rate)"
        if k == "fixed":
            fixed.append(line)
        elif k == "changeable" and not _under(key, changes):
            unasked.append((key, line))
        else:
            taken.append(line)
    if fixed:
        raise ConfigError(
            f"{where} holds another run than the one requested: " + "; ".join(fixed)
            + ". These identify a run and cannot change on resume: resume with the run's own "
            "config, or use a new --workdir. Nothing was changed")
    if unasked:
        raise ConfigError(
            f"the requested config differs from the run saved in {where}: "
            + "; ".join(line for _, line in unasked) + ". If the change is meant, add "
            + " ".join(f"--change {key}" for key, _ in unasked) + ". Nothing was changed")
    for line in taken:
        log(f"resume: changed {line}")


def truncate_metrics(path: str, last_step: int) -> int:
    """Keep the rows of metrics.jsonl up to `last_step` (the restored checkpoint): the resumed
    run writes the later steps again. A torn last line (a killed run) goes too. Atomic rewrite;
    returns how many rows were dropped."""
    import json
    import os

    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) != len(lines):
        write_atomically(path, lambda f: f.write("".join(kept).encode()))
    return len(lines) - len(kept)
