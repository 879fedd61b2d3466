"""The trainer: config -> mesh, data, sharded state -> jitted, donated steps -> checkpoints/logs.

    python -m train --config configs/tiny.py --workdir runs/tiny [--config.train.steps=2000]

Everything that can be wrong with the input (config keys and values, the mesh against the
devices, the batch against the data axes, the dataset's existence) is checked before anything
compiles. A run resumes from the newest readable checkpoint in its workdir: same data order,
same randomness, so an interrupted run continues exactly as an uninterrupted one would have.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from ediffi_jax.config import ConfigError, section, to_dict
from ediffi_jax.data.embeddings import ConditioningLayout, UnpackConditioning
from ediffi_jax.data.pipeline import make_pipeline, to_global_arrays
from ediffi_jax.data.records import RecordSource
from ediffi_jax.data.shapes import ShapesConfig, ShapesSource
from ediffi_jax.data.stage import DegradeConfig, StageExample
from ediffi_jax.diffusion.edm import LogNormalSigma
from ediffi_jax.encoders.conditioner import make_conditioner
from ediffi_jax.models.conditioning import FIELDS, Conditioning
from ediffi_jax.models.unet import UNet, boxed_init
from ediffi_jax.parallel.distributed import DistributedConfig, initialize
from ediffi_jax.parallel.mesh import (logical_shardings, make_mesh, sharded_init,
                                      with_activation_rules)
from ediffi_jax.rng import Stream, stream
from ediffi_jax.runs.checkpoint import CheckpointDamaged, Checkpointer, abstract_like
from ediffi_jax.runs.spec import DataConfig, RunSpec, check_stage_sizes, image_resolution, parse_run
from ediffi_jax.runs.store import is_export, load_params
from ediffi_jax.training.lock import WorkdirLock
from ediffi_jax.training.resume import check_changes, check_resume, truncate_metrics
from ediffi_jax.training.step import (TrainState, all_finite, init_state, learning_rate,
                                      make_optimizer, state_shardings, train_step)
from ediffi_jax.training.tensorboard import SummaryWriter, truncate_events

SIGMA_BUCKETS = (0.125, 0.5, 0.875)  # log-normal quantiles splitting the per-bucket loss


def stage_transform(run: RunSpec, source):
    """The pipeline transform that gives each example at the stage's sizes (data/stage.py), or
    None when the source's images already are what the model trains on."""
    model, full = run.stage.model, image_resolution(run)
    degrade = section(DegradeConfig, run.data.degrade, "data.degrade")
    side = np.asarray(source[0]["image"]).shape[0]
    if not model.lowres_scale and full == model.resolution == side:
        return None
    return StageExample(full, model.resolution, model.lowres_scale, degrade)


def build_source(data: DataConfig, resolution: int):
    if data.name == "shapes":
        fields = dict(to_dict(data.shapes) or {})
        fields.setdefault("resolution", resolution)
        return ShapesSource(section(ShapesConfig, fields, "data.shapes"))

    return RecordSource(data.path)


def check_layout(run: RunSpec, mesh) -> None:
    """The global batch (and each microbatch) must split evenly over the batch axes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = run.train.batch_size // run.train.grad_accum
    if micro % shards:
        raise ConfigError(
            f"train.batch_size {run.train.batch_size} (microbatch {micro} with grad_accum "
            f"{run.train.grad_accum}) does not divide over data x fsdp = {shards} devices of mesh "
            f"{dict(mesh.shape)}"
        )


def conditioning_source(run: RunSpec, source):
    """(pipeline transform, encoder): records with precomputed conditioning are unpacked in the
    pipeline (no encoder runs); otherwise the run's encoders encode each batch's captions."""
    stored = getattr(source, "metadata", {}).get("conditioning")
    if not stored:
        return None, make_conditioner(run.encoders, run.stage.model)
    if not run.encoders.pretrained:
        raise ConfigError(
            f"{run.data.path} holds conditioning precomputed by the encoders {stored['encoders']}; "
            "set the same `encoders` section (sampling encodes prompts with it)")
    layout = ConditioningLayout.for_model(run.stage.model, stored["dtype"])
    try:
        layout.check(source.features, run.data.path)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return UnpackConditioning(layout), None


def captions_of(batch) -> list[str]:
    """A pipeline batch's captions as str (records store bytes)."""
    return [c.decode() if isinstance(c, bytes) else str(c) for c in batch["caption"]]


