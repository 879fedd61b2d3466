"""The grain input pipeline: global shuffle, epochs, per-process batches, exact resume.

Order of operations (all on grain's random-access `MapDataset`, so the iterator state is one
integer -- the number of batches consumed -- and resuming is exact):

    source -> seed -> shuffle (global; a fresh permutation every epoch) -> repeat(num_epochs)
           -> attach "index" -> transform(s) -> this process's batches of G / P -> iterator

The global example index ("index", int64) is the example's position in the repeated, shuffled
global stream: epoch * len(source) + position in that epoch's permutation. It is attached before
the per-process split, so it does not depend on the number of processes, devices or the batch
size, and the trainer can derive per-example randomness with `jax.random.fold_in(key, index)`.
Random transforms (`grain.transforms.RandomMap`) are seeded by the same global position.
(grain seeds epoch e's permutation with seed + e, so runs with seeds s and s+1 see the same
orders shifted by one epoch; pick seeds far apart for independent runs.)

Per-process split: global batch b holds the stream positions [b*G, (b+1)*G) and process p
reads the contiguous block [b*G + p*G/P, b*G + (p+1)*G/P). Concatenating the processes' local
batches in process order therefore gives the same global batch, in the same order, for any P.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

INDEX_KEY = "index"
DEFAULT_BATCH_SPEC = PartitionSpec(("data", "fsdp"))


class AddIndex(grain.transforms.MapWithIndex):
    """Adds the global stream position as `example["index"]` (int64)."""

    def map_with_index(self, index: int, element: Any) -> dict[str, Any]:
        if not isinstance(element, Mapping):
            raise TypeError(
                f"pipeline elements must be dicts of fields, got {type(element).__name__}"
            )
        if INDEX_KEY in element:
            raise ValueError(
                f"examples already have a field {INDEX_KEY!r}; the pipeline reserves it for the "
                "global example index -- rename the field in the dataset"
            )
        return {**element, INDEX_KEY: np.int64(index)}


class PickCaption(grain.transforms.RandomMap):
    """Picks one of `example["captions"]` (a list) as `example["caption"]` and drops the list.

    Datasets with several captions per image (coco_captions, mnist) keep them all on disk; this
    picks one per visit, so every batch field has a fixed shape.
    """

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        captions = element.get("captions")
        if not captions:
            return element
        out = dict(element)
        out["caption"] = captions[int(rng.integers(len(captions)))]
        del out["captions"]
        return out


def collate(examples: Sequence[Any], _where: str = "") -> Any:
    """Stacks a list of examples into a batch: arrays/numbers -> np.stack, str -> array of str,
    bytes -> object array, lists -> a list per example (kept on the host), dicts recursively."""
    first = examples[0]
    if isinstance(first, Mapping):
        keys = set(first)
        for e in examples:
            if set(e) != keys:
                under = f" under {_where!r}" if _where else ""
                raise ValueError(
                    f"examples in one batch have different fields{under}: "
                    f"{sorted(keys)} vs {sorted(e)}"
                )
        return {k: collate([e[k] for e in examples], f"{_where}.{k}" if _where else k)
                for k in first}
    if isinstance(first, str):
        return np.asarray(examples, dtype=np.str_)
    if isinstance(first, bytes):
        out = np.empty(len(examples), dtype=object)
        out[:] = examples
        return out
    if isinstance(first, (list, tuple)):
        return list(examples)
    try:
        return np.stack([np.asarray(e) for e in examples])
    except ValueError as err:
        shapes = sorted({np.shape(e) for e in examples})
        raise ValueError(
            f"field {_where!r} has different shapes within one batch: {shapes}; resize/pad it in "
            "the transform (or store a fixed shape) before batching"
        ) from err


class _ProcessBatches(grain.MapDataset):
    """This process's batches: batch b is stream positions [b*G + p*B, b*G + (p+1)*B).

    One `_getitems` call per batch, so an ArrayRecord source reads the whole batch at once
    (several times faster than record by record).
    """

    def __init__(self, parent: grain.MapDataset, *, process_index: int, process_count: int,
                 local_batch_size: int, drop_remainder: bool):
        super().__init__(parent)
        self._p = process_index
        self._num = process_count
        self._b = local_batch_size
        self._g = local_batch_size * process_count
        self._parent_length = len(parent)
        self._full, rem = divmod(self._parent_length, self._g)
        self._tail = 0  # rows of the partial last batch per process (drop_remainder=False)
        if rem and not drop_remainder:
            if rem % process_count:
                raise ValueError(
                    f"drop_remainder=False: the last global batch has {rem} examples, which "
                    f"cannot be split evenly over {process_count} processes; use "
                    "drop_remainder=True or a dataset size that divides"
                )
            self._tail = rem // process_count
        self._length = self._full + (1 if self._tail else 0)

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"ProcessBatches(process={self._p}/{self._num}, local_batch={self._b})"

    def positions(self, index: int) -> range:
        """The stream positions (the "index" values) of this process's batch `index`."""
        epoch, b = divmod(index, self._length)
        offset = epoch * self._parent_length
        if b < self._full:
            start = b * self._g + self._p * self._b
            return range(offset + start, offset + start + self._b)
        start = self._full * self._g + self._p * self._tail
        return range(offset + start, offset + start + self._tail)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        examples = self._parent._getitems(list(self.positions(index)))  # noqa: SLF001
        return collate(list(examples))


