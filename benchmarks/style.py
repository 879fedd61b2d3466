"""Style transfer on a tiny shapes model trained with the CLIP image embedding: how far the
colour statistics of samples move toward a reference image's.

    python -m benchmarks.style --model runs/style/shared [--num 128] [--style-scales 1,3,6]

Each sample's caption names one colour ("a red circle"); its reference image is a held-out
shapes image of another colour. Distance: between the mean colour of the sample's object
pixels and the reference's (RGB, 0-255 scale; objects as the shapes checker sees them), and the
share of samples whose dominant colour is the reference's. Rows: no style image; the style
image guided with the text (one scale w); the style on its own scale w_style.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def mean_object_colour(image) -> np.ndarray | None:
    from ediffi_jax.data.shapes import pixel_labels

    mask = pixel_labels(image) >= 0
    return image[mask].astype(np.float32).mean(0) if mask.any() else None


def cases(run, num: int):
    """(caption, reference image, reference colour name) with the reference in another colour."""
    from ediffi_jax.config import section, to_dict
    from ediffi_jax.data.shapes import ShapesConfig, ShapesSource, parse_caption

    fields = dict(to_dict(run.data.shapes) or {})
    fields.update(resolution=run.stage.model.resolution, seed=int(fields.get("seed", 0)) + 2000)
    source = ShapesSource(section(ShapesConfig, fields, "data.shapes"))
    out, j = [], 0
    for i in range(num):
        caption = source[i]["caption"]
        colour = parse_caption(caption)["colour"]
        while True:  # the next held-out example of another colour is the reference
            ref = source[10_000 + j]
            j += 1
            if parse_caption(ref["caption"])["colour"] != colour:
                break
        out.append((caption, ref["image"], parse_caption(ref["caption"])["colour"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.style", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/style/shared")
    p.add_argument("--num", type=int, default=128)
    p.add_argument("--style-scales", default="1,3,6")
    args = p.parse_args(argv)
    from ediffi_jax.parallel.host import configure_cpu_host

    configure_cpu_host()
    import dataclasses

    from ediffi_jax.data.shapes import analyse
    from ediffi_jax.pipeline.generate import generate
    from ediffi_jax.runs.store import load_ensemble

    run, ensemble = load_ensemble(args.model)
    todo = cases(run, args.num)
    captions = [c for c, _, _ in todo]
    refs = [r for _, r, _ in todo]
    ref_colours = [mean_object_colour(r) for r in refs]
    variants = [("no style image", None, None), ("style guided with the text", refs, None)]
    variants += [(f"style on its own scale {float(w):g}", refs, float(w))
                 for w in args.style_scales.split(",")]
    print(f"## Style on `{args.model}`, {time.strftime('%Y-%m-%d', time.gmtime())}, n = {args.num}\n")
    print("| variant | mean colour distance to the reference | dominant colour = reference's |")
    print("|---|---|---|")
    for name, styles, w_style in variants:
        sampling = dataclasses.replace(run.stage.sampling, style_guidance_scale=w_style)
        images = np.concatenate([
            generate(run, ensemble, captions[i:i + 64], sampling=sampling, first_index=i,
                     style_images=None if styles is None else styles[i:i + 64])
            for i in range(0, args.num, 64)])
        dist, same = [], []
        for img, ref_c, (_, _, ref_name) in zip(images, ref_colours, todo):
            c = mean_object_colour(img)
            dist.append(np.linalg.norm(c - ref_c) if c is not None else np.nan)
            same.append(analyse(img)["colour"] == ref_name)
        print(f"| {name} | {np.nanmean(dist):.1f} | {np.mean(same):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
