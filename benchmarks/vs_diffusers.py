"""The U-Net on CPU against diffusers' UNet2DConditionModel (PyTorch): a training step and a
batched classifier-free-guidance sampling step, the same configuration, in one run.

    python -m benchmarks.vs_diffusers [--what train,sample] [--rounds 6] [--iters 3]
                                      [--jax-devices 2] [--variants base,bf16,...]
                                      [--torch-variant matched|stock] [--xla-flags "..."]

The configuration (`--config small`, sized for 2 CPU cores): 32x32x3 input, channels 64 with
channel_mult (1, 2, 2) (feature maps 32, 16, 8), 2 res blocks per level (3 on the way up),
self- + cross-attention at 16x16 and 8x8 and in the middle, head dim 32 (4 heads at 128
channels), a context of 34 tokens x 128 (our T5 16 + CLIP 16 + image token + null token; the
torch side gets 34 random tokens of width 128), scale-shift norm in the res blocks. Batch 8 for
training; sampling batch 8, so each U-Net call sees 16 (cond + uncond).

diffusers' side: UNet2DConditionModel with block_out_channels (64, 128, 128), layers_per_block
2, DownBlock2D + 2 CrossAttnDownBlock2D (and the mirror up), UNetMidBlock2DCrossAttn,
cross_attention_dim 128, 4 heads (diffusers' `attention_head_dim` is the head count),
resnet_time_scale_shift "scale_shift", linear proj_in/out, SDPA attention. Its transformer
block has a GEGLU feed-forward (C -> 8C -> 4C -> C) and proj_in/proj_out that our attention
block has not; `--torch-variant matched` (the default) removes those (see
benchmarks/_torch_unet_worker.py), `stock` keeps them. Other differences, left as they are:
LayerNorm vs our GroupNorm before the attentions, 32 GroupNorm groups at 64 channels vs our 16,
our context projections (T5, CLIP, image token: three 128 x 128 dense layers) and the pooled /
image embeddings added to the noise embedding. Both sides report params and FLOPs (matmuls +
convs, 2 per multiply-add: torch's FlopCounterMode, a jaxpr walk here).

Work per call, both sides: train = EDM loss (per-example sigma, noise and conditioning
dropout, preconditioning, weighting), backward, global-norm clip 1, AdamW, EMA; JAX runs
ediffi_jax/training/step.py's `train_step` under `jax.jit` with the trainer's shardings and donation.
sample = `--sample-steps` Euler steps of CFG (w = 3) on batch B, the cond and uncond branches in
one U-Net call of 2B; JAX runs `PlanRunner` (one jitted fori_loop). Random weights everywhere
(none zero), float32 params.

JAX variants (`--variants`, each compiled in this process and timed in every round):
base (float32, XLA attention, no remat, donated), bf16 (model.dtype bfloat16), attn-auto
(model.attention_impl "auto": jax.nn.dot_product_attention), remat (model.remat), no-donate
(no buffer donation), old-norm (GroupNorm and nearest upsampling as before issue 9, traced
with the old forms), and "xla:NAME=VALUE;NAME=VALUE" (per-compile XLA options, e.g.
xla:xla_cpu_experimental_ynn_fusion_type= for XLA without YNNPACK). Process-wide levers are
flags: `--jax-devices N` (batch sharded over N XLA CPU devices, as the CLI does), `--xla-flags`
(appended to XLA_FLAGS). Results and reading: BENCHMARKS.md (issue 9).

Rounds alternate torch and the JAX variants (forward order, then reversed); each side times
`--iters` calls, a round's figure is its median. Reported: s/call per side (median over
rounds), the time ratios JAX / torch (and variant / base) as medians of the per-round paired
ratios with min-max, and other processes' CPU per round (a neighbouring job on 2 cores slows
torch's OpenMP threads more than XLA's pool).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.t5_encode import OtherLoad, TorchWorker, machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "benchmarks", "_torch_unet_worker.py")
QUIET = 0.15

CONFIGS = {
    "small": dict(
        resolution=32, channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
        attention_resolutions=(16, 8), attention_head_dim=32, context_dim=128,
        t5_dim=128, t5_length=16, clip_dim=128, clip_length=16, clip_pooled_dim=128,
        clip_image_dim=128,
    ),
}

VARIANTS = {  # name: UNetConfig overrides, donate
    "base": ({}, True),
    "bf16": ({"dtype": "bfloat16"}, True),
    "attn-auto": ({"attention_impl": "auto"}, True),
    "remat": ({"remat": True}, True),
    "no-donate": ({}, False),
    "old-norm": ({}, True),  # GroupNorm and nearest upsampling as before issue 9 (old_layers())
}


def _old_group_norm(x, scale, bias, groups, eps=1e-5):
    """GroupNorm as it was before issue 9: statistics of the [B, ..., G, C/G] view."""
    import jax
    import jax.numpy as jnp

    c = x.shape[-1]
    xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, c // groups))
    axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias


def _old_upsample(x, factor=2):
    import jax

    b, h, w, c = x.shape
    return jax.image.resize(x, (b, factor * h, factor * w, c), method="nearest")


@contextlib.contextmanager
def old_layers(variant: str):
    """For the variant "old-norm", the U-Net traces with the layer forms before issue 9
    (GroupNorm statistics on the [B, H, W, G, C/G] view, nearest upsampling by a gather), so
    old and new compare in one process."""
    from ediffi_jax.models import layers, unet

    saved = layers.group_norm, unet.upsample_nearest
    if variant == "old-norm":
        layers.group_norm, unet.upsample_nearest = _old_group_norm, _old_upsample
    try:
        yield
    finally:
        layers.group_norm, unet.upsample_nearest = saved


def diffusers_config(m: dict) -> dict:
    """UNet2DConditionModel kwargs for our UNetConfig fields `m`."""
    levels = len(m["channel_mult"])
    attn = [m["resolution"] // 2**lvl in m["attention_resolutions"] for lvl in range(levels)]
    channels = [m["channels"] * k for k in m["channel_mult"]]
    heads = [max(1, c // m["attention_head_dim"]) for c in channels]
    if len(set(h for h, a in zip(heads, attn) if a) | {heads[-1]}) != 1:
        raise ValueError("diffusers takes one head count per block; this config varies it")
    return dict(
        sample_size=m["resolution"], in_channels=3, out_channels=3,
        block_out_channels=channels, layers_per_block=m["num_res_blocks"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=m["context_dim"],
        attention_head_dim=heads[-1], norm_num_groups=32, resnet_time_scale_shift="scale_shift",
        use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    )


class UNetWorker(TorchWorker):
    """benchmarks/_torch_unet_worker.py as a persistent subprocess (the T5 worker's protocol)."""

    def __init__(self, python: str, spec_path: str, threads: int, log_path: str):
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1"}
        env.pop("XLA_FLAGS", None)
        self.proc = subprocess.Popen(
            [python, WORKER, spec_path, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            bufsize=1, env=env, cwd=ROOT)
        self.info = self._read()
        if not self.info.get("ready"):
            raise RuntimeError(f"torch worker did not start: {self.info}")


def matmul_flops(jaxpr) -> float:
    """Multiply-add FLOPs (x2) of every conv and dot in a closed jaxpr, sub-jaxprs included
    (scan bodies times their length, the costliest branch of a cond; while loops once), every
    kernel tap counted (zero padding too, as torch's FlopCounterMode). A remat'd block's
    recompute is in the jaxpr and counted: trace without remat for model FLOPs. XLA's
    cost_analysis() is no substitute: it counts loop bodies once and skips padding taps
    (docs/ARCHITECTURE.md)."""
    import math

    from jax.extend import core

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
        subs = []
        for value in eqn.params.values():
            for v in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(v, core.ClosedJaxpr):
                    subs.append(v.jaxpr)
                elif isinstance(v, core.Jaxpr):
                    subs.append(v)
        if name == "cond":
            total += max((matmul_flops(s) for s in subs), default=0.0)
        else:
            reps = eqn.params.get("length", 1) if name == "scan" else 1
            total += reps * sum(matmul_flops(s) for s in subs)
    return total


def random_params(params, seed: int):
    """Every kernel normal / sqrt(fan in) (zero-initialised layers too: no all-zero shortcut),
    the rest as initialised; float32."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def one(path, x):
        if getattr(path[-1], "key", None) == "kernel":
            fan_in = int(np.prod(x.shape[:-1]))
            return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)
        return np.asarray(x, np.float32)

    return jax.tree_util.tree_map_with_path(one, params)


def build_jax(model_fields: dict, variant: str, args, mesh):
    """Compiled train and sample callables of one variant. Returns a dict of closures + info."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ediffi_jax.diffusion.guidance import guided_denoise
    from ediffi_jax.diffusion.plan import build_plan
    from ediffi_jax.diffusion.sampling import PlanRunner
    from ediffi_jax.diffusion.schedules import karras_sigmas
    from ediffi_jax.models.conditioning import Conditioning
    from ediffi_jax.models.unet import UNet, UNetConfig, boxed_init, count_params
    from ediffi_jax.parallel.mesh import batch_sharding, logical_shardings
    from ediffi_jax.pipeline.denoise import unet_denoise_fn
    from ediffi_jax.training.step import (TrainConfig, init_state, make_optimizer, state_shardings, train_step)

    overrides, donate = VARIANTS["base" if variant.startswith("xla:") else variant]
    compiler_options = xla_options(variant)
    model = UNetConfig(**{**model_fields, **overrides})
    unet = UNet(model)
    tcfg = TrainConfig(batch_size=args.train_batch, lr=1e-4, weight_decay=0.01, grad_clip=1.0,
                       ema_decay=0.999, ema_warmup=False, seed=args.seed)
    optimizer = make_optimizer(tcfg)
    abstract_boxed = jax.eval_shape(lambda: boxed_init(model, jax.random.key(0)))
    abstract = nn.meta.unbox(abstract_boxed)
    param_sh = logical_shardings(abstract_boxed, mesh)
    state_sh = state_shardings(optimizer, abstract, param_sh, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(random_params(abstract_zeros(abstract), args.seed), param_sh)

    rng = np.random.default_rng(args.seed)
    res = model.resolution

    def conditioning(batch, zero=False):
        c = Conditioning.zeros(batch, t5_length=model.t5_length, t5_dim=model.t5_dim,
                               clip_length=model.clip_length, clip_dim=model.clip_dim,
                               clip_pooled_dim=model.clip_pooled_dim,
                               clip_image_dim=model.clip_image_dim)
        if zero:
            return c
        r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
        return c.replace(t5_tokens=r(*c.t5_tokens.shape), t5_mask=jnp.ones_like(c.t5_mask),
                         clip_tokens=r(*c.clip_tokens.shape), clip_mask=jnp.ones_like(c.clip_mask),
                         clip_pooled=r(*c.clip_pooled.shape), clip_image=r(*c.clip_image.shape))

    def place(tree):
        return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), tree)

    out = {"params": count_params(params), "config": model}
    if "train" in args.what:
        b = args.train_batch
        batch = place({"image": jnp.asarray(rng.uniform(-1, 1, (b, res, res, 3)), jnp.float32),
                       "index": jnp.arange(b, dtype=jnp.int32), "cond": conditioning(b)})
        state = jax.jit(functools.partial(init_state, optimizer=optimizer),
                        out_shardings=state_sh)(params)
        step = functools.partial(train_step, unet=unet, cfg=tcfg, optimizer=optimizer)
        step_fn = jax.jit(step, in_shardings=(state_sh, None, replicated),
                          donate_argnums=0 if donate else (), out_shardings=(state_sh, replicated))
        interval = jax.device_put(tcfg.sigma_interval(), replicated)
        t = time.perf_counter()
        compiled = step_fn.lower(state, batch, interval).compile(compiler_options=compiler_options)
        out["train_compile"] = time.perf_counter() - t
        out["train_compiled"] = compiled
        if variant == "base":
            out["train_flops"] = matmul_flops(jax.make_jaxpr(step)(state, batch, interval).jaxpr)
        holder = {"state": state}

        def train_call():
            holder["state"], metrics = compiled(holder["state"], batch, interval)
            jax.block_until_ready(holder["state"])
            return metrics

        out["train"] = train_call
    if "sample" in args.what:
        b = args.sample_batch
        cond = place(conditioning(b))
        uncond = place(conditioning(b, zero=True))
        plan = build_plan(karras_sigmas(args.sample_steps), sampler="euler",
                          guidance_scale=args.guidance_scale)
        runner = (PlanRunner(unet_denoise_fn(unet)) if donate and not compiler_options else
                  _runner(unet_denoise_fn(unet), donate, compiler_options))
        keys = place(jax.vmap(jax.random.key)(jnp.arange(b)))
        x0 = place(jnp.asarray(rng.standard_normal((b, res, res, 3)) * plan.sigmas[0], jnp.float32))
        t = time.perf_counter()
        runner.run(plan, [params], cond, keys, x0).block_until_ready()
        out["sample_compile"] = time.perf_counter() - t  # compile + one call
        if variant == "base":
            denoise = unet_denoise_fn(unet)
            settings = plan.segments[0].settings

            def one_step(p, x):
                sigma = jnp.full((b,), plan.sigmas[0], jnp.float32)
                d = guided_denoise(functools.partial(denoise, settings=settings), p, x, sigma,
                                   cond, uncond, args.guidance_scale, True)
                return x + (plan.sigmas[1] - plan.sigmas[0]) * (x - d) / plan.sigmas[0]

            out["sample_step_flops"] = matmul_flops(jax.make_jaxpr(one_step)(params, x0).jaxpr)
        assert runner.trace_count == 1, runner.trace_count
        out["sample"] = lambda: runner.run(plan, [params], cond, keys, x0).block_until_ready()
    return out


def abstract_zeros(abstract):
    import jax
    import numpy as np

    return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract)


