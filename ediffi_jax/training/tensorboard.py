"""TensorBoard event files through the `tensorboard` package's own writer and reader.

`tensorboard` (pinned in requirements.txt) runs without TensorFlow: with TensorFlow absent its
`tensorboard.compat.tf` is a pure-Python stub, and the pieces used here are the ones
torch.utils.tensorboard writes with: `EventFileWriter` (TFRecord framing, masked CRC32C, the
`brain.Event:2` header, a background writer thread), the `Event` / `Summary` protos, and
`RawEventFileLoader` (TensorBoard's own record reader, CRC-checked) for truncation on resume.
This module adds only the trainer's API on top: tag, step and image checks that name the bad
input, PNG encoding, and the atomic rewrite of event files past a resumed step.
"""
from __future__ import annotations

import io
import operator
import os
import time

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.summary.writer.record_writer import RecordWriter

from ediffi_jax.atomic import write_atomically

__all__ = ["SummaryWriter", "truncate_events"]


def _check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"tag must be a non-empty str, got {tag!r}")
    return tag


def _check_step(step: int) -> int:
    try:
        return operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {step!r} ({type(step).__name__})") from None


class SummaryWriter:
    """Appends scalar and image summaries to one new event file under `logdir`.

    tensorboard's EventFileWriter does the writing: events are queued and written by its
    background thread; flush() returns once every event logged before it is in the file (written
    to the OS, not fsynced). The file is named events.out.tfevents.<time>.<host>.<pid>.<n> +
    `filename_suffix`, so two writers never share one. Use as a context manager to close on exit.
    """

    def __init__(self, logdir: str, filename_suffix: str = ""):
        os.makedirs(logdir, exist_ok=True)
        # flush_secs only paces flushes of a buffering file system (TensorFlow's GFile); the
        # stub's local files take every record as it is written.
        self._writer = EventFileWriter(logdir, max_queue_size=64, flush_secs=10,
                                       filename_suffix=filename_suffix)

    def _write_summary(self, values: list[summary_pb2.Summary.Value], step: int) -> None:
        if self._writer is None:
            raise ValueError("SummaryWriter is closed")
        self._writer.add_event(event_pb2.Event(
            wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar (stored as float32, as TensorBoard does; beyond its range, +-inf)."""
        self.scalars({tag: value}, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log several scalars in one event; an empty dict writes nothing."""
        step = _check_step(step)
        encoded = [summary_pb2.Summary.Value(tag=_check_tag(tag), simple_value=float(v))
                   for tag, v in values.items()]
        if encoded:
            self._write_summary(encoded, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log an HxW or HxWxC (C in 1, 3, 4) uint8 image, PNG-encoded (lossless)."""
        tag, step = _check_tag(tag), _check_step(step)
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(
                f"image {tag!r} has dtype {image.dtype}; expected uint8 (scale and cast first, "
                f"e.g. np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))"
            )
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ValueError(
                f"image {tag!r} has shape {image.shape}; expected HxW or HxWxC with "
                f"C in (1, 3, 4)"
            )
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            raise ValueError(f"image {tag!r} is empty: shape {image.shape}")
        png = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(png, format="PNG")
        encoded = summary_pb2.Summary.Image(
            height=height, width=width, colorspace=1 if image.ndim == 2 else image.shape[-1],
            encoded_image_string=png.getvalue())  # colorspace 1 gray, 3 RGB, 4 RGBA
        self._write_summary([summary_pb2.Summary.Value(tag=tag, image=encoded)], step)

    def flush(self) -> None:
        """Block until every event logged so far is in the file."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close; further logging raises, closing again is a no-op."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def truncate_events(logdir: str, last_step: int) -> int:
    """Drop every event past `last_step` from the event files in `logdir` (a resumed run redoes
    those steps; TensorBoard would show both). Records are read with TensorBoard's own loader,
    which stops at a torn tail (a killed writer) or a record failing its CRC, where TensorBoard
    stops reading too; what it cannot read is dropped with the steps past `last_step`. Each file
    that changes is rewritten atomically. Returns how many events were dropped."""
    dropped = 0
    if not os.path.isdir(logdir):
        return 0
    for name in sorted(os.listdir(logdir)):
        if not name.startswith("events.out.tfevents."):
            continue
        path = os.path.join(logdir, name)
        out = io.BytesIO()
        records = RecordWriter(out)
        for payload in RawEventFileLoader(path).Load():
            # Events without a step (the file_version header) read as step 0 and are kept.
            if event_pb2.Event.FromString(payload).step > last_step:
                dropped += 1
            else:
                records.write(payload)
        data = out.getvalue()
        with open(path, "rb") as f:
            unchanged = f.read() == data
        if not unchanged:
            write_atomically(path, lambda f: f.write(data))
    return dropped
