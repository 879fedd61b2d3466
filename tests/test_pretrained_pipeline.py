"""A tiny SD-like diffusers pipeline (tools/sd_pipeline_fixture.py) sampled end to end by the
project's samplers: the Flax U-Net, the discrete-time bridge, CFG on the negative embeddings
and the VAE decode against diffusers' EulerDiscreteScheduler and DPMSolverMultistepScheduler
loops from the same initial latents on the same sigmas."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.encoders import hf
from ediffi_jax.models.conditioning import PromptConditioning
from ediffi_jax.pipeline.pretrained import load_pretrained, read_pipeline

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers", "tiny_sd")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="module")
def pipe():
    return load_pretrained(FIXTURE)


def _cond(ref):
    b, n = ref["cond"].shape[:2]
    ones = jnp.ones((b, n), jnp.float32)
    return PromptConditioning(context=jnp.asarray(ref["cond"]), context_mask=ones,
                              negative_context=jnp.asarray(ref["uncond"]), negative_mask=ones)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sampling_matches_diffusers(pipe, ref, sampler):
    sigmas = ref[f"{sampler}_sigmas"]
    # The fixture's sigmas are the checkpoint's own spacing for each scheduler.
    plan = pipe.plan(sampler=sampler, guidance_scale=float(ref["guidance"]), sigmas=sigmas)
    # diffusers starts from noise * init_noise_sigma = sqrt(sigma_max^2 + 1) (leading spacing).
    x = jnp.asarray(ref["noise"].transpose(0, 2, 3, 1)) * np.sqrt(sigmas[0] ** 2 + 1)
    latents = pipe.denoise(plan, _cond(ref), x)
    want = ref[f"{sampler}_latents"].transpose(0, 2, 3, 1)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(latents) / scale, want / scale, atol=1e-4)
    image = np.asarray(pipe.decode(latents))
    np.testing.assert_allclose(image, ref[f"{sampler}_image"].transpose(0, 2, 3, 1), atol=1e-3)


def test_euler_spacing_is_the_checkpoints_own(pipe, ref):
    np.testing.assert_allclose(pipe.sigmas(int(ref["steps"])), ref["euler_sigmas"], rtol=1e-5)


def test_guidance_uses_the_negative_embeddings(pipe, ref):
    """CFG's unconditional branch is the negative prompt's encoding, not zeros: changing it
    changes the sample, and guidance 1 ignores it."""
    sigmas = ref["euler_sigmas"]
    x = jnp.asarray(ref["noise"].transpose(0, 2, 3, 1)) * sigmas[0]
    cond = _cond(ref)
    other = cond.replace(negative_context=cond.negative_context + 1.0)
    for scale, differs in ((4.0, True), (1.0, False)):
        plan = pipe.plan(sampler="euler", guidance_scale=scale, sigmas=sigmas)
        a, b = (np.asarray(pipe.denoise(plan, c, x)) for c in (cond, other))
        assert (np.abs(a - b).max() > 1e-3) == differs


def test_sample_draws_named_noise_and_decodes(pipe, ref):
    plan = pipe.plan(num_steps=3, sampler="euler", guidance_scale=2.0)
    images = np.asarray(pipe.sample(plan, _cond(ref), seed=0, size=(16, 24)))
    assert images.shape == (2, 16, 24, 3) and np.isfinite(images).all()
    again = np.asarray(pipe.sample(plan, _cond(ref), seed=0, size=(16, 24)))
    np.testing.assert_array_equal(images, again)
    with pytest.raises(ValueError, match="multiple of the VAE's factor 2"):
        pipe.sample(plan, _cond(ref), size=(15, 24))


def test_sharded_load_places_each_tensor_on_its_shard(pipe, ref):
    """On a (data 2, fsdp 2, tensor 2) mesh the weights load straight onto the rules table's
    shardings (conv outputs over fsdp, attention heads and MLP widths over tensor) and the
    sampled latents equal the single-device ones."""
    import jax

    from ediffi_jax.parallel.mesh import make_mesh

    mesh = make_mesh((2, 2, 2), jax.devices()[:8])
    sharded = load_pretrained(FIXTURE, mesh=mesh)
    kernel = sharded.unet_params["down_blocks.0"]["resnets.0"]["conv1"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape
    assert kernel.sharding.shard_shape(kernel.shape)[-1] == kernel.shape[-1] // 2  # fsdp
    ff = sharded.unet_params["down_blocks.0"]["attentions.0"]["transformer_blocks.0"]["ff"]
    proj = ff["net.0.proj"]["kernel"]
    assert proj.sharding.shard_shape(proj.shape)[-1] == proj.shape[-1] // 2  # tensor
    assert sharded.vae_params["decoder"]["conv_in"]["kernel"].sharding.mesh.shape == mesh.shape
    sigmas = ref["euler_sigmas"]
    plan = pipe.plan(sampler="euler", guidance_scale=float(ref["guidance"]), sigmas=sigmas)
    x = jnp.asarray(ref["noise"].transpose(0, 2, 3, 1)) * sigmas[0]
    want = np.asarray(pipe.denoise(plan, _cond(ref), x))
    got = np.asarray(sharded.denoise(plan, _cond(ref), x))
    scale = np.abs(want).max()  # partitioned reductions reorder float32 sums: 1e-5 relative
    np.testing.assert_allclose(got / scale, want / scale, atol=1e-5)


def _copy(tmp_path):
    target = tmp_path / "pipe"
    shutil.copytree(FIXTURE, target)
    return target


def test_model_index_errors_name_the_component(tmp_path):
    target = _copy(tmp_path)
    index = json.loads((target / "model_index.json").read_text())
    (target / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "VQModel"]}))
    with pytest.raises(hf.CheckpointError, match="vae is a VQModel"):
        read_pipeline(str(target))
    (target / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(target / "vae")
    with pytest.raises(hf.CheckpointError, match="lists vae/, which is missing"):
        read_pipeline(str(target))


def test_corrupt_weights_are_named(tmp_path):
    target = _copy(tmp_path)
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(hf.CheckpointError, match="diffusion_pytorch_model.safetensors is unreadable"):
        load_pretrained(str(target))


def test_unported_unet_field_is_named(tmp_path):
    target = _copy(tmp_path)
    config = json.loads((target / "unet" / "config.json").read_text())
    config["time_embedding_type"] = "fourier"
    (target / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="time_embedding_type"):
        load_pretrained(str(target))


def test_prompts_encode_as_diffusers_and_sample_to_its_image(pipe, ref):
    from ediffi_jax.encoders.prompt import PromptEncoder

    encoder = PromptEncoder(FIXTURE)
    np.testing.assert_array_equal(encoder.token_ids("a red circle"), ref["text_ids"])
    cond = encoder.encode(["a red circle", "two blue squares on grass"], ["", "blurry"])
    np.testing.assert_allclose(np.asarray(cond.context), ref["text_cond"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(cond.negative_context), ref["text_uncond"], atol=1e-4)
    sigmas = ref["euler_sigmas"]
    plan = pipe.plan(sampler="euler", guidance_scale=float(ref["guidance"]), sigmas=sigmas)
    x = jnp.asarray(ref["noise"].transpose(0, 2, 3, 1)) * np.sqrt(sigmas[0] ** 2 + 1)
    image = np.asarray(pipe.decode(pipe.denoise(plan, cond, x)))
    np.testing.assert_allclose(image, ref["text_euler_image"].transpose(0, 2, 3, 1), atol=1e-3)
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        encoder.encode(["a", "b"], ["c"])


def test_command_line_samples_a_pipeline_folder(tmp_path, capsys):
    from PIL import Image

    from sample.__main__ import main

    out = tmp_path / "out"
    rc = main(["--pretrained", FIXTURE, "--prompt", "a red circle", "--prompt", "a blue square",
               "--negative-prompt", "blurry", "--num", "1", "--steps", "2", "--size", "16x24",
               "--batch", "1", "--mesh=1,1,-1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "wrote samples 0-0" in capsys.readouterr().out  # two batches of one
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["0000_a_red_circle.png", "0001_a_blue_square.png", "grid.png"]
    assert np.asarray(Image.open(out / pngs[0])).shape == (16, 24, 3)


@pytest.mark.parametrize("extra, message", [
    (["--size", "15x24"], "multiple of the VAE's factor 2"),
    (["--negative-prompt", "a", "--negative-prompt", "b", "--negative-prompt", "c"],
     "3 --negative-prompt for 1 --prompt"),
    (["--paint-layers", "mid"], "--paint-layers: not available with --pretrained"),
    (["--paint-mask", "a square=missing.png"], "missing.png"),
    (["--config.sampling.num_steps=3"], "not available with --pretrained"),
])
def test_command_line_bad_input(tmp_path, capsys, extra, message):
    from sample.__main__ import main

    rc = main(["--pretrained", FIXTURE, "--prompt", "a red circle", "--steps", "1",
               "--out", str(tmp_path / "out")] + extra)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_command_line_paints_a_pipeline_folder(tmp_path, capsys):
    """--paint-mask with --pretrained: the PNG is the library's painted sample (masks at the
    output size on the phrase's CLIP tokens, the bias in every cross-attention), not the
    unpainted one; a phrase missing from the prompt is named before any
    sampling."""
    from PIL import Image

    from ediffi_jax.encoders.prompt import PromptEncoder
    from ediffi_jax.paint.bias import PaintSettings
    from ediffi_jax.paint.masks import PhraseMask
    from ediffi_jax.pipeline.generate import to_uint8
    from sample.__main__ import main

    mask = np.zeros((16, 24), np.uint8)
    mask[:, :12] = 255
    Image.fromarray(mask).save(tmp_path / "left.png")
    args = ["--pretrained", FIXTURE, "--prompt", "a red circle", "--num", "1", "--steps", "2",
            "--size", "16x24", "--paint-weight", "max", "--paint-scale", "4"]
    rc = main(args + ["--paint-mask", f"circle={tmp_path / 'left.png'}",
                      "--out", str(tmp_path / "painted")])
    assert rc == 0, capsys.readouterr().err
    got = np.asarray(Image.open(tmp_path / "painted" / "0000_a_red_circle.png")).astype(int)
    pipe, encoder = load_pretrained(FIXTURE), PromptEncoder(FIXTURE)
    masks = encoder.paint_masks(["a red circle"], [PhraseMask("circle", mask / 255.0)], 4.0)
    cond = encoder.encode(["a red circle"]).replace(paint=jnp.asarray(masks))
    plan = pipe.plan(2, paint=PaintSettings("max"))
    want = np.asarray(to_uint8(pipe.sample(plan, cond, size=(16, 24))))[0].astype(int)
    assert np.abs(got - want).max() <= 1
    plain = np.asarray(to_uint8(pipe.sample(pipe.plan(2), cond.replace(paint=None),
                                            size=(16, 24))))[0].astype(int)
    assert np.abs(plain - got).max() > 2
    rc = main(args + ["--paint-mask", f"square={tmp_path / 'left.png'}",
                      "--out", str(tmp_path / "bad")])
    assert rc == 2 and "phrase 'square' is not in the prompt" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
