"""Compile time on CPU, with and without JAX's persistent compilation cache: the tiny train step
(configs/tiny.py) and a 3-expert (Config-D) sampling plan of the tiny model.

    python -m benchmarks.compile_time [--rounds 3] [--devices 2] [--what train,sample]

Every measurement runs in a fresh Python process (so no in-process cache counts), in three
modes per round, each round with a new, empty cache directory:
- no cache: JAX_COMPILATION_CACHE_DIR unset;
- cache, cold: JAX_COMPILATION_CACHE_DIR set to the empty directory (compiles, then writes);
- cache, warm: the same directory again, as a second run of the same job finds it.
The cache runs use JAX's default thresholds (only programs that took >= 1 s to compile are
written), which is what setting JAX_COMPILATION_CACHE_DIR alone gives (the Makefile's demo).

Per process, the train job does what `python -m train` does before its first step: the
trainer's mesh, `sharded_init`, the jitted `init_state`, then `jax.jit(train_step, shardings,
donation)` lowered (tracing: the cache cannot skip it) and compiled, then two calls. The
sample job builds three random experts of the tiny U-Net (an ExpertEnsemble over Config-D),
then runs `ediffi_jax.pipeline.generate.denoise_batch` (DPM-Solver++(2M), 20 steps, CFG, batch 8 sharded
over the devices as the sampling CLI does) twice: the first run compiles every distinct
segment setting, the second is the run alone; compile ~= first - second. Devices: one XLA CPU
device per core by default (the CLIs' `configure_cpu_host`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/tiny.py"
MODES = ("no cache", "cache, cold", "cache, warm")


def _cache_files(directory: str | None) -> tuple[int, int]:
    if not directory or not os.path.isdir(directory):
        return 0, 0
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs]
    return len(sizes), sum(sizes)


def train_job(batch: int) -> dict:
    import functools

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ediffi_jax.config import load_config
    from ediffi_jax.models.unet import boxed_init
    from ediffi_jax.parallel.mesh import batch_sharding, logical_shardings, make_mesh, sharded_init
    from ediffi_jax.rng import Stream, stream
    from ediffi_jax.runs.spec import parse_run, run_schema
    from ediffi_jax.training.step import init_state, make_optimizer, state_shardings, train_step

    t0 = time.perf_counter()
    run = parse_run(load_config(CONFIG, [f"--config.train.batch_size={batch}"], run_schema()))
    model, tcfg = run.stage.model, run.train
    mesh = make_mesh(run.mesh.shape)
    unet_boxed = lambda: boxed_init(model, stream(tcfg.seed, Stream.PARAMS))  # noqa: E731
    optimizer = make_optimizer(tcfg)
    abstract_boxed = jax.eval_shape(unet_boxed)
    abstract = nn.meta.unbox(abstract_boxed)
    param_sh = logical_shardings(abstract_boxed, mesh)
    state_sh = state_shardings(optimizer, abstract, param_sh, mesh)
    params, _ = sharded_init(unet_boxed, mesh)
    state = jax.jit(functools.partial(init_state, optimizer=optimizer), out_shardings=state_sh)(params)
    jax.block_until_ready(state)
    setup = time.perf_counter() - t0

    from ediffi_jax.models.unet import UNet

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    res = model.resolution
    rng = np.random.default_rng(0)
    cond = model.zero_conditioning(batch)
    batch_tree = {"image": jnp.asarray(rng.uniform(-1, 1, (batch, res, res, model.in_channels)),
                                       jnp.float32),
                  "index": jnp.arange(batch, dtype=jnp.int32), "cond": cond}
    batch_tree = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), batch_tree)
    step_fn = jax.jit(functools.partial(train_step, unet=UNet(model), cfg=tcfg, optimizer=optimizer),
                      in_shardings=(state_sh, None, replicated), donate_argnums=0,
                      out_shardings=(state_sh, replicated))
    interval = jax.device_put(tcfg.sigma_interval(), replicated)
    t = time.perf_counter()
    lowered = step_fn.lower(state, batch_tree, interval)
    lower = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    calls = []
    for _ in range(2):
        t = time.perf_counter()
        state, metrics = compiled(state, batch_tree, interval)
        jax.block_until_ready((state, metrics))
        calls.append(time.perf_counter() - t)
    return {"setup_s": setup, "lower_s": lower, "compile_s": compile_s, "call_s": calls,
            "to_first_step_s": setup + lower + compile_s + calls[0]}


def sample_job(batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ediffi_jax.config import load_config
    from ediffi_jax.diffusion.intervals import CONFIG_LAYOUTS
    from ediffi_jax.diffusion.sampling import PlanRunner
    from ediffi_jax.models.experts import ExpertEnsemble
    from ediffi_jax.models.unet import UNet, init_params
    from ediffi_jax.parallel.mesh import batch_sharding, make_mesh
    from ediffi_jax.pipeline.denoise import unet_denoise_fn
    from ediffi_jax.pipeline.generate import denoise_batch, sampling_plan
    from ediffi_jax.runs.spec import parse_run, run_schema

    t0 = time.perf_counter()
    run = parse_run(load_config(CONFIG, [], run_schema()))
    model = run.stage.model
    mesh = make_mesh((-1, 1, 1))
    experts = [init_params(model, jax.random.key(i)) for i in range(3)]
    ensemble = ExpertEnsemble(CONFIG_LAYOUTS["D"], experts)
    cond = model.zero_conditioning(batch)
    cond = cond.replace(t5_mask=jnp.ones_like(cond.t5_mask), clip_mask=jnp.ones_like(cond.clip_mask))
    cond = jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), cond)
    jax.block_until_ready((experts, cond))
    setup = time.perf_counter() - t0
    plan = sampling_plan(model, ensemble, run.stage.sampling, model.resolution)
    runner = PlanRunner(unet_denoise_fn(UNet(model)))
    runs = []
    for _ in range(2):
        t = time.perf_counter()
        x = denoise_batch(run, ensemble, cond, np.arange(batch), runner=runner,
                          batch_sharding=batch_sharding(mesh))
        x.block_until_ready()
        runs.append(time.perf_counter() - t)
    return {"setup_s": setup, "run_s": runs, "compile_s": runs[0] - runs[1],
            "compiles": runner.trace_count, "segments": len(plan.segments),
            "distinct_settings": len(plan.distinct_settings()), "sampler": plan.segments[0].settings.sampler,
            "steps": len(plan.sigmas) - 1, "to_first_images_s": setup + runs[0]}


def worker(what: str, devices: int, batch: int) -> dict:
    from ediffi_jax.parallel.host import configure_cpu_host

    configure_cpu_host(devices)
    t = time.perf_counter()
    import jax

    jax.devices()
    out = {"jax_start_s": time.perf_counter() - t, "devices": jax.device_count()}
    out.update(train_job(batch) if what == "train" else sample_job(batch))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="train,sample")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--devices", type=int, default=os.cpu_count())
    p.add_argument("--train-batch", type=int, default=8, help="configs/tiny.py's batch")
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--worker", choices=("train", "sample"))
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.worker:
        batch = args.train_batch if args.worker == "train" else args.sample_batch
        print("RESULT " + json.dumps(worker(args.worker, args.devices, batch)))
        return 0
    whats = [w for w in args.what.split(",") if w]

    from benchmarks.t5_encode import machine

    info = machine()
    env0 = {k: v for k, v in os.environ.items()
            if not k.startswith("JAX_COMPILATION_CACHE") and not k.startswith("JAX_PERSISTENT_CACHE")
            and k != "XLA_FLAGS"}
    results = {w: {m: [] for m in MODES} for w in whats}
    cache_size = {w: [] for w in whats}
    for r in range(args.rounds):
        for what in whats:
            cache = tempfile.mkdtemp(prefix="jax_cache_")
            try:
                order = MODES if r % 2 == 0 else ("cache, cold", "cache, warm", "no cache")
                for mode in order:
                    env = dict(env0)
                    if mode != "no cache":
                        env["JAX_COMPILATION_CACHE_DIR"] = cache
                    t = time.perf_counter()
                    proc = subprocess.run(
                        [sys.executable, "-m", "benchmarks.compile_time", "--worker", what,
                         "--devices", str(args.devices), "--train-batch", str(args.train_batch),
                         "--sample-batch", str(args.sample_batch)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
                    wall = time.perf_counter() - t
                    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    if proc.returncode or not lines:
                        raise RuntimeError(f"{what} worker ({mode}) failed:\n{proc.stderr[-3000:]}")
                    out = json.loads(lines[-1][len("RESULT "):])
                    out["process_wall_s"] = wall
                    results[what][mode].append(out)
                    if mode == "cache, cold":
                        cache_size[what].append(_cache_files(cache))
                    key = "compile_s"
                    print(f"round {r + 1}/{args.rounds} {what} [{mode}]: compile {out[key]:.2f} s, "
                          f"process {wall:.1f} s", file=sys.stderr, flush=True)
            finally:
                shutil.rmtree(cache, ignore_errors=True)

    import jax

    med = lambda xs: statistics.median(xs)  # noqa: E731
    cmd = (f"python -m benchmarks.compile_time --what {','.join(whats)} --rounds {args.rounds} "
           f"--devices {args.devices}")
    print(f"## Compile time, tiny model on CPU ({info['date']})\n")
    print(f"`{cmd}`  ")
    print(f"Machine: {info['nproc']} CPU cores, {info['cpu']}; jax {jax.__version__}, {args.devices} "
          f"XLA CPU device(s); each figure the median of {args.rounds} fresh processes.\n")
    for what in whats:
        rows = results[what]
        base = med([x["compile_s"] for x in rows["no cache"]])
        if what == "train":
            print(f"Train step (configs/tiny.py, batch {args.train_batch}):\n")
            print("| mode | trace + lower (s) | XLA compile (s) | compile vs no cache | setup: mesh, init (s) | "
                  "process start to first step done (s) | process wall (s) |")
            print("|---|---|---|---|---|---|---|")
            for mode in MODES:
                xs = rows[mode]
                c = [x["compile_s"] for x in xs]
                ratios = [a["compile_s"] / b["compile_s"] for a, b in zip(xs, rows["no cache"])]
                print(f"| {mode} | {med([x['lower_s'] for x in xs]):.2f} | {med(c):.2f} "
                      f"({min(c):.2f}-{max(c):.2f}) | {med(ratios):.3f} | {med([x['setup_s'] for x in xs]):.2f} | "
                      f"{med([x['jax_start_s'] + x['to_first_step_s'] for x in xs]):.2f} | "
                      f"{med([x['process_wall_s'] for x in xs]):.1f} |")
            print(f"\nStep time after compiling: {med([x['call_s'][1] for x in rows['no cache']]):.3f} s.")
        else:
            x0 = rows["no cache"][0]
            print(f"3-expert sampling plan (Config-D, {x0['sampler']}, {x0['steps']} steps, CFG, batch "
                  f"{args.sample_batch}): {x0['segments']} segments, {x0['distinct_settings']} distinct "
                  f"settings, {x0['compiles']} compile(s) of the segment loop:\n")
            print("| mode | first run (s) | second run (s) | compile = first - second (s) | vs no cache | "
                  "setup: 3 experts' init (s) | process wall (s) |")
            print("|---|---|---|---|---|---|---|")
            for mode in MODES:
                xs = rows[mode]
                c = [x["compile_s"] for x in xs]
                ratios = [a["compile_s"] / b["compile_s"] for a, b in zip(xs, rows["no cache"])]
                print(f"| {mode} | {med([x['run_s'][0] for x in xs]):.2f} | {med([x['run_s'][1] for x in xs]):.2f} | "
                      f"{med(c):.2f} ({min(c):.2f}-{max(c):.2f}) | {med(ratios):.3f} | "
                      f"{med([x['setup_s'] for x in xs]):.2f} | {med([x['process_wall_s'] for x in xs]):.1f} |")
        files = cache_size[what]
        print(f"\nCache written by the cold run: {med([f[0] for f in files])} files, "
              f"{med([f[1] for f in files]) / 1e6:.2f} MB. (no-cache compile median {base:.2f} s)\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "machine": info, "results": results, "cache": cache_size}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
