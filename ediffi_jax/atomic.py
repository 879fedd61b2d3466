"""Write a file or directory so that readers see the old one or the complete new one, never
half."""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Callable


def write_atomically(path: str, write: Callable) -> None:
    """write(binary file) on a temporary name, renamed to `path` only once complete."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a temporary sibling directory to fill; on success it replaces `path` (an
    existing one is removed only then), on any error it is deleted and `path` is untouched."""
    tmp = f"{path.rstrip('/')}.tmp.{os.getpid()}"
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
