"""Fault injection on the trainer: every case asserts the exit (error or result), the message,
and that no saved file was lost or changed. (Kill -9 resume: tests/test_resume.py.)"""
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from ediffi_jax.config import ConfigError, load_config
from tests.test_resume import OVERRIDES, ROOT
from ediffi_jax.runs.checkpoint import Checkpointer
from ediffi_jax.runs.spec import run_schema
from ediffi_jax.training import trainer
from ediffi_jax.training.lock import LOCK_FILE, WorkdirBusy, WorkdirLock
from ediffi_jax.training.trainer import train

BASE = [o for o in OVERRIDES if not o.startswith(("--config.train.steps", "--config.train.checkpoint_every"))]
# A constant rate: the run's length is then not part of the compiled step, so runs of other
# lengths reuse it from the persistent compilation cache.
BASE += ["--config.train.steps=4", "--config.train.checkpoint_every=2",
         "--config.train.keep_checkpoints=3", "--config.train.lr_decay=constant",
         # One level, no attention: the faults do not care, and it compiles in half the time.
         "--config.model.channel_mult=(1,)", "--config.model.attention_resolutions=()"]


def config(*extra):
    return load_config("configs/tiny.py", BASE + list(extra), run_schema())


def snapshot(directory):
    """{relative path: sha256} of every file below `directory` (but the lock's holder note)."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in set(files) - {LOCK_FILE}:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 4-step run with checkpoints 2 and 4; each test attacks its own copy."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    train(config(), str(workdir), log=lambda *_: None)
    return workdir


@pytest.fixture
def run(base_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def test_a_changed_model_is_an_error_before_anything_moves(run):
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"model\.channels: saved 8, requested 12") as e:
        train(config("--config.model.channels=12", "--config.train.steps=6"), str(run),
              log=lambda *_: None)
    assert "Nothing was changed" in str(e.value)
    assert snapshot(run) == before


def test_another_interval_in_an_experts_workdir_is_an_error(run):
    """What `train.branch --node 3/0` into another expert's workdir asks for."""
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"train\.sigma_quantiles: saved \['0', '1'\]"):
        train(config("--config.train.sigma_quantiles=('0','1/8')"), str(run), log=lambda *_: None)
    assert snapshot(run) == before


def test_a_changed_setting_needs_change_and_is_then_logged_and_saved(run):
    """The flow end to end on a setting that does not recompile the step (sampling.*); the
    lr's wording is checked on check_resume itself below."""
    before = snapshot(run)
    want = config("--config.sampling.guidance_scale=5.0", "--config.train.steps=6")
    with pytest.raises(ConfigError, match=r"sampling\.guidance_scale: saved 3\.0, requested 5\.0\. "
                       r"If the change is meant, add --change sampling\.guidance_scale\. Nothing"):
        train(want, str(run), log=lambda *_: None)
    assert snapshot(run) == before
    lines = []
    train(want, str(run), changes=["sampling"], log=lines.append)
    assert "resume: changed sampling.guidance_scale: saved 3.0, requested 5.0" in lines
    assert "resume: changed train.steps: saved 4, requested 6" in lines  # free: logged only
    assert "resumed tiny from step 4" in " ".join(lines)
    assert any(line.startswith("compiling the train step") for line in lines)
    ckpt = Checkpointer(str(run / "checkpoints"), create=False)
    assert ckpt.steps()[-1] == 6 and ckpt.restore_config(6)["sampling"]["guidance_scale"] == 5.0
    ckpt.close()
    with pytest.raises(ConfigError, match="identifies the run"):
        train(want, str(run), changes=["train.seed"], log=lambda *_: None)
    with pytest.raises(ConfigError, match="no such config key"):
        train(want, str(run), changes=["train.lrr"], log=lambda *_: None)


