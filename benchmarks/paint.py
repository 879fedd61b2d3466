"""Paint-with-words on a model of mixed two-object scenes: does each object go where painted?

    python -m train --config configs/paint_shapes.py --workdir runs/paint/shared
    python -m benchmarks.paint --model runs/paint/shared [--num 256] [--scales 0,2,4,8]
        [--layout halves|columns|cells] [--weight std] [--timing-rounds 6] [--out DIR]
        [--config.sampling.sampler=heun --config.sampling.s_churn=40 ...]

Sample i asks for two objects of different colours ("a red circle and a blue square") and
paints each phrase ("red circle", "blue square") over its own region, the regions cycling
through four arrangements: `halves` (the default) paints the left and right halves of the
canvas, then the top and bottom halves (each both ways round); `columns` the left and right
columns of the 3 x 3 grid, then its top and bottom rows, leaving the middle unpainted; `cells`
single opposite cells (top left / bottom right, top right / bottom left, left / right, top /
bottom). "placed": both objects drawn and each one's centroid inside its own region (every
object of that colour, if there are more); "objects placed": the same per object; "only the
two": placed and nothing else drawn. Scale 0 is the same prompts and seeds without masks: where
the model puts the objects by itself. The cost is the time of a sampling call with and without
masks (same batch, after compiling, ABBA rounds). `--config.sampling.key=value` overrides the
run's sampling settings, as in `python -m sample`.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

_LEFT, _RIGHT = ("top left", "left", "bottom left"), ("top right", "right", "bottom right")
_TOP, _BOTTOM = ("top left", "top", "top right"), ("bottom left", "bottom", "bottom right")
LAYOUTS = {
    "halves": (("left half", "right half"), ("right half", "left half"),
               ("top half", "bottom half"), ("bottom half", "top half")),
    "columns": ((_LEFT, _RIGHT), (_RIGHT, _LEFT), (_TOP, _BOTTOM), (_BOTTOM, _TOP)),
    "cells": ((("top left",), ("bottom right",)), (("top right",), ("bottom left",)),
              (("left",), ("right",)), (("top",), ("bottom",))),
}


def region_mask(region, resolution: int) -> np.ndarray:
    """1 over a region, 0 elsewhere: a half of the canvas by name ("left half", ...) or a
    tuple of cells of the 3 x 3 grid."""
    from ediffi_jax.data.shapes import cells_mask

    if not isinstance(region, str):
        return cells_mask(region, resolution)
    half = resolution // 2
    halves = {"left half": np.s_[:, :half], "right half": np.s_[:, half:],
              "top half": np.s_[:half], "bottom half": np.s_[half:]}
    mask = np.zeros((resolution, resolution), np.float32)
    mask[halves[region]] = 1.0
    return mask


def cases(num: int, layout: str = "halves", seed: int = 0):
    """(prompt, [(phrase, colour, region), (phrase, colour, region)]) per sample: two different
    colours, shapes drawn freely, the regions of the layout in turn."""
    from ediffi_jax.data.shapes import COLOUR_NAMES, SHAPES

    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        colours = [COLOUR_NAMES[k] for k in rng.choice(len(COLOUR_NAMES), 2, replace=False)]
        shapes = [SHAPES[k] for k in rng.integers(len(SHAPES), size=2)]
        phrases = [f"{c} {s}" for c, s in zip(colours, shapes)]
        regions = LAYOUTS[layout][i % len(LAYOUTS[layout])]
        out.append((f"a {phrases[0]} and a {phrases[1]}", list(zip(phrases, colours, regions))))
    return out


def paint_for(chunk, scale: float, weight: str, res: int):
    """The Paint of a batch of cases: per prompt, one mask per phrase over its region."""
    from ediffi_jax.paint.bias import PaintSettings
    from ediffi_jax.paint.masks import PhraseMask
    from ediffi_jax.pipeline.generate import Paint

    masks = tuple(tuple(PhraseMask(phrase, region_mask(region, res))
                        for phrase, _, region in objects) for _, objects in chunk)
    return Paint(masks, scale, PaintSettings(weight))


def run(model: str, num: int, scales, weight: str, layout: str, out: str | None,
        overrides=(), batch: int = 64):
    from ediffi_jax.data.shapes import count_objects
    from ediffi_jax.eval.fidelity import paint_position_accuracy
    from ediffi_jax.pipeline.generate import generate, grid, sampling_with_overrides
    from ediffi_jax.runs.store import load_ensemble

    run_spec, ensemble = load_ensemble(model)
    settings = sampling_with_overrides(run_spec, overrides)
    print(f"{model}: {settings}", flush=True)
    res = run_spec.stage.model.resolution
    todo = cases(num, layout)
    targets = [[(colour, region_mask(region, res)) for _, colour, region in objects]
               for _, objects in todo]
    rows = []
    for scale in scales:
        images = []
        t = time.perf_counter()
        for i in range(0, num, batch):
            chunk = todo[i:i + batch]
            paint = paint_for(chunk, scale, weight, res) if scale > 0 else None
            images += list(generate(run_spec, ensemble, [prompt for prompt, _ in chunk],
                                    paint=paint, first_index=i, sampling=settings))
        acc = paint_position_accuracy(images, targets)
        clean = np.mean([count_objects(im) == 2 and paint_position_accuracy([im], [t])["placed"]
                         for im, t in zip(images, targets)])
        rows.append(dict(scale=scale, placed=acc["placed"], objects=acc["objects_placed"],
                         clean=float(clean), seconds=time.perf_counter() - t))
        print(f"  scale {scale:g}: placed {acc['placed']:.3f}, objects placed "
              f"{acc['objects_placed']:.3f}, only the two {clean:.3f} "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
        if out:
            import os

            from PIL import Image

            os.makedirs(out, exist_ok=True)
            Image.fromarray(grid(np.stack(images[:64]), 16)).save(
                os.path.join(out, f"paint_{layout}_scale{scale:g}.png"))
    return rows


def timing(model: str, scale: float, weight: str, rounds: int, overrides=(),
           batch: int = 8):
    """Median seconds per sampling call with and without masks; paired ratio."""
    import jax

    from ediffi_jax.diffusion.sampling import PlanRunner
    from ediffi_jax.models.unet import UNet
    from ediffi_jax.pipeline.denoise import unet_denoise_fn
    from ediffi_jax.pipeline.generate import generate, sampling_with_overrides
    from ediffi_jax.runs.store import load_ensemble

    run_spec, ensemble = load_ensemble(model)
    settings = sampling_with_overrides(run_spec, overrides)
    chunk = cases(batch)
    paint = paint_for(chunk, scale, weight, run_spec.stage.model.resolution)
    runners = {k: PlanRunner(unet_denoise_fn(UNet(run_spec.stage.model))) for k in ("plain", "paint")}

    def call(kind):
        t = time.perf_counter()
        jax.block_until_ready(generate(run_spec, ensemble, [c[0] for c in chunk],
                                       paint=paint if kind == "paint" else None,
                                       runner=runners[kind], sampling=settings))
        return time.perf_counter() - t

    call("plain"), call("paint")
    times = {"plain": [], "paint": []}
    for r in range(rounds):
        for kind in (("plain", "paint") if r % 2 == 0 else ("paint", "plain")):
            times[kind].append(call(kind))
    ratios = np.array(times["paint"]) / np.array(times["plain"])
    steps = settings.num_steps
    return (float(np.median(times["plain"])) / steps, float(np.median(times["paint"])) / steps,
            float(np.median(ratios)), float(ratios.min()), float(ratios.max()))


def main(argv=None) -> int:
    import sys

    from ediffi_jax.config import split_overrides

    overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    overrides = [o.replace("--config.", "", 1) for o in overrides]
    p = argparse.ArgumentParser(prog="python -m benchmarks.paint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/paint/shared")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--scales", default="0,2,4,8")
    p.add_argument("--layout", default="halves", choices=sorted(LAYOUTS))
    p.add_argument("--weight", default="std")
    p.add_argument("--out", default="")
    p.add_argument("--timing-rounds", type=int, default=6)
    p.add_argument("--timing-scale", type=float, default=4.0)
    args = p.parse_args(rest)
    from ediffi_jax.parallel.host import configure_cpu_host

    configure_cpu_host()
    rows = run(args.model, args.num, [float(s) for s in args.scales.split(",")], args.weight,
               args.layout, args.out, overrides)
    print(f"\n| paint scale w' ({args.layout}, n = {args.num}) | placed | objects placed | "
          f"only the two |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['scale']:g}{' (no masks)' if r['scale'] == 0 else ''} | {r['placed']:.3f} | "
              f"{r['objects']:.3f} | {r['clean']:.3f} |")
    if args.timing_rounds:
        plain, painted, ratio, lo, hi = timing(args.model, args.timing_scale, args.weight,
                                               args.timing_rounds, overrides)
        print(f"\nPer sampling step (batch 8 with CFG, after compiling, {args.timing_rounds} ABBA "
              f"rounds): no masks {1e3 * plain:.1f} ms, with masks {1e3 * painted:.1f} ms; ratio "
              f"{ratio:.3f} (median of paired rounds; {lo:.3f}-{hi:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
