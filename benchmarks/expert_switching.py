"""Expert switching overhead: a 3-expert (Config-D) plan vs one model over the same Heun steps.

    python -m benchmarks.expert_switching [--config configs/tiny.py] [--steps 32] [--batch 8]

Both plans run in one process after a warm-up that compiles them, in A-B-B-A order so drift
hits both alike; the figure is the median over repeats of the paired time ratio (target <= 1.02),
with the ratio of the fastest runs beside it. Also reports how many times the segment loop
was compiled for each plan: it should equal the number of distinct static segment settings.

Because both plans run the same compiled loop, the only cost of switching is one dispatch per
extra segment; the second table measures it directly with a network-free denoiser, where
wall-time noise of the U-Net runs cannot hide it.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from ediffi_jax.config import load_config
from ediffi_jax.diffusion.intervals import CONFIG_LAYOUTS, SINGLE
from ediffi_jax.diffusion.sampling import PlanRunner
from ediffi_jax.models.unet import UNet, init_params
from ediffi_jax.pipeline.denoise import unet_denoise_fn
from ediffi_jax.runs.spec import parse_config


def _dispatch_cost(plans, shape, repeats, cond):
    """Seconds per plan with a denoiser that does no work: what segments themselves cost
    (`cond`, batch 2, only feeds the runner's branch derivation; the denoiser ignores it)."""
    trivial = lambda params, x, sigma, cond, settings: x - sigma[:, None, None, None] * params  # noqa: E731
    runner = PlanRunner(trivial)
    experts = [jnp.float32(i + 1) for i in range(3)]
    x = jnp.zeros((2,) + shape)
    out = {}
    for name, plan in plans.items():
        runner.run(plan, experts, cond, None, x).block_until_ready()
    for name, plan in plans.items():
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            runner.run(plan, experts, cond, None, x).block_until_ready()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=40)
    args = ap.parse_args(argv)

    spec = parse_config(load_config(args.config, [f"--config.sampling.num_steps={args.steps}"]))
    model = spec.model
    experts = [init_params(model, jax.random.key(i)) for i in range(3)]
    cond = model.zero_conditioning(args.batch)
    shape = (model.resolution, model.resolution, model.in_channels)
    plans = {"one model": spec.sampling.plan(SINGLE), "3 experts": spec.sampling.plan(CONFIG_LAYOUTS["D"])}
    params = {"one model": experts[:1], "3 experts": experts}
    runners = {name: PlanRunner(unet_denoise_fn(UNet(model))) for name in plans}

    def run(name):
        t = time.perf_counter()
        out = runners[name].sample(plans[name], params[name], shape, seed=0,
                                   example_indices=jnp.arange(args.batch), cond=cond)
        out.block_until_ready()
        return time.perf_counter() - t

    for name in plans:  # compile
        run(name)
    times = {name: [] for name in plans}
    names = list(plans)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(run(name))
    med = {name: statistics.median(v) for name, v in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["3 experts"], times["one model"]))
    best_ratio = min(times["3 experts"]) / min(times["one model"])

    print(f"## Expert switching overhead ({datetime.date.today()})\n")
    print(f"`python -m benchmarks.expert_switching --config {args.config} --steps {args.steps} "
          f"--batch {args.batch} --repeats {args.repeats}`  ")
    print(f"Machine: {platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}; {spec.sampling.sampler}, CFG w={spec.sampling.guidance_scale}.\n")
    print("| plan | segments | distinct settings | compiles | median s/batch | ratio |")
    print("|---|---|---|---|---|---|")
    for name in plans:
        p = plans[name]
        print(f"| {name} | {len(p.segments)} | {len(p.distinct_settings())} | "
              f"{runners[name].trace_count} | {med[name]:.3f} | {med[name] / med['one model']:.3f} |")
    dispatch = _dispatch_cost(plans, shape, repeats=200, cond=model.zero_conditioning(2))
    extra = len(plans["3 experts"].segments) - len(plans["one model"].segments)
    per_segment = (dispatch["3 experts"] - dispatch["one model"]) / max(extra, 1)
    print("\n| network-free denoiser | median ms/batch |\n|---|---|")
    for name in plans:
        print(f"| {name} | {dispatch[name] * 1e3:.3f} |")
    print(f"\nCost per extra segment: {per_segment * 1e3:.3f} ms, i.e. "
          f"{100 * extra * per_segment / med['one model']:.3f}% of the one-model U-Net run.")
    print(f"\nTime ratio 3 experts / one model: **{ratio:.3f}** (median of paired ratios; "
          f"target <= 1.02); fastest-run ratio {best_ratio:.3f}.  \nAll runs (s): "
          f"{({k: [round(x, 3) for x in v] for k, v in times.items()})}")
    return ratio


if __name__ == "__main__":
    main()