def test_a_changed_lr_is_an_error_unless_named():
    from ediffi_jax.training.resume import check_resume

    saved = {"train": {"lr": 0.001, "seed": 0}, "model": {"channels": 8}}
    with pytest.raises(ConfigError, match=r"train\.lr: saved 0\.001, requested 0\.0005\. If the "
                       r"change is meant, add --change train\.lr\. Nothing was changed"):
        check_resume(saved, {**saved, "train": {"lr": 0.0005, "seed": 0}}, (), "run")
    lines = []
    check_resume(saved, {**saved, "train": {"lr": 0.0005, "seed": 0}}, ("train.lr",), "run", lines.append)
    assert lines == ["resume: changed train.lr: saved 0.001, requested 0.0005"]
    with pytest.raises(ConfigError, match=r"another run .* train\.seed: saved 0, requested 1"):
        check_resume(saved, {**saved, "train": {"lr": 0.001, "seed": 1}}, ("train",), "run")


def _damage_all(workdir):
    for step in os.listdir(workdir / "checkpoints"):
        for dirpath, _, files in os.walk(workdir / "checkpoints" / step / "state"):
            for name in files:
                with open(os.path.join(dirpath, name), "r+b") as f:
                    f.write(b"\x00garbage" * max(1, os.path.getsize(f.name) // 8))


def test_all_checkpoints_damaged_stops_and_a_restart_is_a_true_scratch_start(base_run, run):
    _damage_all(run)
    with pytest.raises(ConfigError, match="every checkpoint .* is unreadable.*--restart-if-unreadable"):
        train(config(), str(run), log=lambda *_: None)
    aside = os.listdir(run / "checkpoints" / "unreadable")
    assert sorted(s.split(".")[0] for s in aside) == ["2", "4"]  # kept for inspection
    assert not [d for d in os.listdir(run / "checkpoints") if d.isdigit()]
    assert metrics(run) == metrics(base_run)  # nothing trained, nothing truncated
    train(config(), str(run), restart_if_unreadable=True, log=lambda *_: None)
    # The same losses as the original run: fresh data order, fresh init, no rows kept twice.
    assert metrics(run) == metrics(base_run)


def test_an_impossible_iterator_state_is_set_aside(run):
    path = run / "checkpoints" / "4" / "data" / "process_0-of-1.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "next_index": 999}))
    lines = []
    train(config("--config.train.steps=2"), str(run), log=lines.append)
    assert "resumed tiny from step 2" in " ".join(lines)
    assert [s.split(".")[0] for s in os.listdir(run / "checkpoints" / "unreadable")] == ["4"]
    assert [m["step"] for m in metrics(run)] == [1, 2]  # the rows of the steps to redo dropped


def test_nonfinite_steps_never_write_or_rotate_out_checkpoints(run):
    good = snapshot(run / "checkpoints")
    poisoned = config("--config.train.lr=1e9", "--config.train.steps=40", "--config.train.max_nonfinite=3")
    progress = []
    with pytest.raises(FloatingPointError) as e:
        train(poisoned, str(run), changes=["train.lr"], log=progress.append)
    assert any(line.startswith("compiling the train step") for line in progress)
    assert any("steps skipped: non-finite)" in line for line in progress)  # the console says so
    ckpt = Checkpointer(str(run / "checkpoints"), create=False)
    steps = ckpt.steps()
    ckpt.close()
    assert f"The newest checkpoint, step {steps[-1]}" in str(e.value)
    rows = {m["step"]: m for m in metrics(run)}
    first_bad = min(s for s, m in rows.items() if not m["finite"])
    assert all(s < first_bad for s in steps)  # nothing written once updates were skipped
    assert f"steps {first_bad} to" in str(e.value)
    if steps[-1] == 4:  # no finite step after the resume: the good ones are untouched
        assert snapshot(run / "checkpoints") == good
    # A sane resume from there is not stopped at once by a restored counter.
    lines = []
    train(config(f"--config.train.steps={steps[-1] + 1}"), str(run), changes=["train.lr"],
          log=lines.append)
    assert f"resumed tiny from step {steps[-1]}" in " ".join(lines) and lines[-1].startswith("done")


def test_a_nonfinite_run_stops_at_most_one_step_past_the_limit(tmp_path):
    """The trainer reads each step's skip counter once the next step is dispatched: a run of
    max_nonfinite skips ending at step k stops with step k + 1 dispatched and no later one."""
    poisoned = config("--config.train.lr=1e9", "--config.train.steps=40",
                      "--config.train.max_nonfinite=3", "--config.train.checkpoint_every=1000",
                      "--config.train.log_every=1000")
    with pytest.raises(FloatingPointError) as e:
        train(poisoned, str(tmp_path / "run"), log=lambda *_: None)
    first, last = map(int, re.search(r"\(steps (\d+) to (\d+)\)", str(e.value)).groups())
    assert str(e.value).startswith("3 consecutive steps had a non-finite loss")
    assert last - first + 1 == 3 and last < 39
    rows = {m["step"]: m for m in metrics(tmp_path / "run")}
    assert all(not rows[s]["finite"] for s in range(first, last + 1))
    assert first == 1 or rows[first - 1]["finite"]
    assert max(rows) == last + 1  # exactly one step ran past the limit
    assert "No checkpoint was written: there is nothing to resume" in str(e.value)
    assert not os.listdir(tmp_path / "run" / "checkpoints")


def test_the_host_reads_each_counter_after_dispatching_the_next_step(tmp_path, monkeypatch):
    """Step k's skip counter is read only once step k + 1 is dispatched (two steps in flight),
    but a save step's synchronously, before its checkpoint is written."""
    dispatched, reads = [0], []
    jit_train_step = trainer.jit_train_step

    def counting(*args, **kwargs):
        step_fn = jit_train_step(*args, **kwargs)

        def call(*a):
            dispatched[0] += 1
            return step_fn(*a)
        return call

    def spy(counter, step):
        reads.append((step, dispatched[0], int(counter)))
        return int(counter)

    monkeypatch.setattr(trainer, "jit_train_step", counting)
    monkeypatch.setattr(trainer, "_read_counter", spy)
    train(config("--config.train.steps=6", "--config.train.checkpoint_every=3",
                 "--config.train.log_every=1000"), str(tmp_path / "run"), log=lambda *_: None)
    # (counter of step, steps dispatched when read, value): 3 and 6 are save steps.
    assert reads == [(1, 2, 0), (2, 3, 0), (3, 3, 0), (4, 5, 0), (5, 6, 0), (6, 6, 0)]


def test_a_second_trainer_stops_at_once_naming_the_holder(run):
    before = snapshot(run / "checkpoints")
    with WorkdirLock(str(run)):
        with pytest.raises(WorkdirBusy, match=rf"in use by another trainer \(pid {os.getpid()} on "):
            train(config("--config.train.steps=6"), str(run), log=lambda *_: None)
    assert snapshot(run / "checkpoints") == before


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from ediffi_jax.training.lock import WorkdirLock; "
            "WorkdirLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, ROOT, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirBusy, match=f"pid {proc.pid}"):
        WorkdirLock(str(tmp_path)).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with WorkdirLock(str(tmp_path)):
        pass


def test_a_failed_save_stops_the_run_with_one_message(run):
    """A file-size limit makes every large write fail as a full disk does (EFBIG, not ENOSPC)."""
    good = snapshot(run / "checkpoints")
    limit = 150_000  # below the size of the state's array files, above everything else written

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "train", "--config", "configs/tiny.py", "--workdir", str(run),
           ] + BASE + ["--config.train.steps=40"]
    # The session's compilation cache (tests/conftest.py) holds the step already: no compile.
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         preexec_fn=limited)
    assert out.returncode == 2, out.stderr[-2000:]
    # orbax's writer threads print to the same stream (unterminated lines too): find ours.
    errors = re.findall(r"error: a checkpoint .*", out.stderr)
    assert len(errors) == 1 and errors[0].startswith("error: a checkpoint of step 6 could not be written")
    assert "training stopped. The last complete checkpoint is step 4" in errors[0]
    assert "done:" not in out.stdout
    steps_run = max(m["step"] for m in metrics(run))
    assert steps_run < 40
    # The good checkpoints are intact, byte for byte (their checksums restore-verified elsewhere).
    assert {k: v for k, v in snapshot(run / "checkpoints").items() if k in good} == good


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_damaged_file_never_restores_as_wrong_values(tmp_path, damage):
    """Any one file of the newest step damaged: restore gives the saved values (falling back to
    the older, identical step) or nothing, never other numbers (orbax's array files have no
    checksum: the saved sums catch a flipped bit)."""
    import jax.numpy as jnp

    state = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) / 7,
             "b": jnp.linspace(0, 1, 1000).astype(jnp.bfloat16), "step": jnp.int32(3)}
    ckpt = Checkpointer(str(tmp_path / "pristine" / "checkpoints"))
    ckpt.save(1, state)
    ckpt.save(2, state)
    ckpt.close()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "pristine")
                   for d, _, fs in os.walk(tmp_path / "pristine" / "checkpoints" / "2") for f in fs)
    outcomes = {}
    for rel in files:
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path / "pristine", work)
        path, size = work / rel, os.path.getsize(work / rel)
        with open(path, "r+b") as f:
            if damage == "flip" and size:
                f.seek(size // 2)
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0x10]))
            elif damage == "truncate":
                f.truncate(size // 2)
            else:
                f.write(b"\x00garbage" * max(1, size // 8))
        reader = Checkpointer(str(work / "checkpoints"))
        restored, step = reader.restore(target)
        reader.close()
        assert restored is not None, rel
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=rel)
        outcomes[rel] = step
    assert 1 in outcomes.values()  # some damage was caught and fell back


def test_a_mesh_that_does_not_fit_is_a_clean_error_before_the_workdir_exists(tmp_path, capsys):
    from train.__main__ import main

    workdir = tmp_path / "run"
    assert main(["--config", "configs/tiny.py", "--workdir", str(workdir),
                 "--config.mesh.shape=(3,1,1)"]) == 2
    assert "error: mesh.shape: mesh shape {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices" in \
        capsys.readouterr().err
    assert not workdir.exists()


def test_a_missing_parent_creates_nothing(tmp_path, capsys):
    from train.branch import main

    assert main(["--parent", str(tmp_path / "nope"), "--node", "1/0",
                 "--workdir", str(tmp_path / "child")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_logs_are_truncated_to_the_restored_step(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    from ediffi_jax.training.resume import truncate_metrics
    from ediffi_jax.training.tensorboard import SummaryWriter, truncate_events

    logdir = tmp_path / "tb"
    with SummaryWriter(str(logdir)) as w:
        for step in range(1, 7):
            w.scalar("loss", float(step), step)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 7))
                                      + '{"step": 7, "lo')  # a torn last line of a killed run
    assert truncate_events(str(logdir), 3) == 3
    assert truncate_metrics(str(tmp_path / "m.jsonl"), 3) == 4
    acc = event_accumulator.EventAccumulator(str(logdir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_with_a_cosine_decay_the_length_needs_change():
    """The length sets a cosine schedule's rate at every step; a constant rate's it does not."""
    from ediffi_jax.training.resume import check_resume

    saved = {"train": {"steps": 4, "lr_decay": "cosine"}}
    with pytest.raises(ConfigError, match=r"train\.steps: saved 4, requested 8 \(with "
                       r"train\.lr_decay='cosine'.*add --change train\.steps"):
        check_resume(saved, {"train": {"steps": 8, "lr_decay": "cosine"}}, (), "run")
    lines = []
    check_resume(saved, {"train": {"steps": 8, "lr_decay": "cosine"}}, ("train.steps",), "run", lines.append)
    check_resume({"train": {"steps": 4, "lr_decay": "constant"}},
                 {"train": {"steps": 8, "lr_decay": "constant"}}, (), "run", lines.append)
    assert lines == ["resume: changed train.steps: saved 4, requested 8 (with train.lr_decay='cosine' "
                     "the length sets every step's learning rate)",
                     "resume: changed train.steps: saved 4, requested 8"]
