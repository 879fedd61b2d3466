"""The cascade: SR U-Nets with low-res input and noise-level conditioning, degradations and patch
training bookkeeping, stage chaining, and the whole text-to-image pipeline on tiny random models."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image
from safetensors.numpy import save_file

from ediffi_jax.config import ConfigError, load_config
from ediffi_jax.data.stage import DegradeConfig, StageExample, degrade
from ediffi_jax.diffusion import lowres
from ediffi_jax.models.unet import UNet, attention_block_names, conv3x3_levels, conv_layer_paths
from tiny import tiny_conditioning, tiny_params, tiny_unet_config
from ediffi_jax.runs.spec import run_schema
from ediffi_jax.training.step import TrainConfig, with_lowres
from ediffi_jax.training.trainer import train

SR = tiny_unet_config(lowres_scale=2, block_mult=(1, 2), self_attention=False)


def sr_cond(config, batch, size, sigma=0.1, seed=0):
    up = jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1, maxval=1)
    return tiny_conditioning(config, batch).replace(lowres=up, lowres_sigma=jnp.full((batch,), sigma))


def test_sr_unet_layout_blocks_and_attention():
    params = tiny_params(SR)
    # block_mult (1, 2): one block at 16, two at 8 (three on the way up); convs all listed.
    assert {k for k in params if k.startswith("down1_res")} == {"down1_res0", "down1_res1"}
    assert {k for k in params if k.startswith("up1_res")} == {"up1_res0", "up1_res1", "up1_res2"}
    assert set(conv3x3_levels(SR)) <= set(conv_layer_paths(params))
    assert attention_block_names(SR) == ("down1_attn0", "down1_attn1", "mid_attn", "up1_attn0",
                                         "up1_attn1", "up1_attn2")
    # Cross-attention only; the input conv reads 3 noisy + 3 low-res channels.
    assert "self_qkv" not in params["mid_attn"] and "cross_kv" in params["mid_attn"]
    assert params["conv_in"]["kernel"].shape[2] == 6
    assert "self_qkv" in tiny_params(tiny_unet_config())["mid_attn"]


def test_sr_unet_reads_the_lowres_image_and_its_noise_level():
    unet, params = UNet(SR), tiny_params(SR)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    run = lambda cond: unet.apply({"params": params}, x, jnp.zeros(2), cond)  # noqa: E731
    base = run(sr_cond(SR, 2, 16))
    assert base.shape == (2, 16, 16, 3)
    assert float(jnp.abs(run(sr_cond(SR, 2, 16, seed=5)) - base).max()) > 1e-3
    assert float(jnp.abs(run(sr_cond(SR, 2, 16, sigma=0.5)) - base).max()) > 1e-3
    # Fully convolutional at another size (the patch-trained top stage samples whole images).
    big = unet.apply({"params": params}, jnp.zeros((1, 32, 32, 3)), jnp.zeros(1), sr_cond(SR, 1, 32))
    assert big.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="needs cond.lowres"):
        run(tiny_conditioning(SR, 2).replace(lowres=None, lowres_sigma=None))
    with pytest.raises(ValueError, match="must be upsampled"):
        run(sr_cond(SR, 2, 8))


def test_unconditional_branch_keeps_the_lowres_image():
    cond = sr_cond(SR, 2, 16)
    u = cond.unconditional()
    assert float(jnp.abs(u.t5_tokens).max()) == 0 and float(jnp.abs(u.clip_image).max()) == 0
    np.testing.assert_array_equal(u.lowres, cond.lowres)
    np.testing.assert_array_equal(u.lowres_sigma, cond.lowres_sigma)


def test_noise_augmentation_level_and_noise_per_example():
    cfg = TrainConfig(noise_aug_sigma=(0.01, 0.4), seed=3)
    low = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3), minval=-1, maxval=1)
    batch = {"image": jnp.zeros((4, 16, 16, 3)), "lowres": low, "index": jnp.arange(10, 14),
             "crop": jnp.zeros((4, 2), jnp.int32)}
    cond = with_lowres(cfg, tiny_conditioning(SR, 4), batch, 2)
    sigma = np.asarray(cond.lowres_sigma)
    assert np.all((sigma >= 0.01) & (sigma <= 0.4)) and len(set(sigma.round(6))) == 4
    # lowres = upsampled + sigma * N(0, 1): the residual divided by sigma is standard normal.
    z = (np.asarray(cond.lowres) - np.asarray(lowres.upsample(low, 16))) / sigma[:, None, None, None]
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    # Per example: the same global index gives the same level and noise in any batch order.
    flipped = with_lowres(cfg, tiny_conditioning(SR, 4),
                          {k: v[::-1] for k, v in batch.items()}, 2)
    np.testing.assert_allclose(np.asarray(flipped.lowres)[::-1], cond.lowres, atol=1e-6)
    # The network sees c_in(sigma) * lowres and c_noise(sigma) = ln(sigma) / 4 (EDM); the
    # level round-trips through c_noise.
    from ediffi_jax.diffusion.edm import precondition_coefficients, sigma_of_c_noise

    np.testing.assert_allclose(sigma_of_c_noise(precondition_coefficients(sigma)[3]), sigma, rtol=1e-6)
    with pytest.raises(ValueError, match="noise_aug_sigma"):
        TrainConfig(noise_aug_sigma=(0.5, 0.1))


def test_patch_crops_match_the_whole_upsampled_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    plain = DegradeConfig(blur_prob=0, jpeg_prob=0, filters=("box",))
    t = StageExample(resolution=32, patch=16, lowres_scale=2, degrade_config=plain)
    out = t.random_map({"image": image, "caption": "x"}, np.random.default_rng(7))
    whole = np.asarray(Image.fromarray(image).resize((32, 32), Image.LANCZOS))
    y, x = out["crop"]
    assert out["image"].shape == (16, 16, 3) and 0 <= y <= 16 and 0 <= x <= 16
    np.testing.assert_array_equal(out["image"], whole[y:y + 16, x:x + 16])
    np.testing.assert_array_equal(out["lowres"],
                                  np.asarray(Image.fromarray(whole).resize((16, 16), Image.BOX)))
    # On device: the patch's view of the upsampled low-res image is that window of it.
    low = jnp.asarray(out["lowres"], jnp.float32)[None] / 127.5 - 1
    up = lowres.upsample(low, 32)
    np.testing.assert_allclose(lowres.crop(up, jnp.asarray([out["crop"]]), 16)[0],
                               up[0, y:y + 16, x:x + 16], atol=1e-6)
    crops = {tuple(t.random_map({"image": image}, np.random.default_rng(s))["crop"]) for s in range(8)}
    assert len(crops) > 4  # random windows


def test_degradations_are_random_and_configurable():
    image = np.asarray(Image.radial_gradient("L").convert("RGB").resize((32, 32)))
    cfg = DegradeConfig(blur_prob=1.0, jpeg_prob=1.0, jpeg_quality=(20, 20))
    a = degrade(image, 16, cfg, np.random.default_rng(0))
    b = degrade(image, 16, cfg, np.random.default_rng(1))
    clean = degrade(image, 16, DegradeConfig(blur_prob=0, jpeg_prob=0, filters=("box",)),
                    np.random.default_rng(0))
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b) and np.abs(a.astype(int) - clean).mean() > 0.5
    for bad, match in ((dict(filters=("sinc",)), "filters"), (dict(blur_prob=2.0), "blur_prob"),
                       (dict(jpeg_quality=(0, 50)), "jpeg_quality")):
        with pytest.raises(ValueError, match=match):
            DegradeConfig(**bad)


# ----------------------------------------------------------------------------- the pipeline
MICRO = ["model.channels=8", "model.channel_mult=(1,2)", "model.attention_head_dim=4",
         "model.context_dim=8", "model.t5_dim=8", "model.t5_length=8", "model.clip_dim=8",
         "model.clip_length=8", "model.clip_pooled_dim=8", "model.clip_image_dim=8",
         "model.block_mult=(1,2)", "sampling.num_steps=3", "data.name=shapes", "data.path=''"]
STAGES = {  # 8 -> 16 -> 32, the top stage patch-trained at 16
    "base16": ["model.resolution=8", "model.attention_resolutions=(4,)", "model.block_mult=()"],
    "sr32": ["model.resolution=16", "model.attention_resolutions=(8,)"],
    "sr64": ["model.resolution=16", "model.attention_resolutions=(8,)", "data.resolution=32"],
}


def stage_config(stage, extra=()):
    return load_config(f"configs/cascade_emoji.py:{stage}", MICRO + STAGES[stage] + list(extra),
                       schema=run_schema())


def write_stage(root, stage, seed, extra=(), name=None):
    """A tiny random stage as an export: config.json + params.safetensors."""
    from ediffi_jax.config import section
    from ediffi_jax.models.unet import UNetConfig

    config = stage_config(stage, extra)
    out = root / (name or stage)
    out.mkdir()
    params = tiny_params(section(UNetConfig, config.model, "model"), seed)
    save_file({k: np.asarray(v) for k, v in flatten_dict(params, sep="/").items()},
              str(out / "params.safetensors"))
    (out / "config.json").write_text(json.dumps(config.to_dict()))
    return out


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    write_stage(root, "base16", 0)
    write_stage(root, "sr64", 2)
    # The SR32 stage is an ensemble of two experts (as the paper's Config-B's SR256).
    for seed, (name, q) in enumerate((("sr32_lo", "('0','1/2')"), ("sr32_hi", "('1/2','1')"))):
        write_stage(root, "sr32", 3 + seed, [f"train.sigma_quantiles={q}"], name=name)
    (root / "sr32.json").write_text(json.dumps({"experts": ["sr32_lo", "sr32_hi"]}))
    spec = {"stages": [{"ensemble": "base16"}, {"ensemble": "sr32.json", "sampling": {"num_steps": 2}},
                       {"ensemble": "sr64", "paint": False}]}
    (root / "cascade.json").write_text(json.dumps(spec))
    return root


def test_cascade_pipeline_end_to_end(cascade):
    from ediffi_jax.parallel.mesh import make_mesh
    from ediffi_jax.pipeline.cascade import CascadeSampler, read_cascade
    from ediffi_jax.pipeline.generate import generate

    stages = read_cascade(str(cascade / "cascade.json"))
    assert [s.name for s in stages] == ["base16", "sr32", "sr64"]
    assert [s.resolution for s in stages] == [8, 16, 32]
    assert stages[1].sampling.num_steps == 2 and stages[2].sampling.num_steps == 3
    assert len(stages[1].ensemble) == 2
    assert not stages[2].paint
    prompts = ["a red circle", "a blue square", "a green triangle"]
    sampler = CascadeSampler(stages)
    out = sampler(prompts, seed=1)
    assert [o.shape for o in out] == [(3, 8, 8, 3), (3, 16, 16, 3), (3, 32, 32, 3)]
    assert all(o.dtype == np.uint8 and o.std() > 1 for o in out)
    # The base stage is the base model sampled alone; sharding the batch (padded to the 8
    # devices) changes nothing.
    base = stages[0]
    alone = generate(base.run, base.ensemble, prompts, seed=1, sampling=base.sampling,
                     runner=sampler.runners[0])
    np.testing.assert_array_equal(out[0], alone)
    sharded = CascadeSampler(stages, make_mesh((-1, 1, 1)))(prompts, seed=1)
    for a, b in zip(out, sharded):
        assert np.abs(a.astype(int) - b).max() <= 1
    # The SR stages follow their input: another base image gives another upsampled one.
    other = sampler(prompts, seed=2)
    assert np.abs(other[2].astype(int) - out[2]).mean() > 1
    # Paint-with-words masks reach the stages whose entry allows it (not sr64).
    from ediffi_jax.paint.masks import PhraseMask
    from ediffi_jax.pipeline.generate import Paint

    left = np.zeros((32, 32), np.float32)
    left[:, :16] = 1
    paint = Paint((PhraseMask("circle", left, 1.0),), scale=8.0)
    painted = sampler(["a red circle"], seed=1, paint=paint)
    plain = sampler(["a red circle"], seed=1)
    assert np.abs(painted[0].astype(int) - plain[0]).max() > 0
    # From the same input, sr32 (paint on) changes with the masks, sr64 (paint off) does not.
    for k, changes in ((1, True), (2, False)):
        previous = jnp.asarray(plain[k - 1], jnp.float32)[None, 0] / 127.5 - 1
        a, b = (sampler.run_stage(k, ["a red circle"], previous, seed=1, paint=p)
                for p in (paint, None))
        assert (float(jnp.abs(a - b).max()) > 0) == changes


def test_cascade_errors_before_sampling(cascade, tmp_path):
    from ediffi_jax.pipeline.cascade import read_cascade

    path = str(cascade / "cascade.json")
    with pytest.raises(ConfigError, match="not in .*its stages: \\['base16', 'sr32', 'sr64'\\]"):
        read_cascade(path, ["base16", "sr128"])
    with pytest.raises(ConfigError, match="stages do not chain: .sr64. upsamples 16x16 to 32x32 but .base16. makes 8x8"):
        read_cascade(path, ["base16", "sr64"])
    with pytest.raises(ConfigError, match="first stage 'sr32' is a super-resolution model"):
        read_cascade(path, ["sr32", "sr64"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stages": [{"ensemble": str(cascade / "base16"), "guidance": 2}]}))
    with pytest.raises(ConfigError, match="unknown stage keys \\['guidance'\\]"):
        read_cascade(str(bad))
    # A stage not chosen may be untrained; chosen (or all), it is an error.
    pending = tmp_path / "pending.json"
    pending.write_text(json.dumps({"stages": [{"ensemble": str(cascade / "base16")},
                                              {"ensemble": str(tmp_path / "untrained")}]}))
    assert [s.name for s in read_cascade(str(pending), ["base16"])] == ["base16"]
    with pytest.raises(ConfigError, match="untrained"):
        read_cascade(str(pending))
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"stages": [{"ensemble": str(cascade / "base16")},
                                            {"ensemble": str(cascade / "base16")}]}))
    with pytest.raises(ConfigError, match="stage names repeat"):
        read_cascade(str(twice))


def test_sample_cli_runs_the_cascade_in_batches(cascade, tmp_path, capsys):
    from sample.__main__ import main as sample_main

    out = tmp_path / "samples"
    code = sample_main(["--cascade", str(cascade / "cascade.json"), "--stages", "base16,sr32",
                        "--prompt", "a red circle", "--prompt", "a blue square", "--num", "3",
                        "--batch", "4", "--out", str(out), "--config.sr32.sampling.num_steps=1"])
    assert code == 0
    log = capsys.readouterr().out
    assert "wrote samples 0-3" in log and "wrote samples 4-5" in log
    for stage, side in (("base16", 8), ("sr32", 16)):
        files = sorted(f for f in os.listdir(out / stage) if f.endswith(".png") and f != "grid.png")
        assert len(files) == 6 and files[0].startswith("0000_a_red_circle")
        assert Image.open(out / stage / files[0]).size == (side, side)
    assert sample_main(["--cascade", str(cascade / "cascade.json"), "--stages", "sr32",
                        "--prompt", "x", "--out", str(out)]) == 2
    assert "super-resolution model" in capsys.readouterr().err
    # ScaleCrafter on the last stage, past its native 16x16; the base stage is unaffected.
    big = tmp_path / "big"
    assert sample_main(["--cascade", str(cascade / "cascade.json"), "--stages", "base16,sr32",
                        "--prompt", "a red circle", "--num", "1", "--resolution", "32",
                        "--highres", "scalecrafter", "--out", str(big)]) == 0
    log = capsys.readouterr().out
    base_plan, sr_plan = log.split("stage sr32")
    assert "layers [" not in base_plan and "layers [" in sr_plan
    assert Image.open(big / "sr32" / "0000_a_red_circle.png").size == (32, 32)
    assert Image.open(big / "base16" / "0000_a_red_circle.png").size == (8, 8)


def test_trainer_trains_a_patch_sr_stage(tmp_path):
    config = stage_config("sr64", ["train.batch_size=8", "train.steps=2", "train.log_every=1",
                                   "train.checkpoint_every=2", "train.warmup_steps=0"])
    state = train(config, str(tmp_path / "run"), log=lambda *_: None)
    assert int(state.step) == 2 and int(state.nonfinite_total) == 0
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    with pytest.raises(ConfigError, match="data.resolution 8 is smaller"):
        train(stage_config("sr64", ["data.resolution=8"]), str(tmp_path / "bad"))
    with pytest.raises(ConfigError, match="does not divide by model.lowres_scale"):
        train(stage_config("sr64", ["data.resolution=33"]), str(tmp_path / "bad"))