def _apply_transform(ds: grain.MapDataset, transform: Any) -> grain.MapDataset:
    if transform is None:
        return ds
    if isinstance(transform, (list, tuple)):
        for t in transform:
            ds = _apply_transform(ds, t)
        return ds
    if isinstance(transform, grain.transforms.RandomMap):
        return ds.random_map(transform)
    if isinstance(transform, grain.transforms.MapWithIndex):
        return ds.map_with_index(transform)
    if isinstance(transform, grain.transforms.Map) or callable(transform):
        return ds.map(transform)
    raise TypeError(
        f"transform must be a callable, a grain.transforms.Map/RandomMap/MapWithIndex, or a list "
        f"of those; got {type(transform).__name__}"
    )


def ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside `absl.app.run` nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pipeline(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    transform: Callable | Any | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
    prefetch_batches: int = 8,
) -> grain.IterDataset:
    """This process's batches of `global_batch_size / process_count` examples, as an IterDataset.

    `iter(ds)` gives an iterator whose `get_state()`/`set_state()` resume exactly on the next
    batch (runs/checkpoint.py saves it beside the train state). `num_epochs=None` repeats
    forever; every epoch is a fresh permutation. `transform` is a callable on one example dict, a grain Map/RandomMap/MapWithIndex,
    or a list of them; it sees the "index" field. `worker_count > 0` moves reading and transforms
    into that many worker processes (grain `mp_prefetch`; same batches, same order; workers
    start by spawn, so the source and transforms must be picklable -- module-level classes, no
    lambdas -- and scripts need an `if __name__ == "__main__":` guard);
    `read_threads`/`prefetch_batches` size the in-process thread pool otherwise.
    """
    if process_count is None:
        process_count = jax.process_count()
    if process_index is None:
        process_index = jax.process_index()
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count); got {process_index} of {process_count}"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by the process count "
            f"{process_count}; every process must read the same number of examples per batch"
        )
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    if len(source) == 0:
        raise ValueError(f"the data source {source!r} is empty")
    local_batch_size = global_batch_size // process_count

    ds = grain.MapDataset.source(source).seed(int(seed))
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs)
    ds = ds.map_with_index(AddIndex())
    ds = _apply_transform(ds, transform)
    ds = _ProcessBatches(ds, process_index=process_index, process_count=process_count,
                         local_batch_size=local_batch_size, drop_remainder=drop_remainder)
    if len(ds) == 0:
        raise ValueError(
            f"{len(source)} examples x {num_epochs} epoch(s) do not fill one global batch of "
            f"{global_batch_size}; lower the batch size or use drop_remainder=False"
        )
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    )
    if worker_count > 0:
        ensure_absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return it


def global_batch_indices(step: int, global_batch_size: int) -> np.ndarray:
    """The "index" values in global batch number `step` (0-based): [step*G, (step+1)*G)."""
    return np.arange(step * global_batch_size, (step + 1) * global_batch_size, dtype=np.int64)


# ----------------------------------------------------------------------------- device arrays
def _is_numeric(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"


def to_global_arrays(
    batch: Mapping[str, Any],
    mesh: jax.sharding.Mesh,
    spec: PartitionSpec = DEFAULT_BATCH_SPEC,
) -> dict[str, jax.Array]:
    """This process's batch -> global jax.Arrays with the leading axis sharded by `spec`.

    Only numeric fields move to devices; strings (captions), bytes and lists stay on the host in
    `batch` (text encoders run there). Nested dicts are converted recursively. 64-bit fields become
    32-bit unless jax_enable_x64 is set (what jax would do anyway, made explicit).
    """
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, Mapping):
            nested = to_global_arrays(value, mesh, spec)
            if nested:
                out[key] = nested
            continue
        if not _is_numeric(value):
            continue
        if value.ndim < len(spec):
            raise ValueError(
                f"field {key!r} has shape {value.shape}: it needs at least {len(spec)} dims to "
                f"shard with {spec}"
            )
        value = np.asarray(value, dtype=jax.dtypes.canonicalize_dtype(value.dtype))
        full_spec = PartitionSpec(*spec, *([None] * (value.ndim - len(spec))))
        try:
            out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, full_spec), value)
        except ValueError as err:
            raise ValueError(
                f"field {key!r} (local shape {value.shape}) cannot be laid out as {full_spec} on "
                f"mesh {dict(mesh.shape)}: the local batch must divide over this process's devices"
            ) from err
    return out


__all__ = [
    "INDEX_KEY", "AddIndex", "PickCaption", "collate", "make_pipeline",
    "global_batch_indices",
    "to_global_arrays", "ensure_absl_flags_parsed",
]
