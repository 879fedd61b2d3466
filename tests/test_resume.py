"""Exact resume: N steps, SIGKILL, N resumed steps == 2N straight steps (real subprocesses of
`python -m train`); a damaged latest checkpoint falls back to the previous one."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 3
OVERRIDES = [
    "--config.model.resolution=16", "--config.model.channels=8", "--config.model.channel_mult=(1,2)",
    "--config.model.attention_resolutions=(8,)", "--config.model.attention_head_dim=4",
    "--config.model.context_dim=8", "--config.model.t5_dim=8", "--config.model.t5_length=8",
    "--config.model.clip_dim=8", "--config.model.clip_length=8", "--config.model.clip_pooled_dim=8",
    "--config.model.clip_image_dim=8", "--config.train.batch_size=8", "--config.train.lr=0.001",
    "--config.train.warmup_steps=0", f"--config.train.steps={2 * N}", "--config.train.log_every=1",
    f"--config.train.checkpoint_every={N}", "--config.mesh.shape=(-1,2,1)",
]


def environment(cache_dir):
    """The runs share a persistent compilation cache: one compile instead of four."""
    env = dict(os.environ)
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def command(workdir):
    return [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir", str(workdir)] + OVERRIDES


def run(workdir):
    env = environment(workdir.parent / "jax-cache")
    out = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def losses(workdir):
    """The logged loss of each step."""
    by_step = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            by_step[rec["step"]] = rec["loss"]
    return by_step


def final_params(workdir, step=2 * N):
    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return state["params"], state["ema_params"]


def assert_same_params(a, b):
    import jax

    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6), a, b)


def test_sigkill_and_resume_equals_straight_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(straight)

    proc = subprocess.Popen(command(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=environment(tmp_path / "jax-cache"))
    deadline = time.time() + 300
    first_ckpt = killed / "checkpoints" / str(N)
    while not first_ckpt.is_dir():  # orbax renames the step directory into place when complete
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    out = run(killed)
    assert f"resumed tiny from step {N}" in out

    with open(os.path.join(killed, "metrics.jsonl")) as f:  # the redone steps are not doubled
        assert [json.loads(line)["step"] for line in f] == list(range(1, 2 * N + 1))
    want, got = losses(straight), losses(killed)
    assert sorted(want) == list(range(1, 2 * N + 1))
    for s in range(1, 2 * N + 1):
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])
    assert_same_params(final_params(killed), final_params(straight))


def test_damaged_latest_checkpoint_falls_back_and_is_kept_aside(tmp_path, capsys):
    import jax.numpy as jnp

    from ediffi_jax.runs.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((4, 4), float(step)), "step": jnp.int32(step)})
    ckpt.wait()
    for dirpath, _, files in os.walk(tmp_path / "checkpoints" / "2"):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "r+b") as f:
                f.write(b"\x00garbage" * max(1, os.path.getsize(path) // 8))
    abstract = {"w": jnp.zeros((4, 4)), "step": jnp.int32(0)}
    state, step = ckpt.restore(abstract)
    assert step == 1 and float(state["w"][0, 0]) == 1.0
    assert "checkpoint step 2 is unreadable" in capsys.readouterr().out
    assert ckpt.steps() == [1] and os.listdir(tmp_path / "checkpoints" / "unreadable")
    ckpt.save(2, {"w": jnp.full((4, 4), 5.0), "step": jnp.int32(2)})  # the step can be redone
    ckpt.close()


def test_relative_checkpoint_directory_saves_and_restores(tmp_path, monkeypatch):
    """`--workdir runs/x` is relative; orbax's array writer insists on absolute paths and fails
    only in its background thread, so the Checkpointer must resolve the directory itself."""
    import jax.numpy as jnp

    from ediffi_jax.runs.checkpoint import Checkpointer

    monkeypatch.chdir(tmp_path)
    ckpt = Checkpointer(os.path.join("runs", "x", "checkpoints"), keep=2)
    ckpt.save(3, {"w": jnp.full((4, 4), 3.0)})
    ckpt.wait()
    state, step = ckpt.restore({"w": jnp.zeros((4, 4))})
    ckpt.close()
    assert step == 3 and float(state["w"][1, 1]) == 3.0
    assert os.path.isdir(tmp_path / "runs" / "x" / "checkpoints" / "3")


def test_restore_onto_a_different_mesh_and_device_count(tmp_path):
    """A state saved sharded over 8 devices (fsdp 4) restores onto 2 devices (fsdp 2) and onto
    1 device, with the same values and the target layouts' shardings."""
    import jax
    import flax.linen as nn

    from ediffi_jax.models.unet import boxed_init
    from ediffi_jax.parallel.mesh import logical_shardings, make_mesh
    from tests.tiny import tiny_params, tiny_unet_config
    from ediffi_jax.runs.checkpoint import Checkpointer, abstract_like
    from ediffi_jax.training.step import TrainConfig, init_state, make_optimizer, state_shardings

    model = tiny_unet_config()
    optimizer = make_optimizer(TrainConfig())
    boxed = jax.eval_shape(lambda: boxed_init(model, jax.random.key(0)))
    abstract_params = nn.meta.unbox(boxed)

    def layout(mesh):
        return state_shardings(optimizer, abstract_params, logical_shardings(boxed, mesh), mesh)

    saved_sh = layout(make_mesh((2, 4, 1)))
    state = jax.jit(lambda p: init_state(p, optimizer), out_shardings=saved_sh)(tiny_params(model))
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))  # nonzero moments
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(saved_sh.params))
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=1)
    ckpt.save(7, state)
    ckpt.close()

    abstract = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params)
    for devices, shape in [(jax.devices()[:2], (1, 2, 1)), (jax.devices()[5:6], (1, 1, 1))]:
        target_sh = layout(make_mesh(shape, devices))
        restored, step = Checkpointer(str(tmp_path / "ckpt")).restore(abstract_like(abstract, target_sh))
        assert step == 7
        for got, want, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                                 jax.tree.leaves(target_sh)):
            assert got.sharding == sh and set(got.sharding.device_set) <= set(devices)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