class _Batches:
    """Host batches from the pipeline -> device arrays: images to [-1, 1], captions encoded
    (unless the records carry precomputed conditioning)."""

    def __init__(self, iterator, encoder, mesh):
        self.iterator, self.encoder, self.mesh = iterator, encoder, mesh

    def next(self) -> dict:
        batch = next(self.iterator)
        if "cond" in batch:
            cond = Conditioning(**{f: np.asarray(batch["cond"][f], np.float32) for f in FIELDS})
        else:
            captions = captions_of(batch)
            # A CLIP image tower embeds each training image (eDiff-I's style path; dropped 90%).
            images = list(batch["image"]) if self.encoder.clip_vision is not None else None
            cond = self.encoder.encode(captions, images)
        host = {
            "image": (np.asarray(batch["image"], np.float32) / 127.5 - 1.0),
            "index": np.asarray(batch["index"], np.int32),
            "cond": {f: getattr(cond, f) for f in FIELDS},
        }
        if "lowres" in batch:  # a super-resolution stage (data/stage.py)
            host["lowres"] = np.asarray(batch["lowres"], np.float32) / 127.5 - 1.0
            host["crop"] = np.asarray(batch["crop"], np.int32)
        arrays = to_global_arrays(host, self.mesh)
        arrays["cond"] = Conditioning(**arrays["cond"])
        return arrays


def _bucket_losses(losses: np.ndarray, sigmas: np.ndarray) -> dict[str, float]:
    edges = [float(LogNormalSigma().sigma_at_quantile(q)) for q in SIGMA_BUCKETS]
    bins = np.digitize(sigmas, edges)
    out = {}
    for b in range(len(edges) + 1):
        sel = bins == b
        if sel.any():
            lo = f"{edges[b - 1]:.3g}" if b > 0 else "0"
            hi = f"{edges[b]:.3g}" if b < len(edges) else "inf"
            out[f"loss_by_sigma/({lo},{hi}]"] = float(losses[sel].mean())
    return out


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_mesh(run: RunSpec, devices=None):
    """The run's (data, fsdp, tensor) mesh; a shape that does not fit the devices is a
    ConfigError (the trainer and the dry run both check it before anything compiles)."""
    try:
        return make_mesh(run.mesh.shape, devices)
    except ValueError as e:
        raise ConfigError(f"mesh.shape: {e}") from e


def check_parent(init_from: str) -> None:
    """A branched child's parent must exist before the child's workdir is made."""
    if not (is_export(init_from) or os.path.isdir(os.path.join(init_from, "checkpoints"))):
        raise ConfigError(f"train.init_from {init_from!r} is neither a run's workdir with "
                          "checkpoints nor an export")


def train(config, workdir: str, *, changes: Sequence[str] = (), restart_if_unreadable=False,
          log=functools.partial(print, flush=True)) -> TrainState:
    """Train (or resume) the run described by `config` in `workdir`. Returns the final state.

    Resuming compares the saved config with `config` (ediffi_jax/training/resume.py): what identifies the
    run may not change, optimisation settings only when named in `changes`. If every
    checkpoint of the workdir is damaged, the run stops unless `restart_if_unreadable`."""
    run = parse_run(config)
    # Multi-host: join the job before anything touches a jax backend (mesh, pipeline, orbax).

    initialize(section(DistributedConfig, config.get("distributed"), "distributed"), log=log)
    mesh = run_mesh(run)
    check_layout(run, mesh)
    check_stage_sizes(run)
    config_json = json.loads(config.to_json_best_effort())
    check_changes(changes, config_json)
    if run.train.init_from:
        check_parent(run.train.init_from)
    source = build_source(run.data, image_resolution(run))
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir):
        return _train_locked(run, config_json, workdir, mesh, source, changes,
                             restart_if_unreadable, log)


