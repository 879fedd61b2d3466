"""The checkpoint loader on diffusers' file layout: stems, fp16 variants, sharded variant
indexes, whole-file strictness and the dotted-module naming rule."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ediffi_jax.encoders import hf

STEM = "diffusion_pytorch_model"


def _abstract():
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    return {"conv_in": {"kernel": s(3, 3, 2, 4), "bias": s(4)},
            "down_blocks.0": {"resnets.0": {"norm1": {"scale": s(4), "bias": s(4)},
                                            "time_emb_proj": {"kernel": s(8, 4), "bias": s(4)}}}}


def _torch_tensors(rng):
    return {
        "conv_in.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
        "conv_in.bias": rng.normal(size=(4,)).astype(np.float32),
        "down_blocks.0.resnets.0.norm1.weight": rng.normal(size=(4,)).astype(np.float32),
        "down_blocks.0.resnets.0.norm1.bias": rng.normal(size=(4,)).astype(np.float32),
        "down_blocks.0.resnets.0.time_emb_proj.weight": rng.normal(size=(4, 8)).astype(np.float32),
        "down_blocks.0.resnets.0.time_emb_proj.bias": rng.normal(size=(4,)).astype(np.float32),
    }


def test_diffusers_names_follow_the_dotted_modules():
    names = hf.diffusers_names(_abstract())
    assert names[("conv_in", "kernel")] == ("conv_in.weight", "conv")
    assert names[("down_blocks.0", "resnets.0", "norm1", "scale")] == (
        "down_blocks.0.resnets.0.norm1.weight", "norm")
    assert names[("down_blocks.0", "resnets.0", "time_emb_proj", "kernel")] == (
        "down_blocks.0.resnets.0.time_emb_proj.weight", "linear")
    # A bare nn.Parameter (IF's attention pool) keeps its own name, copied as it is.
    assert hf.diffusers_names({"pool": {"positional_embedding": jax.ShapeDtypeStruct(
        (2,), jnp.float32)}}) == {("pool", "positional_embedding"):
                                  ("pool.positional_embedding", "raw")}


def test_fp16_variant_loads_cast_and_transposed(tmp_path):
    tensors = _torch_tensors(np.random.default_rng(0))
    save_file({k: v.astype(np.float16) for k, v in tensors.items()},
              str(tmp_path / f"{STEM}.fp16.safetensors"))
    abstract = _abstract()
    params = hf.load(str(tmp_path), hf.diffusers_names(abstract), abstract, stem=STEM,
                     variant="fp16", whole_file=True)
    kernel = params["conv_in"]["kernel"]
    assert kernel.dtype == np.float32 and kernel.shape == (3, 3, 2, 4)
    np.testing.assert_array_equal(kernel, tensors["conv_in.weight"].astype(np.float16)
                                  .astype(np.float32).transpose(2, 3, 1, 0))
    dense = params["down_blocks.0"]["resnets.0"]["time_emb_proj"]["kernel"]
    np.testing.assert_allclose(dense, tensors["down_blocks.0.resnets.0.time_emb_proj.weight"].T,
                               atol=1e-2)
    # Without the variant the fp32 file is looked for, and its absence named.
    with pytest.raises(hf.CheckpointError, match=f"{STEM}.safetensors.*found"):
        hf.load(str(tmp_path), hf.diffusers_names(abstract), abstract, stem=STEM)


def test_sharded_variant_index(tmp_path):
    tensors = _torch_tensors(np.random.default_rng(1))
    names = sorted(tensors)
    shards = {f"{STEM}-0000{i}-of-00002.fp16.safetensors": names[i - 1::2] for i in (1, 2)}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in keys})
    with open(tmp_path / f"{STEM}.safetensors.index.fp16.json", "w") as f:
        json.dump({"weight_map": weight_map}, f)
    abstract = _abstract()
    params = hf.load(str(tmp_path), hf.diffusers_names(abstract), abstract, stem=STEM,
                     variant="fp16", whole_file=True)
    np.testing.assert_array_equal(params["conv_in"]["bias"], tensors["conv_in.bias"])
    os.remove(tmp_path / next(iter(shards)))
    with pytest.raises(hf.CheckpointError, match="lists .*00001-of-00002.fp16.safetensors"):
        hf.SafetensorsDir(str(tmp_path), STEM, "fp16")


def test_whole_file_rejects_a_tensor_of_another_namespace(tmp_path):
    tensors = _torch_tensors(np.random.default_rng(2))
    tensors["add_embedding.linear_1.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(tmp_path / f"{STEM}.safetensors"))
    abstract = _abstract()
    names = hf.diffusers_names(abstract)
    # Per-namespace strictness (the encoders' rule) would not see it; the whole-file rule does.
    hf.load(str(tmp_path), names, abstract, stem=STEM)
    with pytest.raises(hf.CheckpointError, match="add_embedding.linear_1.weight"):
        hf.load(str(tmp_path), names, abstract, stem=STEM, whole_file=True)
