"""Datasets on disk: ArrayRecord shards of msgpack-encoded example dicts, plus a JSON sidecar.

Why this format: ArrayRecord gives O(1) random access (what a globally shuffled, exactly
resumable grain pipeline needs) without TensorFlow, and msgpack (via flax.serialization) stores
numpy arrays, strings, numbers, lists and nested dicts safely -- unlike pickle, reading a
dataset never executes code.

Layout for a prefix `DIR/train` with 2 shards:

    DIR/train-00000-of-00002.array_record
    DIR/train-00001-of-00002.array_record
    DIR/train.json        # count, shard names, feature names/dtypes/shapes, free metadata

Examples are dealt round-robin over the shards, so example i lives in shard i % num_shards;
RecordSource reads the shards in order (shard 0's records first), which is a fixed permutation
of the written order -- irrelevant for shuffled training, and it keeps writing streaming.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from flax import serialization

FORMAT = "ediffi_jax.records/v1"
SHARD_SUFFIX = ".array_record"
# group_size:1 makes every record individually addressable: random access reads one record,
# not a group of 65536 (ArrayRecord's default, tuned for sequential scans).
WRITER_OPTIONS = "group_size:1"


def shard_name(path_prefix: str | os.PathLike, index: int, num_shards: int) -> str:
    """`<prefix>-00003-of-00008.array_record`: the name every shard gets."""
    return f"{os.fspath(path_prefix)}-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def sidecar_path(path_prefix: str | os.PathLike) -> str:
    return f"{os.fspath(path_prefix)}.json"


def _normalise(value: Any, where: str) -> Any:
    """Checks one field is something msgpack round-trips losslessly; numpy scalars stay numpy."""
    if isinstance(value, (str, bytes, bool, int, float, np.ndarray, np.generic)):
        if isinstance(value, np.ndarray) and value.dtype.kind in "OUSV":
            raise TypeError(
                f"field {where!r}: numpy arrays of dtype {value.dtype} cannot be stored; "
                "use numeric arrays, a str, or a list of str"
            )
        return value
    if isinstance(value, Mapping):
        return {str(k): _normalise(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"field {where!r} has type {type(value).__name__}; allowed: numpy array/scalar, str, "
        "bytes, bool, int, float, list or dict of those"
    )


def encode_example(example: Mapping[str, Any]) -> bytes:
    """One example dict -> msgpack bytes (no pickle)."""
    if not isinstance(example, Mapping):
        raise TypeError(f"an example must be a dict of fields, got {type(example).__name__}")
    return serialization.msgpack_serialize(
        {str(k): _normalise(v, str(k)) for k, v in example.items()}
    )


def decode_example(data: bytes) -> dict[str, Any]:
    """msgpack bytes -> the example dict (numpy arrays come back with dtype and shape)."""
    return serialization.msgpack_restore(data)


def describe_features(example: Mapping[str, Any]) -> dict[str, Any]:
    """Feature names -> {"dtype", "shape"} of one example, for the sidecar (human-readable)."""
    out: dict[str, Any] = {}
    for key, value in example.items():
        if isinstance(value, str):
            out[key] = {"dtype": "str", "shape": []}
        elif isinstance(value, bytes):
            out[key] = {"dtype": "bytes", "shape": []}
        elif isinstance(value, Mapping):
            out[key] = {"dtype": "dict", "features": describe_features(value)}
        elif isinstance(value, (list, tuple)):
            inner = sorted({type(v).__name__ for v in value})
            out[key] = {"dtype": "list", "shape": [len(value)], "item_types": inner}
        else:
            arr = np.asarray(value)
            out[key] = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
    return out


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_records(
    path_prefix: str | os.PathLike,
    examples: Iterable[Mapping[str, Any]],
    *,
    num_shards: int = 1,
    progress: bool = True,
    total: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> list[str]:
    """Writes examples to `num_shards` ArrayRecord files plus the `<prefix>.json` sidecar.

    Each shard is written under a temporary name in the same directory and renamed into place
    only once every shard is complete, and the sidecar is written last (atomically), so a crash
    never leaves a half-written file under a final name. `total` only sizes the progress bar;
    `metadata` (JSON-serialisable, e.g. class names) is stored in the sidecar.

    Returns the shard paths in order.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    prefix = os.fspath(path_prefix)
    directory = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(directory, exist_ok=True)
    finals = [shard_name(prefix, i, num_shards) for i in range(num_shards)]
    temps = [f"{f}.tmp.{os.getpid()}" for f in finals]
    writers = [ArrayRecordWriter(t, WRITER_OPTIONS) for t in temps]
    count = 0
    features: dict[str, Any] | None = None
    bar = None
    try:
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"writing {os.path.basename(prefix)}", unit="ex")
        for example in examples:
            if features is None:
                features = describe_features(example)
            writers[count % num_shards].write(encode_example(example))
            count += 1
            if bar is not None:
                bar.update(1)
        for w in writers:
            if not w.ok():
                raise OSError(f"ArrayRecord writer failed while writing {prefix}")
            w.close()
        if count == 0:
            raise ValueError(f"no examples to write to {prefix!r}: the input iterable was empty")
        for t, f in zip(temps, finals):
            os.replace(t, f)
    except BaseException:
        for w in writers:
            if w.is_open():
                w.close()
        for t in temps:
            if os.path.exists(t):
                os.remove(t)
        raise
    finally:
        if bar is not None:
            bar.close()
    write_sidecar(prefix, finals, count, features, metadata)
    return finals


