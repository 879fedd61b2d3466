"""Checkpoints with orbax: train state (params, optimizer, EMA, step, counters), the input
pipeline's iterator state and the config, saved asynchronously and restorable onto any mesh.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves no half-written step under a final name. A finalized step that cannot be
read (damaged files) is reported and skipped: restore falls back to the newest readable step,
and the unreadable one is moved aside to `<directory>/unreadable/<step>` (kept for inspection,
out of the way of the step being saved again).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        # Absolute: orbax's array writer rejects relative paths, and only in its background thread.
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        )
        self.last_blocking_seconds = 0.0

    def save(self, step: int, state: Any, data_iterator=None, config: dict | None = None) -> None:
        """Start saving `step`; returns once the device arrays are copied (the write continues
        in the background). `last_blocking_seconds` records how long training was blocked."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        t = time.perf_counter()
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.last_blocking_seconds = time.perf_counter() - t

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None):
        """Restore the newest readable step (or `step`) into `abstract_state`'s shapes and
        shardings; `data_iterator` is rewound in place. Returns (state, step) or (None, None)."""
        candidates = [step] if step is not None else self.steps()[::-1]
        for s in candidates:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:  # orbax raises many types for damaged files
                if step is not None:
                    raise
                aside = self._move_aside(s)
                log.warning("checkpoint %d in %s is unreadable (%s: %s); moved to %s",
                            s, self.directory, type(e).__name__, str(e)[:200], aside)
                print(f"warning: checkpoint step {s} is unreadable ({type(e).__name__}); moved "
                      f"to {aside}; falling back to the previous checkpoint", flush=True)
                continue
            return restored["state"], s
        return None, None

    def _move_aside(self, step: int) -> str:
        target_dir = os.path.join(self.directory, "unreadable")
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, f"{step}.{int(time.time())}")
        os.rename(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: what restore fills in."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