def xla_options(variant: str) -> dict:
    """A variant "xla:NAME=VALUE;NAME=VALUE" -> per-compile XLA options (debug options such as
    xla_cpu_experimental_ynn_fusion_type), so flag settings compare in one process."""
    if not variant.startswith("xla:"):
        return {}
    def value(v: str):
        if v.lower() in ("true", "false"):
            return v.lower() == "true"
        return int(v) if v.lstrip("-").isdigit() else v

    return {k: value(v) for k, v in (item.split("=", 1) for item in variant[4:].split(";") if item)}


def _runner(denoise_fn, donate: bool, compiler_options: dict):
    """A PlanRunner whose segment loops jit without donation and/or with XLA options."""
    import jax

    from ediffi_jax.diffusion.sampling import PlanRunner

    class Runner(PlanRunner):
        def loop(self, settings):
            if settings not in self._loops:
                self._loops[settings] = jax.jit(
                    functools.partial(self._segment_loop, settings=settings),
                    donate_argnums=(2,) if donate else (), compiler_options=compiler_options or None)
            return self._loops[settings]

    return Runner(denoise_fn)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_diffusers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=sorted(CONFIGS))
    p.add_argument("--what", default="train,sample", help="comma list: train, sample")
    p.add_argument("--variants", default="base", help=f"comma list of {list(VARIANTS)} or "
                   "xla:NAME=VALUE;NAME=VALUE (per-compile XLA options)")
    p.add_argument("--torch-variant", default="matched", choices=("matched", "stock"))
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=2, help="Euler CFG steps per sample call")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iters", type=int, default=3, help="timed calls per side per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side after compile")
    p.add_argument("--jax-devices", type=int, default=1)
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS for the JAX side")
    p.add_argument("--torch-python", default=os.path.join(ROOT, ".venv-tools", "bin", "python"))
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    args.what = [w for w in args.what.split(",") if w]
    variants = [v for v in args.variants.split(",") if v]
    bad = [w for w in args.what if w not in ("train", "sample")] + [
        v for v in variants if v not in VARIANTS and not v.startswith("xla:")]
    if bad:
        p.error(f"unknown --what/--variants entries {bad}")
    if not os.path.exists(args.torch_python):
        p.error(f"no torch Python at {args.torch_python} (see tools/requirements-torch.txt)")
    for b in (args.train_batch, args.sample_batch):
        if b % args.jax_devices:
            p.error(f"batch {b} must be a multiple of --jax-devices {args.jax_devices}")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        p.error("XLA_FLAGS already forces a host device count; use --jax-devices")
    os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={args.jax_devices} "
                               f"{args.xla_flags}").strip()

    import jax
    import jaxlib

    from ediffi_jax.parallel.mesh import make_mesh

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine()
    fields = CONFIGS[args.config]
    tmp = tempfile.mkdtemp(prefix="vs_diffusers_")
    worker = None
    try:
        spec = {"unet": diffusers_config(fields), "variant": args.torch_variant,
                "train_batch": args.train_batch, "sample_batch": args.sample_batch,
                "context_length": fields["t5_length"] + fields["clip_length"] + 2,
                "sample_steps": args.sample_steps, "guidance_scale": args.guidance_scale,
                "seed": args.seed}
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        worker = UNetWorker(args.torch_python, spec_path, args.torch_threads,
                            os.path.join(tmp, "torch_worker.log"))
        if len(jax.devices()) != args.jax_devices:
            raise RuntimeError(f"asked for {args.jax_devices} JAX devices, got {len(jax.devices())}")
        mesh = make_mesh((-1, 1, 1))
        jax_sides = {}
        for v in variants:
            t = time.perf_counter()
            with old_layers(v):  # every trace of the variant happens inside build_jax
                jax_sides[v] = build_jax(fields, v, args, mesh)
            print(f"built JAX {v} in {time.perf_counter() - t:.1f} s "
                  f"(train compile {jax_sides[v].get('train_compile', 0):.1f} s, sample compile+call "
                  f"{jax_sides[v].get('sample_compile', 0):.1f} s)", file=sys.stderr, flush=True)
        flops = worker.call(cmd="flops")
        for what in args.what:
            worker.call(cmd="time", what=what, iters=args.warmup)
            for v in variants:
                for _ in range(args.warmup):
                    jax_sides[v][what]()

        def jax_round(v, what, k):
            times = []
            for _ in range(k):
                t = time.perf_counter()
                jax_sides[v][what]()
                times.append(time.perf_counter() - t)
            return times

        pids = [os.getpid(), worker.proc.pid]
        sides = ["torch"] + variants
        results = {}
        for what in args.what:
            med = {s: [] for s in sides}
            load = {s: [] for s in sides}
            for r in range(args.rounds):
                for s in (sides if r % 2 == 0 else sides[::-1]):
                    time.sleep(0.1)  # let the other side's spinning threads park
                    with OtherLoad(pids) as ld:
                        times = (worker.call(cmd="time", what=what, iters=args.iters)["times"]
                                 if s == "torch" else jax_round(s, what, args.iters))
                    med[s].append(statistics.median(times))
                    load[s].append(ld.cores)
                print(f"{what} round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{s} {med[s][-1]:.3f} s ({load[s][-1]:.2f})" for s in sides),
                    file=sys.stderr, flush=True)
            results[what] = {"median": med, "others": load}

        import flax

        cmd = "python -m benchmarks.vs_diffusers " + " ".join(a for a in [
            f"--what {','.join(args.what)}", f"--variants {','.join(variants)}",
            f"--torch-variant {args.torch_variant}" if args.torch_variant != "matched" else "",
            f"--rounds {args.rounds}", f"--iters {args.iters}",
            f"--jax-devices {args.jax_devices}" if args.jax_devices != 1 else "",
            f"--xla-flags '{args.xla_flags}'" if args.xla_flags else "",
            f"--train-batch {args.train_batch}" if args.train_batch != 8 else "",
            f"--sample-batch {args.sample_batch}" if args.sample_batch != 8 else "",
            f"--sample-steps {args.sample_steps}" if args.sample_steps != 2 else ""] if a)
        base = jax_sides[variants[0]]
        report = {"command": cmd, "machine": info, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                  "flax": flax.__version__, "jax_devices": args.jax_devices,
                  "xla_flags": os.environ["XLA_FLAGS"], "torch": worker.info,
                  "jax_params": base["params"], "torch_flops": flops,
                  "jax_flops": {k: base.get(k) for k in ("train_flops", "sample_step_flops")},
                  "compile": {v: {k: jax_sides[v].get(k) for k in ("train_compile", "sample_compile")}
                              for v in variants},
                  "results": {}}
        print()
        print(f"## U-Net vs diffusers on CPU ({info['date']})\n")
        print(f"`{cmd}`  ")
        print(f"Machine: {info['nproc']} CPU cores, {info['cpu']}; jax {jax.__version__} "
              f"(flax {flax.__version__}), {args.jax_devices} XLA CPU device(s), XLA_FLAGS "
              f"`{os.environ['XLA_FLAGS']}`; torch {worker.info['torch']}, diffusers "
              f"{worker.info['diffusers']}, {worker.info['threads']} threads, "
              f"{worker.info['attn_processor']}, variant {args.torch_variant}.  ")
        print(f"Params: ours {base['params'] / 1e6:.3f} M, diffusers {worker.info['params'] / 1e6:.3f} M. "
              + "FLOPs (matmul + conv): " + "; ".join(
                  f"{what} ours {base[k] / 1e9:.2f} G, diffusers {flops[tk] / 1e9:.2f} G"
                  for what, k, tk in (("train step", "train_flops", "train"),
                                      ("sample step", "sample_step_flops", "sample_step"))
                  if k in base) + ".\n")
        for what in args.what:
            med, load = results[what]["median"], results[what]["others"]
            unit = (f"train step, batch {args.train_batch}" if what == "train" else
                    f"sample call: {args.sample_steps} Euler CFG steps, batch {args.sample_batch} "
                    f"(U-Net batch {2 * args.sample_batch})")
            print(f"{unit}:\n")
            work_jax = (base.get("train_flops") if what == "train" else
                        base.get("sample_step_flops", 0) * args.sample_steps)
            work_torch = flops["train"] if what == "train" else flops["sample_step"] * args.sample_steps
            rate = lambda f, s: f"{f / s / 1e9:.0f}" if f else ""  # noqa: E731
            print("| side | median s/call | GFLOP/s (matmul + conv) | ratio JAX / torch (min-max) | "
                  "ratio / JAX base (min-max) |")
            print("|---|---|---|---|---|")
            t_s = statistics.median(med["torch"])
            print(f"| torch ({args.torch_variant}) | {t_s:.3f} | {rate(work_torch, t_s)} | | |")
            rep = {"torch_s": t_s, "torch_rounds": med["torch"], "others": load, "variants": {}}
            for v in variants:
                r_t = [a / b for a, b in zip(med[v], med["torch"])]
                r_b = [a / b for a, b in zip(med[v], med[variants[0]])]
                s = statistics.median(med[v])
                print(f"| JAX {v} | {s:.3f} | {rate(work_jax, s)} | **{statistics.median(r_t):.3f}** ({min(r_t):.3f}-"
                      f"{max(r_t):.3f}) | " + ("" if v == variants[0] else
                      f"{statistics.median(r_b):.3f} ({min(r_b):.3f}-{max(r_b):.3f})") + " |")
                quiet = [x for x, a, b in zip(r_t, load[v], load["torch"]) if a < QUIET and b < QUIET]
                rep["variants"][v] = {"s": s, "rounds": med[v], "ratio_torch": statistics.median(r_t),
                                      "ratio_torch_min": min(r_t), "ratio_torch_max": max(r_t),
                                      "ratio_base": statistics.median(r_b),
                                      "ratio_base_min": min(r_b), "ratio_base_max": max(r_b),
                                      "quiet_ratio_torch": statistics.median(quiet) if quiet else None,
                                      "quiet_rounds": len(quiet)}
            print()
            quiet = {v: rep["variants"][v]["quiet_rounds"] for v in variants}
            print(f"Rounds where other processes used < {QUIET} cores on both sides: {quiet}" + "".join(
                f"; {v} over those: {rep['variants'][v]['quiet_ratio_torch']:.3f}"
                for v in variants if rep["variants"][v]["quiet_ratio_torch"] is not None) + ".  ")
            print("Other processes' CPU per round (cores): " + "; ".join(
                f"{s} {[round(x, 2) for x in load[s]]}" for s in sides) + "\n")
            report["results"][what] = rep
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)
        return 0
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
