"""ScaleCrafter on a model trained at 32x32: repetition at 4x and 16x the pixels, and cost.

    python -m benchmarks.highres [--model pretrained/tiny-shapes] [--num64 128] [--num128 64]
        [--timing-rounds 4] [--skip-quality] [--skip-timing]

Quality: single-object captions of held-out `shapes` examples, sampled at 64x64 and 128x128
(DPM-Solver++(2M), 20 steps, w = 3) directly and with the ScaleCrafter presets (re-dilation;
+ dispersion; + noise-damped CFG). Objects per image are connected components of palette
colours (`ediffi_jax.data.shapes.count_objects`); the repetition rate is the share of images
with more than one object, one having been asked for. Cost: the same batch through each variant
after compiling, alternating variants in ABBA rounds; ratios are medians of paired rounds.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import time

import numpy as np


def variants(factor: float, sigma_tau: float = 1.0):
    from ediffi_jax.highres.plans import HighResConfig

    sc = dict(method="scalecrafter", sigma_tau=sigma_tau)
    out = {"direct": HighResConfig(),
           "re-dilation": HighResConfig(**sc, disperse=False),
           "+ dispersion": HighResConfig(**sc, disperse=True)}
    if factor >= 4:
        out["+ dispersion + NDCFG"] = HighResConfig(**sc, disperse=True, ndcfg=True)
    return out


def captions(run, num: int) -> list[str]:
    """Held-out single-object captions (the evaluation seed of sample.evaluate)."""
    from ediffi_jax.config import section, to_dict
    from ediffi_jax.data.shapes import ShapesConfig, ShapesSource

    fields = dict(to_dict(run.data.shapes) or {})
    fields.update(resolution=run.stage.model.resolution, max_objects=1,
                  seed=int(fields.get("seed", 0)) + 1000)
    source = ShapesSource(section(ShapesConfig, fields, "data.shapes"))
    return [source[i]["caption"] for i in range(num)]


def quality(run, ensemble, resolution: int, num: int, out_dir: str | None, sigma_tau: float,
            only=None, batch: int = 16):
    from ediffi_jax.data.shapes import count_objects, parse_caption, pixel_labels, COLOUR_NAMES
    from ediffi_jax.diffusion.sampling import PlanRunner
    from ediffi_jax.models.unet import UNet
    from ediffi_jax.pipeline.denoise import unet_denoise_fn
    from ediffi_jax.pipeline.generate import generate, grid

    prompts = captions(run, num)
    rows = []
    for name, highres in variants(resolution / run.stage.model.resolution, sigma_tau).items():
        if only and name not in only:
            continue
        runner = PlanRunner(unet_denoise_fn(UNet(run.stage.model)))
        t = time.perf_counter()
        images = np.concatenate([
            generate(run, ensemble, prompts[i:i + batch], resolution=resolution, highres=highres,
                     runner=runner, first_index=i)
            for i in range(0, num, batch)])
        seconds = time.perf_counter() - t
        counts = np.array([count_objects(img) for img in images])
        wanted = [COLOUR_NAMES.index(parse_caption(c)["colour"]) for c in prompts]
        colour_ok = [np.any(pixel_labels(img) == w) for img, w in zip(images, wanted)]
        rows.append(dict(variant=name, n=num, repeated=float(np.mean(counts > 1)),
                         empty=float(np.mean(counts == 0)), mean_objects=float(counts.mean()),
                         colour=float(np.mean(colour_ok)), seconds=seconds))
        print(f"  {resolution}x{resolution} {name}: repetition {rows[-1]['repeated']:.3f}, "
              f"mean objects {rows[-1]['mean_objects']:.2f} ({seconds:.0f} s)", flush=True)
        if out_dir:
            import os

            from PIL import Image

            os.makedirs(out_dir, exist_ok=True)
            Image.fromarray(grid(images[:32], 8)).save(
                os.path.join(out_dir, f"{resolution}_{name.replace(' ', '').replace('+', '_')}.png"))
    return rows


def timing(run, ensemble, resolution: int, rounds: int, sigma_tau: float, batch: int = 4,
           steps: int = 8):
    """Median seconds per sampling call of each variant and paired ratios to its baseline."""
    import dataclasses

    import jax

    from ediffi_jax.diffusion.sampling import PlanRunner
    from ediffi_jax.models.unet import UNet
    from ediffi_jax.pipeline.denoise import unet_denoise_fn
    from ediffi_jax.pipeline.generate import generate

    sampling = dataclasses.replace(run.stage.sampling, num_steps=steps)
    prompts = captions(run, batch)
    configs = variants(resolution / run.stage.model.resolution, sigma_tau)
    names = list(configs)
    runners = {n: PlanRunner(unet_denoise_fn(UNet(run.stage.model))) for n in names}

    def call(name):
        t = time.perf_counter()
        jax.block_until_ready(generate(run, ensemble, prompts, sampling=sampling,
                                       resolution=resolution, highres=configs[name],
                                       runner=runners[name]))
        return time.perf_counter() - t

    for n in names:  # compile every variant's segment loops first
        call(n)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(call(n))
    med = {n: float(np.median(v)) for n, v in times.items()}
    ratios = {}
    for n in names[1:]:
        base = "+ dispersion" if "NDCFG" in n else "direct"  # NDCFG: the same plan without it
        paired = np.array(times[n]) / np.array(times[base])
        ratios[n] = (base, float(np.median(paired)), float(paired.min()), float(paired.max()))
    return med, ratios, {n: runners[n].trace_count for n in names}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.highres", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrained/tiny-shapes")
    p.add_argument("--num64", type=int, default=128)
    p.add_argument("--num128", type=int, default=64)
    p.add_argument("--timing-rounds", type=int, default=4)
    p.add_argument("--out", default="", help="also save sample grids there")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--sigma-tau", type=float, default=1.0, help="highres.sigma_tau of every variant")
    p.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    args = p.parse_args(argv)
    from ediffi_jax.parallel.host import configure_cpu_host

    configure_cpu_host()
    import jax

    from ediffi_jax.runs.store import load_ensemble

    run, ensemble = load_ensemble(args.model)
    cpu = subprocess.run("grep -m1 'model name' /proc/cpuinfo", shell=True, capture_output=True,
                         text=True).stdout.split(":")[-1].strip()
    print(f"## ScaleCrafter on `{args.model}` (trained at {run.stage.model.resolution}x"
          f"{run.stage.model.resolution}), sigma_tau {args.sigma_tau:g}, "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}\n")
    print(f"Machine: {platform.node() and 'dev machine'}, {cpu}, {jax.device_count()} "
          f"{jax.default_backend()} device(s), jax {jax.__version__}\n")
    if not args.skip_quality:
        rows = []
        for res, num in ((64, args.num64), (128, args.num128)):
            if num:
                rows += [dict(r, resolution=res)
                         for r in quality(run, ensemble, res, num, args.out, args.sigma_tau,
                                          [v for v in args.variants.split(",") if v])]
        print("\n| output | variant | n | repetition rate | mean objects | empty | colour present |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['resolution']}x{r['resolution']} | {r['variant']} | {r['n']} | "
                  f"{r['repeated']:.3f} | {r['mean_objects']:.2f} | {r['empty']:.3f} | "
                  f"{r['colour']:.3f} |")
        for res in (64, 128):
            sel = {r["variant"]: r["repeated"] for r in rows if r["resolution"] == res}
            if sel.get("direct"):
                for name, rate in sel.items():
                    if name != "direct":
                        print(f"\n{res}x{res} {name}: repetition cut by "
                              f"{100 * (1 - rate / sel['direct']):.0f}% relative to direct", end="")
        print("\n")
    if not args.skip_timing:
        for res in (64, 128):
            med, ratios, traces = timing(run, ensemble, res, args.timing_rounds, args.sigma_tau)
            print(f"\nTiming at {res}x{res} (batch 4, 8 steps, after compiling; "
                  f"{args.timing_rounds} ABBA rounds):\n")
            print("| variant | median s/call | ratio (median of paired) | min-max | compiled loops |")
            print("|---|---|---|---|---|")
            for n, s in med.items():
                r = ratios.get(n)
                text = f"{r[1]:.3f} vs {r[0]}" if r else "1"
                spread = f"{r[2]:.3f}-{r[3]:.3f}" if r else ""
                print(f"| {n} | {s:.3f} | {text} | {spread} | {traces[n]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
