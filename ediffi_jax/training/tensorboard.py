"""TensorBoard event-file writer with no TensorFlow or protobuf dependency.

TensorBoard reads TFRecord files of serialized `Event` protos. The handful of fields a trainer
needs (scalars, PNG images) are encoded by hand here, so logging costs one small module instead of
a TensorFlow install. Framing per record:

    uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

all little-endian. Single-threaded by design: call it from the training loop only.
"""
from __future__ import annotations

import functools
import io
import math
import operator
import os
import socket
import struct
import time

import numpy as np
from PIL import Image

from ediffi_jax.atomic import write_atomically

__all__ = ["SummaryWriter", "crc32c", "masked_crc32c", "truncate_events"]

# --- CRC32C (Castagnoli) -----------------------------------------------------------------------

_POLY = 0x82F63B78  # 0x1EDC6F41 bit-reflected


def _make_table() -> list[int]:
    table = []
    for byte in range(256):
        c = byte
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()
_LANE = 512  # bytes per lane in the vectorised path
_NUMPY_MIN = 16384  # below this the plain loop beats numpy's per-call overhead


def _crc32c_loop(data: bytes, crc: int = 0) -> int:
    """Byte-at-a-time table CRC; ~0.3 us/byte, fine for small records."""
    crc ^= 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


@functools.cache
def _shift_tables() -> tuple[list[int], ...]:
    """Byte tables for the linear map "advance the register over _LANE zero bytes"."""
    columns = []
    for bit in range(32):
        r = 1 << bit
        for _ in range(_LANE):
            r = _TABLE[r & 0xFF] ^ (r >> 8)
        columns.append(r)
    tables = []
    for k in range(4):
        t = [0] * 256
        for v in range(1, 256):
            low = v & -v  # lowest set bit: t[v] = t[v without it] ^ its column
            t[v] = t[v ^ low] ^ columns[8 * k + low.bit_length() - 1]
        tables.append(t)
    return tuple(tables)


def _crc32c_numpy(data: bytes, crc: int = 0) -> int:
    """CRC of many _LANE-byte lanes at once in numpy, then chained in Python.

    CRC without pre/post-conditioning is linear, so crc(A || B) = shift_|B|(crc(A)) ^ crc(B).
    Leading zero bytes leave a zero register unchanged, so the data is zero-padded at the front to
    whole lanes, and the initial register is folded into the first four data bytes instead.
    """
    buf = np.frombuffer(data, np.uint8)
    pad = (-buf.size) % _LANE
    lanes = np.zeros(pad + buf.size, np.uint8)
    lanes[pad:] = buf
    init = crc ^ 0xFFFFFFFF
    lanes[pad : pad + 4] ^= np.frombuffer(init.to_bytes(4, "little"), np.uint8)
    columns = np.ascontiguousarray(lanes.reshape(-1, _LANE).T)  # row j = byte j of every lane
    table = np.asarray(_TABLE, np.uint32)
    reg = np.zeros(columns.shape[1], np.uint32)
    for col in columns:
        reg = table[(reg ^ col) & 0xFF] ^ (reg >> 8)
    s0, s1, s2, s3 = _shift_tables()
    acc = 0
    for r in reg.tolist():
        acc = s0[acc & 0xFF] ^ s1[(acc >> 8) & 0xFF] ^ s2[(acc >> 16) & 0xFF] ^ s3[acc >> 24] ^ r
    return acc ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    """CRC32C of `data` (crc32c(b"123456789") == 0xE3069283)."""
    if len(data) < _NUMPY_MIN:
        return _crc32c_loop(data)
    return _crc32c_numpy(data)


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotating and offsetting keeps CRCs of CRCs from being trivial."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


# --- protobuf wire format ----------------------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 are sent as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, 2) + _varint(len(value)) + value


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # beyond float32 range: log +-inf like a float32 cast would
        return struct.pack("<f", math.copysign(math.inf, value))


