"""Prompts -> Conditioning with (tiny, project-made) real encoders; precompute into records,
resumable; training reads the precomputed conditioning."""
import os

import numpy as np
import pytest

from ediffi_jax.config import ConfigError, load_config
from ediffi_jax.data.embeddings import ConditioningLayout
from ediffi_jax.data.records import RecordSource, write_records
from ediffi_jax.encoders.conditioner import EncodersConfig, PretrainedEncoder
from ediffi_jax.encoders.tiny import write_t5, write_tiny_encoders
from tests.test_branching import MICRO
from tests.tiny import tiny_unet_config

WIDTH = 8


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return write_tiny_encoders(str(tmp_path_factory.mktemp("enc")), width=WIDTH)


def model_config(**kw):
    sizes = dict(t5_dim=WIDTH, t5_length=8, clip_dim=WIDTH, clip_length=8,
                 clip_pooled_dim=WIDTH, clip_image_dim=WIDTH)
    return tiny_unet_config(**{**sizes, **kw})


def test_tiny_encoders_are_deterministic(encoders, tmp_path):
    write_t5(str(tmp_path / "t5"), width=WIDTH)
    for name in ("model.safetensors", "spiece.model", "config.json"):
        assert (tmp_path / "t5" / name).read_bytes() == open(os.path.join(encoders["t5"], name), "rb").read()


def test_prompts_become_masked_conditioning(encoders):
    enc = PretrainedEncoder(EncodersConfig(**encoders), model_config())
    prompts = ["a red circle", "a small blue square at the top left"]
    cond = enc.encode(prompts)
    t5_len = [len(enc.t5_tokenizer(p)["input_ids"]) for p in prompts]
    np.testing.assert_array_equal(cond.t5_mask.sum(1), np.minimum(t5_len, 8))
    assert cond.clip_mask[0].sum() == 5  # <sot> a red circle <eot>
    for tokens, mask in ((cond.t5_tokens, cond.t5_mask), (cond.clip_tokens, cond.clip_mask)):
        assert np.all(tokens[mask == 0] == 0) and np.all(np.abs(tokens[mask == 1]).sum(-1) > 0)
    assert np.all(cond.clip_image == 0) and np.all(np.abs(cond.clip_pooled).sum(-1) > 0)
    # Long contexts run on the shortest length bucket (32 here), yet equal the full length.
    from ediffi_jax.encoders.tokenizers import tokenize

    long = PretrainedEncoder(EncodersConfig(**encoders), model_config(t5_length=96, clip_length=77))
    bucketed = long.encode(prompts)
    ids, mask = tokenize(long.t5_tokenizer, prompts, 96, "T5 prompt")
    full = np.asarray(long.t5.apply(long.t5.params, ids, mask)) * mask[..., None]
    np.testing.assert_allclose(bucketed.t5_tokens, full, atol=1e-5)
    ids, mask = tokenize(long.clip_tokenizer, prompts, 77, "CLIP prompt")
    hidden, _, pooled = long.clip_text.apply(long.clip_text.params, ids, mask)
    np.testing.assert_allclose(bucketed.clip_pooled, np.asarray(pooled), atol=1e-5)
    np.testing.assert_allclose(bucketed.clip_tokens, np.asarray(hidden) * mask[..., None], atol=1e-5)
    # The same prompt gives the same vectors in any batch.
    alone = enc.encode(prompts[1:])
    np.testing.assert_allclose(alone.t5_tokens[0], cond.t5_tokens[1], atol=1e-6)

    # Style images fill the CLIP image embedding, one per prompt.
    red = np.zeros((40, 60, 3), np.uint8) + np.array([220, 20, 20], np.uint8)
    blue = np.zeros((32, 32, 3), np.uint8) + np.array([20, 20, 220], np.uint8)
    styled = enc.encode(prompts, [red, blue])
    assert np.abs(styled.clip_image[0] - styled.clip_image[1]).max() > 1e-3
    np.testing.assert_array_equal(styled.t5_tokens, cond.t5_tokens)