@dataclasses.dataclass
class Family:
    """What the training loop needs of a model family (the project's U-Net; a diffusers
    checkpoint's, training/pretrained.py): its input batches (`iterator`, whose state each
    checkpoint saves, and `batches.next()` -> device arrays), the boxed abstract params (the
    shardings), `fresh(param_sh) -> (params, ema or None, origin)` for a run with no
    checkpoint, `step(optimizer, state_sh)` -> the jitted (state, batch, interval) ->
    (state, metrics) step with the trainer's metrics, and `interval` (its data argument)."""

    name: str
    iterator: object
    batches: object
    abstract_boxed: object
    fresh: Callable
    step: Callable
    interval: object


def project_family(run: RunSpec, source, mesh) -> Family:
    """The project's U-Net on its EDM loss: records or shapes, captions encoded per batch (or
    precomputed), a fresh init or a branched parent's params and EMA."""
    tcfg, model = run.train, run.stage.model
    stage = stage_transform(run, source)
    unpack, encoder = conditioning_source(run, source)
    pipeline = make_pipeline(source, global_batch_size=tcfg.batch_size, seed=tcfg.seed,
                             transform=[t for t in (unpack, stage) if t is not None])
    iterator = iter(pipeline)
    boxed = lambda: boxed_init(model, stream(tcfg.seed, Stream.PARAMS))  # noqa: E731

    def fresh(param_sh):
        if tcfg.init_from:  # a branched expert: the parent's params and EMA, a fresh optimizer
            params, ema, parent_step = load_params(tcfg.init_from, param_sh)
            return params, ema, (f"{tcfg.init_from} (step {parent_step}) on sigma quantiles "
                                 f"{tcfg.sigma_quantiles}")
        return sharded_init(boxed, mesh)[0], None, "scratch"

    return Family(run.stage.name, iterator, _Batches(iterator, encoder, mesh),
                  jax.eval_shape(boxed), fresh,
                  lambda optimizer, state_sh: jit_train_step(UNet(model), tcfg, optimizer,
                                                             state_sh, mesh),
                  tcfg.sigma_interval())


def _train_locked(run: RunSpec, config_json: dict, workdir: str, mesh, source, changes,
                  restart_if_unreadable: bool, log) -> TrainState:
    return train_family(project_family(run, source, mesh), run.train, config_json, workdir,
                        mesh, changes, restart_if_unreadable, log)