def _event(wall_time: float, step: int | None = None, *, file_version: str | None = None,
           summary: bytes | None = None) -> bytes:
    # Event {double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;}
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step is not None:
        out += _int_field(2, step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if summary is not None:
        out += _bytes_field(5, summary)
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    # Value {string tag = 1; float simple_value = 2;}
    return _bytes_field(1, tag.encode()) + _key(2, 5) + _float32(value)


def _image_value(tag: str, height: int, width: int, colorspace: int, png: bytes) -> bytes:
    # Value {string tag = 1; Image image = 4;}
    # Image {int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4;}
    image = (_int_field(1, height) + _int_field(2, width) + _int_field(3, colorspace)
             + _bytes_field(4, png))
    return _bytes_field(1, tag.encode()) + _bytes_field(4, image)


# --- writer ------------------------------------------------------------------------------------


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
    """Appends scalar and image summaries to one event file under `logdir`.

    Records are buffered in memory and written on flush() / close() (or when a 1 MiB buffer
    fills), so logging every step costs no syscalls. Use as a context manager to close on exit.
    """

    def __init__(self, logdir: str, filename_suffix: str = ""):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}{filename_suffix}"
        self.path = os.path.join(logdir, name)
        # Append, not truncate: a second writer started in the same second must not wipe the
        # first one's file. A repeated file_version record mid-stream is harmless to readers.
        self._file = open(self.path, "ab", buffering=1 << 20)
        self._file.write(_record(_event(time.time(), file_version="brain.Event:2")))
        self._file.flush()  # the file is visible to TensorBoard from the start

    def _write_summary(self, values: list[bytes], step: int) -> None:
        if self._file is None:
            raise ValueError(f"SummaryWriter for {self.path} is closed")
        summary = b"".join(_bytes_field(1, v) for v in values)  # Summary {repeated Value value = 1;}
        self._file.write(_record(_event(time.time(), step, summary=summary)))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Log one scalar (stored as float32, as TensorBoard does)."""
        self.scalars({tag: value}, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log several scalars in one event; an empty dict writes nothing."""
        step = _check_step(step)
        encoded = [_scalar_value(_check_tag(tag), float(v)) for tag, v in values.items()]
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
        colorspace = 1 if image.ndim == 2 else image.shape[-1]  # 1 gray, 3 RGB, 4 RGBA
        png = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(png, format="PNG")
        self._write_summary([_image_value(tag, height, width, colorspace, png.getvalue())], step)

    def flush(self) -> None:
        """Push buffered records to disk so a running TensorBoard picks them up."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close; further logging raises, closing again is a no-op."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- truncation on resume ------------------------------------------------------------------------


def _records(data: bytes):
    """The payloads of a TFRecord byte string; stops at a torn tail (a killed writer)."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            return
        yield data[pos + 12: pos + 12 + length]
        pos = end


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _event_step(event: bytes) -> int | None:
    """Event.step (field 2) of a serialized Event, or None when it has none."""
    pos = 0
    while pos < len(event):
        key, pos = _read_varint(event, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(event, pos)
            if field == 2:
                return value - (1 << 64) if value >= 1 << 63 else value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(event, pos)
            pos += length
        else:
            return None
    return None


def truncate_events(logdir: str, last_step: int) -> int:
    """Drop every event past `last_step` from the event files in `logdir` (a resumed run redoes
    those steps; TensorBoard would show both). Each file is rewritten atomically. Returns how
    many events were dropped."""
    dropped = 0
    if not os.path.isdir(logdir):
        return 0
    for name in sorted(os.listdir(logdir)):
        if not name.startswith("events.out.tfevents."):
            continue
        path = os.path.join(logdir, name)
        with open(path, "rb") as f:
            data = f.read()
        kept = []
        for payload in _records(data):
            step = _event_step(payload)
            if step is not None and step > last_step:
                dropped += 1
            else:
                kept.append(_record(payload))
        out = b"".join(kept)
        if out != data:
            write_atomically(path, lambda f: f.write(out))
    return dropped
