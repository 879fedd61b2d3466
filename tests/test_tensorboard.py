"""The hand-rolled event writer produces files both an independent parser and TensorBoard accept."""
import io
import os
import re
import socket
import struct
import time

import numpy as np
import pytest
from PIL import Image

from ediffi_jax.training.tensorboard import SummaryWriter, crc32c, masked_crc32c

# --- an independent reader: bitwise CRC, generic protobuf wire decoder ---------------------------


def ref_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def ref_masked(data: bytes) -> int:
    crc = ref_crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
    data = open(path, "rb").read()
    records, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert header_crc == ref_masked(header), f"bad length crc at offset {pos}"
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert len(body) == length and body_crc == ref_masked(body), f"bad data crc at {pos}"
        records.append(body)
        pos += 16 + length
    assert pos == len(data)
    return records


def decode(buf: bytes) -> dict[int, list]:
    """Protobuf message -> {field: [raw values]}; varints as int, 64/32-bit as bytes."""

    def varint(i):
        shift = value = 0
        while True:
            b = buf[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if not b & 0x80:
                return value, i

    fields, i = {}, 0
    while i < len(buf):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        elif wire == 2:
            n, i = varint(i)
            value, i = buf[i : i + n], i + n
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        fields.setdefault(field, []).append(value)
    assert i == len(buf)
    return fields


def read_events(path):
    """[(wall_time, step, file_version, [(tag, value)])] with value a float or a decoded Image."""
    events = []
    for record in read_records(path):
        ev = decode(record)
        assert set(ev) <= {1, 2, 3, 5}
        (wall_time,) = struct.unpack("<d", ev[1][0])
        step = ev.get(2, [0])[0]
        step = step - (1 << 64) if step >= 1 << 63 else step
        version = ev[3][0].decode() if 3 in ev else None
        values = []
        for summary in ev.get(5, []):
            for v in decode(summary).get(1, []):
                v = decode(v)
                tag = v[1][0].decode()
                if 2 in v:
                    values.append((tag, struct.unpack("<f", v[2][0])[0]))
                else:
                    img = decode(v[4][0])
                    values.append((tag, {
                        "height": img[1][0], "width": img[2][0], "colorspace": img[3][0],
                        "pixels": np.asarray(Image.open(io.BytesIO(img[4][0]))),
                    }))
        events.append((wall_time, step, version, values))
    return events


def f32(x):
    return float(np.float32(x))


# --- tests ---------------------------------------------------------------------------------------


def test_crc32c_vectors_and_both_code_paths():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert masked_crc32c(b"") == 0xA282EAD8
    assert masked_crc32c(b"123456789") == 0xC78AB0E5
    rng = np.random.default_rng(0)
    # Sizes straddle the switch to the vectorised lane path (16 KiB) and its 512-byte lanes.
    for n in (1, 7, 511, 16383, 16384, 16385, 16384 + 512, 100_003):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == ref_crc32c(data), n
    data = rng.integers(0, 256, 120_000, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    crc32c(data)
    assert time.perf_counter() - start < 0.5


@pytest.fixture
def logged(tmp_path):
    """An event file with scalars at several steps, a multi-tag event and two images."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)  # noise: PNG > 16 KiB
    gray = rng.integers(0, 256, (5, 7, 1), dtype=np.uint8)
    start = time.time()
    with SummaryWriter(str(tmp_path / "run"), filename_suffix=".v2") as w:
        for step in (0, 1, 10, 300):
            w.scalar("loss", 1.0 / (step + 3), step)
        w.scalars({"lr": 1e-4, "grad_norm": 2.5, "huge": 1e39}, step=2**40)
        w.image("samples", rgb, step=10)
        w.image("gray", gray, step=11)
    files = os.listdir(tmp_path / "run")
    assert len(files) == 1
    return tmp_path / "run" / files[0], start, rgb, gray


def test_independent_reader_round_trip(logged):
    path, start, rgb, gray = logged
    assert re.fullmatch(rf"events\.out\.tfevents\.\d+\.{re.escape(socket.gethostname())}\.v2",
                        path.name)
    assert abs(int(path.name.split(".")[3]) - start) <= 2
    events = read_events(path)
    wall, _, version, values = events[0]
    assert version == "brain.Event:2" and values == [] and abs(wall - start) < 60
    assert all(e[2] is None for e in events[1:])
    assert [(e[1], e[3]) for e in events[1:5]] == [
        (s, [("loss", f32(1.0 / (s + 3)))]) for s in (0, 1, 10, 300)
    ]
    assert events[5][1] == 2**40
    assert events[5][3] == [("lr", f32(1e-4)), ("grad_norm", 2.5), ("huge", float("inf"))]
    (step, ((tag, img),)) = events[6][1], events[6][3]
    assert (step, tag) == (10, "samples")
    assert (img["height"], img["width"], img["colorspace"]) == (96, 80, 3)
    np.testing.assert_array_equal(img["pixels"], rgb)
    (step, ((tag, img),)) = events[7][1], events[7][3]
    assert (step, tag, img["height"], img["width"], img["colorspace"]) == (11, "gray", 5, 7, 1)
    np.testing.assert_array_equal(img["pixels"], gray[..., 0])
    assert len(events) == 8


def test_tensorboard_reads_it(logged):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    assert pywrap_tensorflow.masked_crc32c(b"123456789") == masked_crc32c(b"123456789")
    path, _, rgb, _ = logged
    acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    tags = acc.Tags()
    assert sorted(tags[ea.SCALARS]) == ["grad_norm", "huge", "loss", "lr"]
    assert sorted(tags[ea.IMAGES]) == ["gray", "samples"]
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [0, 1, 10, 300]
    assert [e.value for e in loss] == [f32(1.0 / (s + 3)) for s in (0, 1, 10, 300)]
    (lr,) = acc.Scalars("lr")
    assert (lr.step, lr.value) == (2**40, f32(1e-4))
    (img,) = acc.Images("samples")
    assert (img.step, img.height, img.width) == (10, 96, 80)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(img.encoded_image_string))), rgb)


def test_buffered_until_flush(tmp_path):
    w = SummaryWriter(str(tmp_path))
    w.scalar("a", 1.0, 0)
    assert len(read_records(w.path)) == 1  # only the file_version record is on disk
    w.flush()
    assert [e[3] for e in read_events(w.path)[1:]] == [[("a", 1.0)]]
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.scalar("a", 2.0, 1)


def test_bad_input_is_named(tmp_path):
    with SummaryWriter(str(tmp_path)) as w:
        with pytest.raises(ValueError, match=r"shape \(4, 4, 2\).*C in \(1, 3, 4\)"):
            w.image("x", np.zeros((4, 4, 2), np.uint8), 0)
        with pytest.raises(ValueError, match=r"shape \(2, 4, 4, 3\)"):
            w.image("x", np.zeros((2, 4, 4, 3), np.uint8), 0)
        with pytest.raises(ValueError, match=r"dtype float32; expected uint8"):
            w.image("x", np.zeros((4, 4, 3), np.float32), 0)
        with pytest.raises(ValueError, match="empty"):
            w.image("x", np.zeros((0, 4, 3), np.uint8), 0)
        with pytest.raises(TypeError, match=r"step must be an integer, got 1\.5"):
            w.scalar("x", 1.0, 1.5)
        with pytest.raises(ValueError, match="non-empty str"):
            w.scalars({"ok": 1.0, "": 2.0}, 0)
        path = w.path
    assert len(read_records(path)) == 1  # rejected calls wrote nothing