def train_family(family: Family, tcfg, config_json: dict, workdir: str, mesh, changes,
                 restart_if_unreadable: bool, log) -> TrainState:
    """The loop every family trains with: restore or start, jitted donated steps, metrics,
    checkpoints (state + input position), non-finite stops; its caller holds the lock."""
    iterator = family.iterator
    optimizer = make_optimizer(tcfg)
    abstract_boxed = family.abstract_boxed
    abstract_params = nn.meta.unbox(abstract_boxed)
    param_sh = logical_shardings(abstract_boxed, mesh)
    state_sh = state_shardings(optimizer, abstract_params, param_sh, mesh)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints)
    abstract_state = abstract_like(
        jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params), state_sh)
    had_checkpoints, scratch_iterator = bool(ckpt.steps()), iterator.get_state()

    def check_config(step, saved):
        check_resume(saved, config_json, changes, f"{workdir} (checkpoint {step})", log)

    def verify(step, restored):  # readable, but is it possible?
        state, data = restored["state"], restored["data"].get_state()
        if int(state.step) != step:
            raise CheckpointDamaged(f"its state is at step {int(state.step)}")
        if data.get("next_index", step) != step:  # the trainer consumes one batch per step
            raise CheckpointDamaged(f"its input pipeline is at batch {data['next_index']}, "
                                    f"not {step}")
        if not bool(jax.jit(all_finite)(state.params)):
            raise CheckpointDamaged("its parameters are not finite")

    state, start = ckpt.restore(abstract_state, iterator, check_config=check_config,
                                verify=verify)
    if state is None:
        if had_checkpoints and not restart_if_unreadable:
            ckpt.close()
            raise ConfigError(
                f"every checkpoint in {ckpt.directory} is unreadable (moved to "
                f"{ckpt.directory}/unreadable); there is nothing to resume, and this run does "
                "not start over on its own. To train it again from scratch in this workdir, "
                "pass --restart-if-unreadable")
        iterator.set_state(scratch_iterator)  # a failed restore may have moved it
        params, ema, origin = family.fresh(param_sh)
        state = jax.jit(functools.partial(init_state, optimizer=optimizer),
                        out_shardings=state_sh)(params)
        if ema is not None:
            state = state.replace(ema_params=ema)
        start = 0
        log(f"starting {family.name} from {origin} in {workdir}")
    else:
        log(f"resumed {family.name} from step {start} in {workdir}")

    primary = jax.process_index() == 0  # multi-host: one process writes the shared run's logs
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if primary:  # the steps after the restored one are trained again: drop their old rows
        dropped = (truncate_metrics(metrics_path, start)
                   + truncate_events(os.path.join(workdir, "tensorboard"), start))
        if dropped:
            log(f"dropped {dropped} logged rows past step {start} (they are trained again)")

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_fn = family.step(optimizer, state_sh)
    interval = jax.device_put(family.interval, replicated)
    batches = family.batches
    writer = SummaryWriter(os.path.join(workdir, "tensorboard")) if primary else None
    pending: list[tuple[int, dict]] = []
    logged_loss: dict[int, float] = {}
    t_window, n_window, t_start = time.perf_counter(), 0, time.perf_counter()

    def flush_metrics(step: int):
        nonlocal t_window, n_window
        if not pending:
            return
        fetched = jax.device_get(pending)
        rate = n_window / max(time.perf_counter() - t_window, 1e-9)
        with open(metrics_path, "a") if primary else open(os.devnull, "w") as f:
            for s, m in fetched:
                f.write(json.dumps({"step": s, "loss": float(m["loss"]),
                                    "grad_norm": float(m["grad_norm"]),
                                    "finite": bool(m["finite"])}) + "\n")
        logged_loss[fetched[-1][0]] = float(fetched[-1][1]["loss"])
        losses = np.concatenate([m["per_example_loss"] for _, m in fetched])
        sigmas = np.concatenate([m["sigma"] for _, m in fetched])
        finite = np.isfinite(losses)
        skipped = sum(not bool(m["finite"]) for _, m in fetched)
        scalars = {"loss": float(losses[finite].mean()) if finite.any() else float("nan"),
                   "images_per_second": rate,
                   "learning_rate": float(learning_rate(tcfg)(step - 1))}  # of the last step
        scalars.update(_bucket_losses(losses[finite], sigmas[finite]))
        if writer is not None:
            writer.scalars(scalars, step)
            writer.flush()
        eta = (tcfg.steps - step) * tcfg.batch_size / max(rate, 1e-9)
        note = f"  ({skipped} of {len(fetched)} steps skipped: non-finite)" if skipped else ""
        log(f"step {step}/{tcfg.steps}  loss {scalars['loss']:.4f}  {rate:.1f} img/s  "
            f"ETA {_fmt_seconds(eta)}{note}")
        pending.clear()
        t_window, n_window = time.perf_counter(), 0

    step = start
    lagging: tuple[int, jax.Array] | None = None  # (step, its nonfinite_run), not read yet
    batch = batches.next() if step < tcfg.steps else None
    if step < tcfg.steps:
        log(f"compiling the train step ({jax.device_count()} devices, mesh "
            f"{dict(mesh.shape)}; minutes for a large model) ...")
    try:
        while step < tcfg.steps:
            # Dispatched: runs while the host goes on (the first call compiles, synchronously).
            t_call = time.perf_counter()
            state, metrics = step_fn(state, batch, interval)
            if step == start:
                log(f"compiled in {time.perf_counter() - t_call:.1f} s; training")
            step += 1
            n_window += tcfg.batch_size
            pending.append((step, {k: metrics[k] for k in ("loss", "grad_norm", "finite",
                                                            "per_example_loss", "sigma")}))
            # The previous step's counter, read while this step runs: the host never waits on
            # the step it just dispatched, and a run of max_nonfinite skips ending at step k
            # stops once step k + 1 is dispatched (at most one step past the limit).
            if lagging is not None:
                lag_step, lag_counter = lagging
                run_length = _read_counter(lag_counter, lag_step)
                if run_length >= tcfg.max_nonfinite:
                    flush_metrics(step)
                    raise FloatingPointError(
                        _nonfinite_message(run_length, lag_step, ckpt, logged_loss))
            if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
                flush_metrics(step)  # saved with the iterator before it reads the next batch
                skipping = _read_counter(state.nonfinite_run, step)  # synchronous: this step's
                if skipping >= tcfg.max_nonfinite:
                    raise FloatingPointError(
                        _nonfinite_message(skipping, step, ckpt, logged_loss))
                if skipping:  # never let a poisoned state rotate a good checkpoint out
                    log(f"checkpoint {step} not written: the last {skipping} update(s) were "
                        "skipped as non-finite")
                else:
                    ckpt.save(step, state, iterator, config_json)
                    log(f"checkpoint {step} saving (blocked {ckpt.last_blocking_seconds:.3f} s)")
            if step < tcfg.steps:
                batch = batches.next()  # host input work overlaps the step in flight
            ckpt.check()  # a background save that failed stops the run at once
            saved = step % tcfg.checkpoint_every == 0 or step == tcfg.steps
            lagging = None if saved else (step, metrics["nonfinite_run"])  # read: next step
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                flush_metrics(step)
    finally:
        try:
            ckpt.close()
        finally:
            if writer is not None:
                writer.close()
    log(f"done: {step} steps in {_fmt_seconds(time.perf_counter() - t_start)}")
    return state


