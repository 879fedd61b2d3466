"""The event files written through tensorboard's EventFileWriter: an independent parser (bitwise
CRC32C, generic protobuf wire decoder) and TensorBoard's EventAccumulator read back what was
logged, and truncate_events drops the steps past a resume point (and nothing else)."""
import io
import os
import re
import socket
import struct
import time

import numpy as np
import pytest
from PIL import Image

from ediffi_jax.training.tensorboard import SummaryWriter, truncate_events

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
        assert set(ev) <= {1, 2, 3, 5, 10}  # 10: source_metadata (the header's writer)
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


def only_file(logdir) -> str:
    (name,) = os.listdir(logdir)
    return os.path.join(logdir, name)


def test_reference_crc_is_crc32c():
    # The independent reader's CRC, against the CRC32C check value and TFRecord's masked form.
    assert ref_crc32c(b"123456789") == 0xE3069283 and ref_crc32c(b"") == 0
    assert ref_masked(b"") == 0xA282EAD8 and ref_masked(b"123456789") == 0xC78AB0E5


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
    assert re.fullmatch(rf"events\.out\.tfevents\.\d+\.{re.escape(socket.gethostname())}"
                        rf"\.{os.getpid()}\.\d+\.v2", path.name)
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


def test_flush_writes_everything_logged_and_close_is_final(tmp_path):
    w = SummaryWriter(str(tmp_path))
    for step in range(50):
        w.scalar("a", float(step), step)
    w.flush()
    path = only_file(tmp_path)
    assert [(e[1], e[3]) for e in read_events(path)[1:]] == [(s, [("a", float(s))]) for s in range(50)]
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.scalar("a", 2.0, 1)
    assert len(read_records(path)) == 51


def test_two_writers_in_one_second_keep_two_files(tmp_path):
    with SummaryWriter(str(tmp_path)) as a, SummaryWriter(str(tmp_path)) as b:
        a.scalar("x", 1.0, 1)
        b.scalar("x", 2.0, 1)
    values = sorted(read_events(tmp_path / n)[1][3][0][1] for n in os.listdir(tmp_path))
    assert values == [1.0, 2.0]


def test_truncate_drops_the_steps_past_the_resume_point(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    logdir = tmp_path / "tb"
    with SummaryWriter(str(logdir), filename_suffix=".a") as w:
        for step in range(1, 7):
            w.scalars({"loss": 1.0 / step, "lr": 0.1 * step}, step)
        w.image("img", np.full((4, 4, 3), 7, np.uint8), 5)
    with SummaryWriter(str(logdir), filename_suffix=".b") as w:  # the resumed run, killed
        for step in range(4, 6):
            w.scalar("loss", 10.0 + step, step)
    torn = next(p for p in map(str, logdir.iterdir()) if p.endswith(".b"))
    with open(torn, "ab") as f:  # a record cut short by the kill
        f.write(struct.pack("<Q", 100) + b"\0" * 20)
    early = next(p for p in map(str, logdir.iterdir()) if p.endswith(".a"))
    # 3 steps (4, 5, 6) + the image of a; 2 steps of b.
    assert truncate_events(str(logdir), 3) == 6
    assert sorted(os.listdir(logdir)) == sorted(os.path.basename(p) for p in (early, torn))
    for path in (early, torn):  # rewritten whole: the independent reader checks every CRC
        assert [e[1] for e in read_events(path)[1:]] == ([1, 2, 3] if path == early else [])
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(s, f32(1.0 / s)) for s in (1, 2, 3)]
    assert [(e.step, e.value) for e in acc.Scalars("lr")] == [(s, f32(0.1 * s)) for s in (1, 2, 3)]
    assert acc.Tags()[ea.IMAGES] == []
    # Nothing past the step left: no event dropped, no file rewritten.
    before = {p: os.stat(p).st_ino for p in (early, torn)}
    assert truncate_events(str(logdir), 3) == 0 and truncate_events(str(tmp_path / "none"), 0) == 0
    assert {p: os.stat(p).st_ino for p in (early, torn)} == before


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
    assert len(read_records(only_file(tmp_path))) == 1  # rejected calls wrote nothing
