"""Paint-with-words on the tiny shapes model trained with up to two objects: placement and cost.

    python -m benchmarks.paint [--model pretrained/tiny-shapes-two] [--num 256]
        [--scales 0,2,4,8] [--weight std] [--timing-rounds 6] [--out DIR]

Each sample asks for two objects ("two red circles") and paints the phrase ("red circles") with
a mask of two cells of the 3 x 3 grid (pairs cycled over top-left/bottom-right, top-right/
bottom-left, left/right, top/bottom). "placed": the checker finds objects of the asked colour
and every one has its centroid inside a painted cell; "one in each cell": exactly two, one per
painted cell. Scale 0 is the same run without masks (the chance rate). The cost is the time of
a sampling call with and without masks (same batch, after compiling, ABBA rounds).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

PAIRS = (("top left", "bottom right"), ("top right", "bottom left"), ("left", "right"),
         ("top", "bottom"))


def cell_mask(regions, resolution: int) -> np.ndarray:
    from ediffi_jax.data.shapes import region_box

    mask = np.zeros((resolution, resolution), np.float32)
    for r in regions:
        x0, y0, x1, y1 = region_box(r, resolution)
        mask[int(round(y0)):int(round(y1)), int(round(x0)):int(round(x1))] = 1.0
    return mask


def cases(num: int, seed: int = 0):
    from ediffi_jax.data.shapes import COLOUR_NAMES, SHAPES

    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        colour, shape = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))], SHAPES[rng.integers(len(SHAPES))]
        out.append((f"two {colour} {shape}s", f"{colour} {shape}s", colour, PAIRS[i % len(PAIRS)]))
    return out


def run(model: str, num: int, scales, weight: str, out: str | None, batch: int = 64):
    from ediffi_jax.eval.fidelity import paint_position_accuracy
    from ediffi_jax.paint.bias import PaintSettings
    from ediffi_jax.paint.masks import PhraseMask
    from sample.generate import Paint, generate, grid, load_ensemble

    run_spec, ensemble = load_ensemble(model)
    res = run_spec.stage.model.resolution
    todo = cases(num)
    rows = []
    for scale in scales:
        images = []
        t = time.perf_counter()
        for i in range(0, num, batch):
            chunk = todo[i:i + batch]
            paint = None
            if scale > 0:  # one mask set per prompt: its phrase over its two cells
                paint = Paint(tuple((PhraseMask(phrase, cell_mask(pair, res)),)
                                    for _, phrase, _, pair in chunk), scale, PaintSettings(weight))
            images += list(generate(run_spec, ensemble, [c[0] for c in chunk], paint=paint,
                                    first_index=i))
        acc = paint_position_accuracy(images, [c[2] for c in todo], [c[3] for c in todo])
        rows.append(dict(scale=scale, placed=acc["placed"], placed_two=acc["one_per_region"],
                         seconds=time.perf_counter() - t))
        print(f"  scale {scale:g}: placed {rows[-1]['placed']:.3f}, one in each cell "
              f"{rows[-1]['placed_two']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
        if out:
            import os

            from PIL import Image

            os.makedirs(out, exist_ok=True)
            Image.fromarray(grid(np.stack(images[:64]), 16)).save(
                os.path.join(out, f"paint_scale{scale:g}.png"))
    return rows


def timing(model: str, scale: float, weight: str, rounds: int, batch: int = 8):
    """Median seconds per sampling call with and without masks; paired ratio."""
    import jax

    from ediffi_jax.diffusion.sampling import PlanRunner
    from ediffi_jax.models.experts import unet_denoise_fn
    from ediffi_jax.models.unet import UNet
    from ediffi_jax.paint.bias import PaintSettings
    from ediffi_jax.paint.masks import PhraseMask
    from sample.generate import Paint, generate, load_ensemble

    run_spec, ensemble = load_ensemble(model)
    res = run_spec.stage.model.resolution
    chunk = cases(batch)
    paint = Paint(tuple((PhraseMask(phrase, cell_mask(pair, res)),) for _, phrase, _, pair in chunk),
                  scale, PaintSettings(weight))
    runners = {k: PlanRunner(unet_denoise_fn(UNet(run_spec.stage.model))) for k in ("plain", "paint")}

    def call(kind):
        t = time.perf_counter()
        jax.block_until_ready(generate(run_spec, ensemble, [c[0] for c in chunk],
                                       paint=paint if kind == "paint" else None,
                                       runner=runners[kind]))
        return time.perf_counter() - t

    call("plain"), call("paint")
    times = {"plain": [], "paint": []}
    for r in range(rounds):
        for kind in (("plain", "paint") if r % 2 == 0 else ("paint", "plain")):
            times[kind].append(call(kind))
    ratios = np.array(times["paint"]) / np.array(times["plain"])
    steps = run_spec.stage.sampling.num_steps
    return (float(np.median(times["plain"])) / steps, float(np.median(times["paint"])) / steps,
            float(np.median(ratios)), float(ratios.min()), float(ratios.max()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pretrained/tiny-shapes-two")
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--scales", default="0,2,4,8")
    p.add_argument("--weight", default="std")
    p.add_argument("--out", default="")
    p.add_argument("--timing-rounds", type=int, default=6)
    p.add_argument("--timing-scale", type=float, default=4.0)
    args = p.parse_args(argv)
    from ediffi_jax.parallel.host import configure_cpu_host

    configure_cpu_host()
    rows = run(args.model, args.num, [float(s) for s in args.scales.split(",")], args.weight,
               args.out)
    print("\n| paint scale w' | placed | one in each cell |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['scale']:g}{' (no masks)' if r['scale'] == 0 else ''} | {r['placed']:.3f} | "
              f"{r['placed_two']:.3f} |")
    if args.timing_rounds:
        plain, painted, ratio, lo, hi = timing(args.model, args.timing_scale, args.weight,
                                               args.timing_rounds)
        print(f"\nPer sampling step (batch 8 with CFG, after compiling, {args.timing_rounds} ABBA "
              f"rounds): no masks {1e3 * plain:.1f} ms, with masks {1e3 * painted:.1f} ms; ratio "
              f"{ratio:.3f} (median of paired rounds; {lo:.3f}-{hi:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
