"""A diffusers U-Net exported from here (runs/diffusers_export.py) is the loader run backwards:
an "expert" (a tiny fixture's params moved by a fixed random tree) exported and loaded again is
the same params bit for bit, under exactly the original file's tensor names and shapes; and
diffusers itself reads the export (fixtures/diffusers/export, made by
tools/diffusers_export_fixture.py) and computes what the Flax U-Net computes on those weights.

The committed fixture holds the export's config.json, the sha256 of each exported tensor
(tensors.json, not the 2 MB of weights) and diffusers' forward on fixed inputs (io.npz);
README.md there has the commands. `python -m tests.test_diffusers_export --out DIR` writes
the expert's export the fixture was made from.
"""
import hashlib
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from ediffi_jax.models import diffusers_unet
from ediffi_jax.runs.diffusers_export import WEIGHTS, unet_config_json, write_diffusers_unet
from ediffi_jax.pipeline import pretrained
from ediffi_jax.pipeline.pretrained import load_component

DIFFUSERS = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers")
UNETS = [name for name in ("tiny_sd", "tiny_sdxl", "tiny_if", "tiny_if2")
         if os.path.isdir(os.path.join(DIFFUSERS, name, "unet"))]
EXPORT = os.path.join(DIFFUSERS, "export")
EXPERT_OF = "tiny_sd"  # the U-Net the committed export was made from


def load_unet(directory, variant=None):
    return load_component(directory, diffusers_unet.DiffusersUNetConfig,
                          diffusers_unet.abstract_boxed, variant)


def expert(params, scale=0.01, seed=0):
    """params + scale * a fixed standard normal tree (each leaf from its own numpy stream,
    keyed by its path), float32: deterministic on any machine."""
    out = {}
    for path, value in flatten_dict(params).items():
        rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        noise = rng.standard_normal(np.shape(value), dtype=np.float32)
        out[path] = np.asarray(value, np.float32) + np.float32(scale) * noise
    return unflatten_dict(out)


def read_tensors(directory, variant=None):
    from safetensors import safe_open

    suffix = f".{variant}" if variant else ""
    with safe_open(os.path.join(directory, f"{WEIGHTS}{suffix}.safetensors"), "numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def sha256(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def assert_same_params(got, want):
    got, want = flatten_dict(got), flatten_dict(want)
    assert sorted(got) == sorted(want)
    for path in want:
        assert got[path].dtype == np.float32, path
        np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))


def test_exporter_writes_the_file_the_loader_reads():
    assert WEIGHTS == pretrained.WEIGHTS


@pytest.mark.parametrize("name", UNETS)
def test_expert_round_trips_bit_for_bit(name, tmp_path):
    source = os.path.join(DIFFUSERS, name, "unet")
    config, params = load_unet(source)
    # Unchanged params give back the original file exactly, tensor by tensor.
    write_diffusers_unet(str(tmp_path / "same"), config, params)
    original = read_tensors(source)
    again = read_tensors(str(tmp_path / "same"))
    assert sorted(again) == sorted(original)
    for tensor in original:
        np.testing.assert_array_equal(again[tensor], original[tensor], err_msg=tensor)
    # An expert: exported, loaded by the project's loader (strict: no tensor left over).
    tuned = expert(params)
    out = str(tmp_path / "expert")
    assert write_diffusers_unet(out, config, tuned) == out
    config2, loaded = load_unet(out)
    assert config2 == config
    assert_same_params(loaded, tuned)
    exported = read_tensors(out)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in original.items()}
    assert {v.dtype for v in exported.values()} == {np.dtype(np.float32)}
    mode = lambda f: os.stat(os.path.join(out, f)).st_mode & 0o777  # noqa: E731
    assert mode(f"{WEIGHTS}.safetensors") == mode("config.json")  # not safetensors' 0600
    # config.json is the checkpoint's own config as the loader read it.
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["_class_name"] == "UNet2DConditionModel"
    with open(os.path.join(source, "config.json")) as f:
        given = json.load(f)
    assert diffusers_unet.DiffusersUNetConfig.from_hf(written) == \
        diffusers_unet.DiffusersUNetConfig.from_hf(given)


@pytest.mark.parametrize("dtype, variant, tag", [("float16", None, "F16"),
                                                 ("bfloat16", "bf16", "BF16")])
