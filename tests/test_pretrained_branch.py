"""Growing an expert from a pretrained shared model (training/pretrained.py): train.branch
--pretrained fine-tunes the tiny SD pipeline's U-Net on the low-noise half of its timesteps
with the project's trainer, train.export writes it as a pipeline folder, and an experts file
pairs it with its parent. The expert's held-out loss on its own interval drops below the
parent's; a resumed run continues; bad input stops before training."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ediffi_jax.diffusion import discrete
from ediffi_jax.pipeline.pretrained_experts import load_pipeline

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers")
PARENT = os.path.join(FIXTURES, "tiny_sd")
TRAIN = ["--config.train.batch_size=8", "--config.train.lr=1e-3", "--config.train.log_every=4",
         "--config.train.checkpoint_every=8", "--config.data.name=shapes",
         "--config.train.warmup_steps=0", "--config.train.ema_decay=0.5"]  # few steps: a short EMA


def heldout_loss(pipe, t_range, n=16):
    """The checkpoint's own loss on held-out shapes (a seed training never draws), at 8
    timesteps spread over t_range, fixed noise."""
    from ediffi_jax.data.shapes import ShapesConfig, ShapesSource
    from ediffi_jax.encoders.prompt import PromptEncoder
    from ediffi_jax.models import vae as vae_lib

    source = ShapesSource(ShapesConfig(resolution=16, seed=12345))
    examples = [source[i] for i in range(n)]
    images = jnp.asarray(np.stack([np.asarray(e["image"]) for e in examples]), jnp.float32)
    x0 = vae_lib.to_latents(pipe.vae.config, pipe.vae.apply(
        {"params": pipe.vae_params}, images / 127.5 - 1.0, method="encode")[0])
    captions = [e["caption"].decode() if isinstance(e["caption"], bytes) else e["caption"]
                for e in examples]
    cond = PromptEncoder(PARENT).encode(captions)
    losses = []
    for k, t in enumerate(np.linspace(*t_range, 8).astype(int)):
        noise = jax.random.normal(jax.random.key(k), x0.shape)
        ts = jnp.full((n,), t, jnp.int32)
        x_t, target = discrete.vp_training_pair(pipe.schedule, x0, noise, ts)
        out = pipe.unet.apply({"params": pipe.unet_params}, x_t, ts, cond.context)
        losses.append(float(jnp.mean((out - target) ** 2)))
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    from train.branch import main as branch
    from train.export import main as export

    root = tmp_path_factory.mktemp("branch")
    workdir, out = root / "E1_0", root / "tiny_sd-E1_0"
    assert branch(["--pretrained", PARENT, "--node", "1/0", "--workdir", str(workdir),
                   "--config.train.steps=16", *TRAIN]) == 0
    assert export(["--workdir", str(workdir), "--out", str(out)]) == 0
    return root, workdir, out


def test_the_expert_beats_its_parent_on_its_interval(expert):
    _, _, out = expert
    info = json.loads((out / "ediffi_expert.json").read_text())
    assert info["quantiles"] == ["0", "1/2"] and info["step"] == 16
    assert os.path.islink(out / "vae") and not os.path.islink(out / "unet")
    parent, child = load_pipeline(PARENT), load_pipeline(str(out))
    own = (0, 499)
    assert heldout_loss(child, own) < 0.9 * heldout_loss(parent, own)


def test_an_experts_file_pairs_the_expert_with_its_parent(expert, tmp_path):
    from ediffi_jax.pipeline.pretrained_experts import prompt_encoder

    root, _, out = expert
    path = tmp_path / "experts.json"
    path.write_text(json.dumps({"experts": [
        {"pretrained": str(out), "quantiles": ["0", "1/2"]},
        {"pretrained": PARENT, "quantiles": ["1/2", "1"]}]}))
    pipe = load_pipeline(str(path))
    plan = pipe.plan(6, guidance_scale=3.0)
    assert [s.experts for s in plan.segments] == [(1, 1), (0, 0)]
    images = pipe.sample(plan, prompt_encoder(str(path)).encode(["a red circle"]), seed=0,
                         size=(16, 16))
    alone = load_pipeline(PARENT)
    direct = alone.sample(alone.plan(6, guidance_scale=3.0),
                          prompt_encoder(PARENT).encode(["a red circle"]), seed=0, size=(16, 16))
    assert np.abs(np.asarray(images) - np.asarray(direct)).max() > 1e-3  # the expert acted


def test_a_stopped_fine_tune_resumes(expert, capsys):
    from train.branch import main as branch

    _, workdir, _ = expert
    assert branch(["--pretrained", PARENT, "--node", "1/0", "--workdir", str(workdir),
                   "--config.train.steps=24", *TRAIN]) == 0
    printed = capsys.readouterr().out
    assert "resumed tiny_sd on timestep quantiles ('0', '1/2') from step 16" in printed
    assert "done: 24 steps" in printed


@pytest.mark.parametrize("args, message", [
    (["--pretrained", "/nonexistent/sd"], "no such folder"),
    (["--pretrained", os.path.join(FIXTURES, "tiny_if2")], "is a super-resolution stage"),
    (["--pretrained", PARENT, "--config.train.batch_size=3"], "does not divide over data"),
    (["--pretrained", PARENT, "--config.model.channels=3"], "unknown config key 'model.channels'"),
])
def test_bad_input_stops_before_training(tmp_path, capsys, args, message):
    from train.branch import main as branch

    workdir = tmp_path / "w"
    rc = branch([*args, "--node", "1/0", "--workdir", str(workdir)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (workdir / "checkpoints").exists()
