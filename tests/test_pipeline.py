"""The grain pipeline: global index, epochs, per-process batches, exact resume (also via orbax),
random transforms, multiprocess prefetch and global device arrays."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.data.pipeline import (
    PickCaption, collate, global_batch_indices,
    make_pipeline, to_global_arrays,
)
from ediffi_jax.data.records import RecordSource, write_records
from ediffi_jax.runs.checkpoint import Checkpointer

N = 10
SOURCE = [{"x": np.int32(i), "image": np.full((2, 2, 3), i, np.uint8), "caption": f"c{i}"}
          for i in range(N)]


class Noise(grain.transforms.RandomMap):
    """A random transform: its draw must depend on the global example position only."""

    def random_map(self, element, rng):
        return {**element, "noise": rng.standard_normal(3).astype(np.float32)}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _global_batches(num_batches, process_count, **kw):
    """Concatenates every process's local batches: what the global array holds."""
    its = [iter(make_pipeline(SOURCE, process_index=p, process_count=process_count,
                              read_threads=1, prefetch_batches=2, **kw))
           for p in range(process_count)]
    out = []
    for _ in range(num_batches):
        local = [next(it) for it in its]
        assert all(len(b["index"]) == kw["global_batch_size"] // process_count for b in local)
        out.append({k: np.concatenate([b[k] for b in local]) for k in local[0]})
    return out


def test_index_is_the_position_in_the_shuffled_repeated_stream():
    ds = make_pipeline(SOURCE, global_batch_size=4, seed=3, num_epochs=2,
                       process_index=0, process_count=1)
    batches = list(ds)
    assert len(batches) == 5  # 20 examples / 4, exactly two epochs
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, np.arange(20))
    assert batches[0]["index"].dtype == np.int64
    for b, step in zip(batches, range(5)):
        np.testing.assert_array_equal(b["index"], global_batch_indices(step, 4))
    x = np.concatenate([b["x"] for b in batches])
    epoch0, epoch1 = x[:10], x[10:]
    assert sorted(epoch0) == list(range(N)) and sorted(epoch1) == list(range(N))
    assert not np.array_equal(epoch0, epoch1)  # a fresh permutation every epoch
    assert not np.array_equal(epoch0, np.arange(N))  # actually shuffled
    # Fields follow their example; captions are batched as strings.
    np.testing.assert_array_equal(batches[1]["image"][:, 0, 0, 0], batches[1]["x"])
    assert batches[1]["caption"].tolist() == [f"c{v}" for v in batches[1]["x"]]
    # Another seed, another order; shuffle=False keeps the source order.
    other = np.concatenate([b["x"] for b in make_pipeline(
        SOURCE, global_batch_size=5, seed=4, num_epochs=1, process_index=0, process_count=1)])
    assert sorted(other) == list(range(N)) and not np.array_equal(other, epoch0)
    plain = list(make_pipeline(SOURCE, global_batch_size=5, seed=4, num_epochs=1, shuffle=False,
                               process_index=0, process_count=1))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in plain]), np.arange(N))


def test_global_batches_do_not_depend_on_the_process_count():
    kw = dict(global_batch_size=4, seed=7, transform=Noise())
    one = _global_batches(6, 1, **kw)  # 6 batches: crosses into the second (reshuffled) epoch
    for p in (2, 4):
        _assert_batches_equal(_global_batches(6, p, **kw), one)
    # Processes read disjoint rows: process 1 of 2 holds the second half of each global batch.
    it = iter(make_pipeline(SOURCE, process_index=1, process_count=2, read_threads=1, **kw))
    np.testing.assert_array_equal(next(it)["index"], [2, 3])
    np.testing.assert_array_equal(next(it)["index"], [6, 7])
    # The random draw is a function of the global index: equal indices, equal noise, also
    # under another batch size.
    other = _global_batches(3, 1, global_batch_size=8, seed=7, transform=Noise())
    np.testing.assert_array_equal(np.concatenate([b["noise"] for b in other])[:24],
                                  np.concatenate([b["noise"] for b in one]))


def test_batch_size_and_process_arguments_are_checked():
    with pytest.raises(ValueError, match="6 is not divisible by the process count 4"):
        make_pipeline(SOURCE, global_batch_size=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="process_index must be in"):
        make_pipeline(SOURCE, global_batch_size=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="do not fill one global batch"):
        make_pipeline(SOURCE, global_batch_size=16, seed=0, num_epochs=1)
    with pytest.raises(ValueError, match="cannot be split evenly over 4 processes"):
        make_pipeline(SOURCE, global_batch_size=4, seed=0, num_epochs=1, drop_remainder=False,
                      process_index=0, process_count=4)
    with pytest.raises(TypeError, match="transform must be"):
        make_pipeline(SOURCE, global_batch_size=2, seed=0, transform=3)
    with pytest.raises(ValueError, match="empty"):
        make_pipeline([], global_batch_size=2, seed=0)
    # The default process count is JAX's.
    assert jax.process_count() == 1
    assert len(next(iter(make_pipeline(SOURCE, global_batch_size=4, seed=0)))["x"]) == 4


def test_drop_remainder_false_keeps_the_partial_last_batch():
    sizes = [len(b["x"]) for b in make_pipeline(
        SOURCE, global_batch_size=4, seed=0, num_epochs=1, drop_remainder=False,
        process_index=0, process_count=1)]
    assert sizes == [4, 4, 2]
    # With 2 processes the remainder (2) splits evenly: one row each, all 10 examples seen once.
    seen = []
    for p in range(2):
        batches = list(make_pipeline(SOURCE, global_batch_size=4, seed=0, num_epochs=1,
                                     drop_remainder=False, process_index=p, process_count=2))
        assert [len(b["x"]) for b in batches] == [2, 2, 1]
        seen += [i for b in batches for i in b["index"]]
    assert sorted(seen) == list(range(10))