def test_half_precision_exports_hold_the_cast_params(dtype, variant, tag, tmp_path):
    import ml_dtypes

    config, params = load_unet(os.path.join(DIFFUSERS, EXPERT_OF, "unet"))
    tuned = expert(params)
    out = str(tmp_path / dtype)
    write_diffusers_unet(out, config, tuned, dtype=dtype, variant=variant)
    with open(os.path.join(out, f"{WEIGHTS}{f'.{variant}' if variant else ''}.safetensors"),
              "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {tag}
    assert header["__metadata__"] == {"format": "pt"}
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    _, loaded = load_unet(out, variant)
    assert_same_params(loaded, unflatten_dict({k: np.asarray(v, target).astype(np.float32)
                                               for k, v in flatten_dict(tuned).items()}))


def test_bad_params_are_named_and_leave_the_folder_alone(tmp_path):
    config, params = load_unet(os.path.join(DIFFUSERS, EXPERT_OF, "unet"))
    out = str(tmp_path / "unet")
    write_diffusers_unet(out, config, params)
    before = read_tensors(out)
    flat = flatten_dict(params)
    conv_in = ("conv_in", "kernel")
    for change, error, message in (
        ({conv_in: flat[conv_in][..., :-1]}, ValueError, "conv_in/kernel has shape"),
        ({("extra", "bias"): np.zeros(3, np.float32)}, ValueError, "extra/bias"),
        ({conv_in: np.full_like(flat[conv_in], np.nan)}, ValueError, "non-finite.*conv_in.weight"),
    ):
        with pytest.raises(error, match=message):
            write_diffusers_unet(out, config, unflatten_dict({**flat, **change}))
    with pytest.raises(ValueError, match="missing.*conv_in/kernel"):
        write_diffusers_unet(out, config, unflatten_dict(
            {k: v for k, v in flat.items() if k != conv_in}))
    with pytest.raises(ValueError, match="beyond float16's range"):
        write_diffusers_unet(out, config, unflatten_dict(
            {**flat, conv_in: np.full_like(flat[conv_in], 1e5)}), dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_diffusers_unet(out, config, params, dtype="int8")
    after = read_tensors(out)
    assert sorted(after) == sorted(before)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["unet"]  # no temporary folder left behind


def fixture_expert():
    """(config, params) of the expert whose export the committed fixture was made from."""
    config, params = load_unet(os.path.join(DIFFUSERS, EXPERT_OF, "unet"))
    return config, expert(params)


def test_diffusers_reads_the_export_as_the_flax_unet_does(tmp_path):
    """The export made here now is the one diffusers read (every tensor's sha256, the
    config), and diffusers' forward on it is the Flax U-Net's on the same params."""
    with open(os.path.join(EXPORT, "tensors.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(EXPORT, "config.json")) as f:
        committed_config = json.load(f)
    io = np.load(os.path.join(EXPORT, "io.npz"))
    config, tuned = fixture_expert()
    out = str(tmp_path / "unet")
    write_diffusers_unet(out, config, tuned)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == committed_config
    exported = read_tensors(out)
    assert sorted(exported) == sorted(manifest)
    for name, value in exported.items():
        assert [list(value.shape), str(value.dtype), sha256(value)] == [
            manifest[name]["shape"], manifest[name]["dtype"], manifest[name]["sha256"]], name
    _, loaded = load_unet(out)
    model = diffusers_unet.DiffusersUNet(config)
    forward = jax.jit(lambda params: model.apply(
        {"params": params}, jnp.asarray(io["sample"].transpose(0, 2, 3, 1)),
        jnp.asarray(io["timestep"]), jnp.asarray(io["encoder_hidden_states"]),
        encoder_attention_mask=jnp.asarray(io["encoder_attention_mask"])))
    got = np.asarray(forward(loaded))
    want = io["output"].transpose(0, 2, 3, 1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # The expert's weights matter: the original U-Net's output is far from it.
    _, original = load_unet(os.path.join(DIFFUSERS, EXPERT_OF, "unet"))
    assert np.abs(np.asarray(forward(original)) - want).max() > 1e-2


def test_config_json_lists_every_field():
    import dataclasses

    config, _ = load_unet(os.path.join(DIFFUSERS, EXPERT_OF, "unet"))
    written = unet_config_json(config)
    assert set(written) == {"_class_name"} | {f.name for f in dataclasses.fields(config)}
    assert diffusers_unet.DiffusersUNetConfig.from_hf(written) == config


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the expert's diffusers export that "
                                     "tools/diffusers_export_fixture.py reads")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    write_diffusers_unet(args.out, *fixture_expert())
    print("wrote", args.out)
