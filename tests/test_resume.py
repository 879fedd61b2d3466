"""Exact resume: N steps, SIGKILL, N resumed steps == 2N straight steps; a damaged latest
checkpoint falls back to the previous one. Real subprocesses of `python -m train`."""
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
    """The last logged loss of each step (a killed run may have logged steps it then redid)."""
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


def test_sigkill_and_resume_equals_straight_run_and_corrupt_latest_falls_back(tmp_path):
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

    want, got = losses(straight), losses(killed)
    assert sorted(want) == list(range(1, 2 * N + 1))
    for s in range(1, 2 * N + 1):
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])
    assert_same_params(final_params(killed), final_params(straight))

    # Damage the latest checkpoint: the next start says so, falls back to step N and redoes the
    # last N steps identically; the damaged step is kept aside, not deleted.
    for dirpath, _, files in os.walk(killed / "checkpoints" / str(2 * N) / "state"):
        for name in files:
            with open(os.path.join(dirpath, name), "r+b") as f:
                size = os.path.getsize(f.name)
                f.write(b"\x00garbage" * max(1, size // 8))
    out = run(killed)
    assert f"checkpoint step {2 * N} is unreadable" in out and f"resumed tiny from step {N}" in out
    assert os.listdir(killed / "checkpoints" / "unreadable")
    assert_same_params(final_params(killed), final_params(straight))