def test_absent_parts_are_zeros_and_sizes_must_agree(encoders):
    only_clip = PretrainedEncoder(EncodersConfig(clip_text=encoders["clip_text"]), model_config())
    cond = only_clip.encode(["a red circle"])
    assert np.all(cond.t5_tokens == 0) and np.all(cond.t5_mask == 0)
    assert cond.clip_mask.sum() == 5
    with pytest.raises(ConfigError, match="style image needs a CLIP vision tower"):
        only_clip.encode(["a red circle"], [np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ConfigError, match="model.t5_dim is 6 but encoders.t5 d_model is 8"):
        PretrainedEncoder(EncodersConfig(t5=encoders["t5"]), model_config(t5_dim=6))


def _dataset(tmp_path, n=5):
    rng = np.random.default_rng(0)
    captions = ["a red circle", "a blue square", "a green triangle at the top", "a yellow circle",
                "a big magenta square in the centre"]
    write_records(str(tmp_path / "raw" / "train"), [
        {"image": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "caption": captions[i % 5]}
        for i in range(n)], progress=False)
    return str(tmp_path / "raw" / "train")


def _config(encoders, extra=()):
    sections = [f"--config.encoders.{k}={v}" for k, v in encoders.items()]
    dims = [f"--config.model.{k}={WIDTH}" for k in ("t5_dim", "clip_dim", "clip_pooled_dim",
                                                   "clip_image_dim", "t5_length", "clip_length")]
    from ediffi_jax.runs.spec import run_schema

    return load_config("configs/tiny.py", MICRO + dims + sections + list(extra), run_schema())


def test_precompute_stores_what_the_encoders_give_and_resumes(encoders, tmp_path, monkeypatch):
    import ediffi_jax.data.precompute as pc
    from ediffi_jax.data import records

    data = _dataset(tmp_path)
    config = _config(encoders)
    out = str(tmp_path / "cond" / "train")
    # Interrupted after the first of three chunks: nothing readable yet, one chunk on disk.
    real_write = records.write_shard
    calls = []

    def flaky(path, examples):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(path, examples)

    monkeypatch.setattr(pc, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        pc.precompute(config, data, out, images=True, batch=2, chunk=2, log=lambda *_: None)
    assert not os.path.exists(f"{out}.json")
    monkeypatch.setattr(pc, "write_shard", real_write)
    with pytest.raises(ConfigError, match="other settings .*dtype"):
        pc.precompute(config, data, out, images=True, dtype="bfloat16", batch=2, chunk=2)
    written = []
    monkeypatch.setattr(pc, "write_shard", lambda p, e: written.append(p) or real_write(p, e))
    pc.precompute(config, data, out, images=True, batch=2, chunk=2, log=lambda *_: None)
    assert [os.path.basename(p) for p in written] == ["train-00001-of-00003.array_record",
                                                      "train-00002-of-00003.array_record"]

    source = RecordSource(out)
    assert len(source) == 5 and source.metadata["conditioning"]["parts"] == ["t5", "clip_text", "clip_image"]
    enc = PretrainedEncoder(EncodersConfig(**encoders), model_config())
    raw = RecordSource(data)
    layout = ConditioningLayout.for_model(model_config(), "float16")
    for i in range(5):
        want = enc.encode([raw[i]["caption"]], [raw[i]["image"]])
        got = layout.unpack(source[i]["cond"])
        np.testing.assert_array_equal(source[i]["image"], raw[i]["image"])
        for name, value in got.items():
            np.testing.assert_allclose(value, getattr(want, name)[0], atol=2e-3, rtol=2e-3)


def test_training_reads_precomputed_conditioning(encoders, tmp_path):
    import ediffi_jax.data.precompute as pc
    from ediffi_jax.training.trainer import train

    data = _dataset(tmp_path, n=16)
    out = str(tmp_path / "cond" / "train")
    pc.precompute(_config(encoders), data, out, dtype="bfloat16", batch=8, log=lambda *_: None)
    records = ["--config.data.name=records", f"--config.data.path={out}",
               "--config.train.steps=1", "--config.train.checkpoint_every=1"]
    state = train(_config(encoders, records), str(tmp_path / "run"), log=lambda *_: None)
    assert int(state.step) == 1
    with pytest.raises(ConfigError, match="precomputed by the encoders"):
        train(_config({}, records), str(tmp_path / "run2"), log=lambda *_: None)
