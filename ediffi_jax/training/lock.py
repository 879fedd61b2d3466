"""One trainer per workdir: an exclusive lock on `<workdir>/.lock`.

Two trainers on one workdir interleave their logs and overwrite each other's checkpoints. The
lock is `flock(2)` on an open file, so the kernel releases it when the holder exits, however it
dies (a kill -9 leaves no stale lock to clean up); on NFS v4 Linux maps it onto a byte-range
lock that the server arbitrates across hosts. In a multi-host job only process 0 takes it (every
process writes the shared checkpoint, but the job is one trainer) and tells the others whether
it got it, so all stop together.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

from ediffi_jax.config import ConfigError

LOCK_FILE = ".lock"


class WorkdirBusy(ConfigError):
    pass


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the lock; the file names the holder for a second
    trainer's error message."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        import jax

        error = None
        if jax.process_index() == 0:
            try:
                self._take()
            except WorkdirBusy as e:
                error = str(e)
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            busy = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
            if int(busy) and error is None:
                error = f"{self.path} is held by another trainer (process 0 could not take it)"
        if error is not None:
            raise WorkdirBusy(error)

    def _take(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise WorkdirBusy(
                f"{os.path.dirname(self.path)} is in use by another trainer ({holder}); wait for "
                "it to finish or stop it, or train in another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "command": " ".join(sys.argv)}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (harmless, reused)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"pid {h['pid']} on {h['host']} since {h['since']}: {h['command']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown"