def jit_train_step(unet, tcfg, optimizer, state_sh, mesh, batch_shardings=None, loss=None):
    """The trainer's jitted step (the dry run compiles the same): state donated, metrics
    replicated (every process can fetch them; multi-host: no process sees the whole
    batch-sharded per-example losses otherwise), traced inside the mesh's activation rules so
    the models' logical constraints on activations act."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        with_activation_rules(
            functools.partial(train_step, unet=unet, cfg=tcfg, optimizer=optimizer,
                              **({} if loss is None else {"loss": loss})), mesh),
        in_shardings=(state_sh, batch_shardings, replicated), donate_argnums=0,
        out_shardings=(state_sh, replicated),
    )


def _read_counter(counter: jax.Array, step: int) -> int:
    """The host's blocking read of step `step`'s consecutive-skip counter (one scalar)."""
    return int(counter)


def _nonfinite_message(run_length: int, step: int, ckpt: Checkpointer,
                       logged_loss: dict[int, float]) -> str:
    first = step - run_length + 1
    kept = ckpt.steps()
    if kept:
        newest = kept[-1]
        loss = logged_loss.get(newest)
        where = (f"No checkpoint was written during them. The newest checkpoint, step {newest}"
                 + (f" (loss {loss:.4g} at that step)" if loss is not None else "")
                 + f", was written before they began; kept: steps {kept} in {ckpt.directory}")
    else:
        where = "No checkpoint was written: there is nothing to resume"
    return (f"{run_length} consecutive steps had a non-finite loss or gradient (steps {first} to "
            f"{step}); stopping. {where}. Lower train.lr (on resume: --config.train.lr=... "
            "--change train.lr), enable train.grad_clip, or check the data.")