def test_iterator_state_resumes_on_exactly_the_next_batch():
    def build():
        return make_pipeline(SOURCE, global_batch_size=4, seed=11,
                             transform=[Noise(), PickCaption()], process_index=0,
                             process_count=1, read_threads=2)

    it = iter(build())
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = iter(build())
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 4), expected)


def test_a_checkpoint_of_the_iterator_resumes_exactly(tmp_path):
    """Through the Checkpointer, the one reader and writer of runs."""
    write_records(tmp_path / "data" / "train", SOURCE, num_shards=2, progress=False)

    def build():
        return make_pipeline(RecordSource(tmp_path / "data" / "train"), global_batch_size=4,
                             seed=5, transform=Noise(), process_index=0, process_count=1,
                             read_threads=2)

    reference = iter(build())
    uninterrupted = _take(reference, 7)

    it = iter(build())
    _take(it, 4)
    state = {"w": jnp.arange(3.0)}
    ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(4, state, data_iterator=it, config={"step": 4})
    ckpt.close()
    del it

    restored = iter(build())
    ckpt = Checkpointer(str(tmp_path / "ckpt"), create=False)
    got, step = ckpt.restore(jax.eval_shape(lambda: state), data_iterator=restored)
    assert step == 4 and ckpt.restore_config(4) == {"step": 4}
    np.testing.assert_array_equal(got["w"], state["w"])
    ckpt.close()
    _assert_batches_equal(_take(restored, 3), uninterrupted[4:])


def test_multiprocess_prefetch_gives_the_same_batches_and_resumes(tmp_path):
    write_records(tmp_path / "train", SOURCE, progress=False)

    def build(workers):
        return make_pipeline(RecordSource(tmp_path / "train"), global_batch_size=4, seed=2,
                             num_epochs=2, process_index=0, process_count=1,
                             worker_count=workers, read_threads=1)

    expected = list(build(0))
    it = iter(build(1))
    try:
        got = _take(it, 2)
        state = it.get_state()
    finally:
        it.close()
    _assert_batches_equal(got, expected[:2])
    it = iter(build(1))
    try:
        it.set_state(state)
        _assert_batches_equal(list(it), expected[2:])
    finally:
        it.close()


class CountingSource:
    """A list source that supports grain's batched read and counts how it is read."""

    def __init__(self):
        self.items, self.calls = SOURCE, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.calls.append(1)
        return self.items[i]

    def _getitems(self, indices):
        self.calls.append(len(indices))
        return [self.items[i] for i in indices]


def test_each_batch_is_one_batched_read():
    source = CountingSource()
    it = iter(make_pipeline(source, global_batch_size=4, seed=0, process_index=1, process_count=2,
                            read_threads=0))
    batches = _take(it, 3)
    assert source.calls == [2, 2, 2]
    assert [b["index"].tolist() for b in batches] == [[2, 3], [6, 7], [10, 11]]


def test_collate_and_pick_caption():
    batch = collate([{"a": np.int8(1), "s": "x", "l": [1], "d": {"v": np.zeros(2)}},
                     {"a": np.int8(2), "s": "yy", "l": [2, 3], "d": {"v": np.ones(2)}}])
    assert batch["a"].dtype == np.int8 and batch["a"].tolist() == [1, 2]
    assert batch["s"].tolist() == ["x", "yy"] and batch["l"] == [[1], [2, 3]]
    assert batch["d"]["v"].shape == (2, 2)
    with pytest.raises(ValueError, match="field 'img' has different shapes"):
        collate([{"img": np.zeros((2, 2))}, {"img": np.zeros((3, 2))}])
    with pytest.raises(ValueError, match="different fields"):
        collate([{"a": 1}, {"b": 1}])
    picks = {PickCaption().random_map({"captions": ["p", "q", "r"], "caption": "p"},
                                      np.random.default_rng(s))["caption"] for s in range(30)}
    assert picks == {"p", "q", "r"}
    assert "captions" not in PickCaption().random_map({"captions": ["p"]}, np.random.default_rng(0))


def test_to_global_arrays_shards_the_batch_over_8_devices():
    mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    source = [{"image": np.full((4, 4, 3), i, np.uint8), "label": np.float32(i) / 2,
               "caption": f"c{i}", "objects": {"count": i % 3}} for i in range(40)]
    batch = next(iter(make_pipeline(source, global_batch_size=16, seed=1, read_threads=1)))
    arrays = to_global_arrays(batch, mesh)
    assert set(arrays) == {"image", "label", "index", "objects"}  # the caption stays on the host
    for key, value in (("image", batch["image"]), ("label", batch["label"]),
                       ("index", batch["index"]), ("count", batch["objects"]["count"])):
        arr = arrays["objects"]["count"] if key == "count" else arrays[key]
        assert arr.shape == value.shape
        np.testing.assert_array_equal(np.asarray(arr), value)
        assert len(arr.sharding.device_set) == 8
        shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start)
        assert [s.data.shape[0] for s in shards] == [2] * 8
        for s in shards:
            np.testing.assert_array_equal(np.asarray(s.data), value[s.index[0]])
    assert arrays["index"].dtype == np.int32  # 64-bit fields follow jax's x64 setting
    spec = jax.sharding.PartitionSpec(("data", "fsdp"), None, None, None)
    assert arrays["image"].sharding.spec == spec
    with pytest.raises(ValueError, match="field 'image'.*cannot be laid out"):
        to_global_arrays({"image": batch["image"][:12]}, mesh)