def write_sidecar(prefix: str, shards: Sequence[str], count: int, features: Mapping[str, Any],
                  metadata: Mapping[str, Any] | None = None) -> None:
    """The `<prefix>.json` that makes complete shards a dataset (written last, atomically)."""
    sidecar = {
        "format": FORMAT,
        "serialization": "flax.serialization.msgpack",
        "count": count,
        "num_shards": len(shards),
        "shards": [os.path.basename(f) for f in shards],
        "features": dict(features),
        "metadata": dict(metadata or {}),
    }
    _atomic_write_text(sidecar_path(prefix), json.dumps(sidecar, indent=2) + "\n")
    # Shards of an earlier write with a different shard count would confuse a glob; the sidecar
    # now names the current ones, so the stale ones can go.
    for stale in glob.glob(f"{glob.escape(prefix)}-*-of-*{SHARD_SUFFIX}"):
        if stale not in shards:
            os.remove(stale)


def write_shard(path: str, examples: Iterable[Mapping[str, Any]]) -> int:
    """One complete shard file: written under a temporary name, renamed when done. Returns the
    number of records (for writers that build a dataset shard by shard, resumably)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = f"{path}.tmp.{os.getpid()}"
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    count = 0
    try:
        for example in examples:
            writer.write(encode_example(example))
            count += 1
        if not writer.ok():
            raise OSError(f"ArrayRecord writer failed while writing {path}")
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        if writer.is_open():
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


def _missing_error(prefix: str, detail: str) -> FileNotFoundError:
    if os.path.isdir(prefix):
        cars = glob.glob(os.path.join(glob.escape(prefix), "*.json"))
        splits = sorted(os.path.basename(p).removesuffix(".json") for p in cars)
        if splits:
            return FileNotFoundError(
                f"{prefix!r} is a dataset directory; pass a split prefix instead, one of "
                f"{[os.path.join(prefix, s) for s in splits]}"
            )
    name = os.path.basename(os.path.dirname(os.path.abspath(prefix))) or "NAME"
    out = os.path.dirname(prefix) or "DIR"
    return FileNotFoundError(
        f"no dataset at {prefix!r} ({detail}). Create it with "
        f"`python -m ediffi_jax.data.prepare {name} --out {out}` "
        "(`python -m ediffi_jax.data.prepare --help` lists the dataset names)"
    )


class RecordSource:
    """Random-access source over a dataset written by `write_records` (len + getitem -> dict).

    Pass the prefix (`DIR/train`) or an explicit list of shard files. Picklable, so it can feed
    grain's multiprocess workers.
    """

    def __init__(self, path_prefix_or_files: str | os.PathLike | Sequence[str | os.PathLike]):
        import grain

        self.info: dict[str, Any] = {}
        if isinstance(path_prefix_or_files, (str, os.PathLike)):
            prefix = os.fspath(path_prefix_or_files)
            self.prefix: str | None = prefix
            car = sidecar_path(prefix)
            if os.path.exists(car):
                with open(car) as f:
                    self.info = json.load(f)
                directory = os.path.dirname(prefix)
                files = [os.path.join(directory, s) for s in self.info.get("shards", [])]
            else:
                files = sorted(glob.glob(f"{glob.escape(prefix)}-*-of-*{SHARD_SUFFIX}"))
            if not files:
                raise _missing_error(prefix, f"neither {car!r} nor {prefix}-*{SHARD_SUFFIX} exist")
        else:
            self.prefix = None
            files = [os.fspath(f) for f in path_prefix_or_files]
            if not files:
                raise ValueError("RecordSource needs a path prefix or a non-empty list of files")
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise _missing_error(self.prefix or files[0], f"shard files missing: {missing}")
        self.files = files
        self._source = grain.sources.ArrayRecordDataSource(files)
        expected = self.info.get("count")
        if expected is not None and expected != len(self._source):
            raise ValueError(
                f"{self.prefix!r}: the sidecar says {expected} records but the shards hold "
                f"{len(self._source)}; the dataset is incomplete -- write it again"
            )

    @property
    def features(self) -> dict[str, Any]:
        return self.info.get("features") or {}

    @property
    def metadata(self) -> dict[str, Any]:
        return self.info.get("metadata") or {}

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self._source)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"record index {index} out of range for {n} records")
        return decode_example(self._source[index % n])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Batched read: one ArrayRecord call for many records (several times faster)."""
        return [decode_example(b) for b in self._source.__getitems__([int(i) for i in indices])]

    # grain's name for the batched read (SupportsBatchedReadRandomAccessDataSource).
    _getitems = __getitems__

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        where = self.prefix if self.prefix is not None else self.files
        return f"RecordSource({where!r}, {len(self)} records)"
