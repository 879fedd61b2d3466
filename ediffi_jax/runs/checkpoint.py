"""Checkpoints with orbax: train state (params, optimizer, EMA, step, counters), the input
pipeline's iterator state and the config, saved asynchronously and restorable onto any mesh.

Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves no half-written step under a final name. Restore tells two failures
apart, because they call for opposite actions:

- a step that is *damaged* (its files cannot be read, or what they hold is impossible: the
  `verify` hook) is moved aside to `<directory>/unreadable/<step>.<time>` (kept for inspection)
  and the previous step is tried;
- a step that is readable but holds *another run* (its saved config fails `check_config`, or
  its state has other leaves or shapes than the one asked for) is an error, and nothing moves:
  the request is what is wrong, not the checkpoint.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ediffi_jax.config import ConfigError

log = logging.getLogger(__name__)


class CheckpointDamaged(Exception):
    """A checkpoint step that cannot be used on its own (raised by `verify` hooks too)."""


class CheckpointMismatch(ConfigError):
    """A readable checkpoint step that holds another run than the one requested."""


class CheckpointSaveError(OSError):
    """A save that did not complete (a full disk, a lost mount): training must stop."""


class _WithoutTraceback(logging.Filter):
    """orbax's background threads log one failed write with its traceback from each thread it
    passes through (hundreds of lines for a full disk); the trainer reports it once, clearly.
    Its error lines stay, without the tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" in record.pathname and record.levelno >= logging.ERROR:
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE = _WithoutTraceback()


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
                 create: bool = True):
        logging.getLogger("absl").addFilter(_ONE_LINE)  # once: filters are a set
        # Absolute: orbax's array writer rejects relative paths, and only in its background thread.
        self.directory = os.path.abspath(directory)
        if not create and not os.path.isdir(self.directory):
            raise ConfigError(f"no checkpoints in {os.path.dirname(self.directory)}: expected "
                              f"{self.directory} (train that run first)")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=create,
                read_only=not create,
                # A save cut short (full disk, kill) leaves only orbax's temporary directory.
                cleanup_tmp_directories=create),
        )
        self.last_blocking_seconds = 0.0
        self._saving: int | None = None  # the step of the save in flight (or last started)

    def save(self, step: int, state: Any, data_iterator=None, config: dict | None = None) -> None:
        """Start saving `step`; returns once the device arrays are copied (the write continues
        in the background). `last_blocking_seconds` records how long training was blocked.
        A failure of an earlier save (or of this one's start) raises CheckpointSaveError."""
        self.check()
        items = {"state": ocp.args.StandardSave(state),
                 "checksums": ocp.args.JsonSave(checksums(state))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        t = time.perf_counter()
        try:  # waits for the previous save first: an error here may be that one's
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # orbax raises many types; the cause is what the user needs
            raise self._save_error(e) from e
        self._saving = step
        self.last_blocking_seconds = time.perf_counter() - t

    def check(self) -> None:
        """Raise CheckpointSaveError as soon as a background save has failed (no waiting: a
        save still in progress is left alone)."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def _save_error(self, error: Exception) -> CheckpointSaveError:
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        which = f"of step {self._saving} " if self._saving is not None else ""
        good = [s for s in self.steps() if s != self._saving]
        return CheckpointSaveError(
            f"a checkpoint {which}could not be written to {self.directory} "
            f"({type(cause).__name__}: {str(cause)[:300]}); training stopped. The last complete "
            f"checkpoint is {'step ' + str(good[-1]) if good else 'none'}")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None, *,
                check_config: Callable[[int, dict], None] | None = None,
                verify: Callable[[int, Any], None] | None = None):
        """Restore the newest usable step (or `step`) into `abstract_state`'s shapes and
        shardings; `data_iterator` is rewound in place. Returns (state, step), or (None, None)
        when no step is left (each damaged one moved aside, see the module docstring).

        `check_config(step, saved_config)` raises ConfigError when the saved run is not the
        requested one; `verify(step, restored)` (restored = {"state": ..., "data": iterator})
        raises CheckpointDamaged when the contents are impossible."""
        candidates = [step] if step is not None else self.steps()[::-1]
        for s in candidates:
            try:
                if check_config is not None:
                    check_config(s, self._read(s, "config", lambda: self.restore_config(s)))
                self._check_tree(s, abstract_state)
                items = {"state": ocp.args.StandardRestore(abstract_state)}
                if data_iterator is not None:
                    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
                restored = self._read(s, "state", lambda: self.manager.restore(
                    s, args=ocp.args.Composite(**items)))
                self._check_sums(s, restored["state"])
                if verify is not None:
                    verify(s, {"state": restored["state"], "data": data_iterator})
            except CheckpointDamaged as e:
                if step is not None:
                    raise
                aside = self._move_aside(s)
                log.warning("checkpoint %d in %s is unreadable (%s); moved to %s",
                            s, self.directory, e, aside)
                print(f"warning: checkpoint step {s} is unreadable ({e}); moved to {aside}; "
                      "falling back to the previous checkpoint", flush=True)
                continue
            return restored["state"], s
        return None, None

    def _read(self, step: int, what: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointDamaged(f"its {what} cannot be read: {type(e).__name__}: "
                                    f"{str(e)[:200]}") from e

    def _check_tree(self, step: int, abstract_state: Any) -> None:
        """The saved state's leaves and shapes against the requested ones: a difference means
        another run (CheckpointMismatch), an unreadable metadata file a damaged step."""
        saved = self._read(step, "metadata", lambda: self.state_metadata(step))
        want = {_path(p): (tuple(x.shape), np.dtype(x.dtype))
                for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        have = {_path(p): (tuple(m.shape), np.dtype(m.dtype))
                for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]} if saved else {}
        if not have:  # orbax reads damaged metadata as an empty tree
            raise CheckpointDamaged("its state metadata is missing or unreadable")
        problems = [f"{k} missing" for k in sorted(set(want) - set(have))]
        problems += [f"{k} not expected" for k in sorted(set(have) - set(want))]
        problems += [f"{k} saved {have[k][0]} {have[k][1]}, expected {want[k][0]} {want[k][1]}"
                     for k in sorted(set(want) & set(have)) if want[k] != have[k]]
        if problems:
            more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.directory} holds a state of another shape "
                f"than this config builds: {'; '.join(problems[:4])}{more}. Nothing was changed; "
                "resume with the run's own config, or use a new workdir")

    def _check_sums(self, step: int, state: Any) -> None:
        """Orbax's array files carry no checksum: a flipped bit restores as a wrong value. The
        sums saved beside them catch it (steps saved before they existed are taken as read)."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "checksums")):
            return
        saved = self._read(step, "checksums", lambda: self.manager.restore(
            step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))["checksums"])
        restored = checksums(state)
        bad = sorted(k for k, v in restored.items() if saved.get(k) != v)
        if bad or set(saved) != set(restored):
            more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
            raise CheckpointDamaged(f"its arrays do not match their checksums: "
                                    f"{', '.join(bad[:3]) or 'other leaves'}{more}")

    def _move_aside(self, step: int) -> str:
        target_dir = os.path.join(self.directory, "unreadable")
        target = os.path.join(target_dir, f"{step}.{int(time.time())}")
        if jax.process_index() == 0:  # one shared directory: one process moves it
            os.makedirs(target_dir, exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()
        return target

    def state_metadata(self, step: int):
        """The saved state's tree of array metadata (shape, dtype), read without restoring."""
        metadata = ocp.StandardCheckpointer().metadata(
            os.path.join(self.directory, str(step), "state"))
        return getattr(metadata, "item_metadata", metadata)

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def restore_params(self, step: int, shardings=None):
        """(params, ema_params) of `step` onto this host's devices, whatever the topology it
        was saved with: placed with `shardings` when given, else on the first local device.
        Reads only the state item: no optimizer structure needed."""
        from jax.sharding import SingleDeviceSharding

        metadata = self.state_metadata(step)
        # An explicit target for every leaf: orbax refuses target-less restores across topologies.
        here = SingleDeviceSharding(jax.local_devices()[0])  # this process's (multi-host too)
        target = dict(jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), metadata).items())
        if shardings is not None:  # params and EMA straight onto their (multi-host) shardings
            for key in ("params", "ema_params"):
                target[key] = jax.tree.map(
                    lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s),
                    target[key], shardings)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        return restored["params"], restored["ema_params"]

    def wait(self) -> None:
        """Wait for the background save; a failed one raises CheckpointSaveError."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(e) from e
        self._saving = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def open_run(workdir: str) -> tuple[Checkpointer, list[int]]:
    """A reader of an existing run's checkpoints and its steps. A missing workdir, or one with
    no checkpoint, is a ConfigError that creates nothing."""
    if not os.path.isdir(workdir):
        raise ConfigError(f"{workdir} does not exist: give a run's workdir or an export")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
    steps = ckpt.steps()
    if not steps:
        ckpt.close()
        raise ConfigError(f"no checkpoint in {ckpt.directory}: train that run first")
    return ckpt, steps


def _words(x: jax.Array) -> jax.Array:
    """An array's bits as uint32 words (narrower dtypes widened, 64-bit ones truncated)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(
        jnp.uint32)


@jax.jit
def _sums(x: jax.Array) -> jax.Array:
    """The wrapping sum of an array's words and the sum weighted by 2i+1. A single flipped bit
    changes both (the odd weights are invertible mod 2**32): cheap, not cryptographic. One
    small program per shape and dtype (a state has few), not one program over all arrays."""
    w = _words(x).ravel()
    weights = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weights, dtype=jnp.uint32)])


def checksums(tree) -> dict[str, list[int]]:
    """{leaf path: [sum, weighted sum]} of a state, computed where the arrays live."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get([_sums(x) for _, x in flat])
    return {_path(p): [int(v) for v in np.asarray(s)] for (p, _), s in zip(flat, sums)}


def _path(path) -> str:
    """A key path as dotted names, the same for a dataclass and for orbax's saved dict."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: what restore fills in."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
