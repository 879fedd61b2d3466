"""Guidance sweep: FID against prompt fidelity (or CLIP score) over classifier-free guidance
scales, the trade-off curve of eDiff-I's Figure 7.

    python -m ediffi_jax.eval.sweep --ensemble ENSEMBLE --scales 0,1,2,3,5 --num N
        (--ref-stats REF.npz | --ref-images DIR|IMAGES.npz|RECORDS | --ref-shapes M [--save-ref REF.npz])
        --out sweep.png [--json sweep.json] [--clip CLIP_DIR] [--captions RECORDS]
        [--samples SAMPLES.npz] [--seed 0] [--batch 64] [--weights default_1.pt]
        [--config.sampling.num_steps=32 ...]

For each scale w the same N prompts are sampled with the same seed (so the scales differ in
guidance only), then measured: FID against the reference statistics (ediffi_jax.eval.fid), prompt
fidelity from the pixels when the prompts are shapes captions (ediffi_jax.eval.fidelity; the
x axis is its `all` rate) and the CLIP score with `--clip` (ediffi_jax.eval.clip_score; then the
x axis). Prompts: the held-out shapes captions sample.evaluate grades on (seed + 1000), or the
captions of the first N records of `--captions`. `--ref-shapes M` makes the reference from the
first M held-out shapes images. w = 0 is the unconditional model, w = 1 the conditional one
without guidance. Writes the plot (FID up, x right, each point labelled with its scale) and a
JSON of the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

from ediffi_jax.atomic import write_atomically
from ediffi_jax.data.records import RecordSource
from ediffi_jax.data.shapes import caption_accuracy, parse_caption
from ediffi_jax.diffusion.sampling import PlanRunner
from ediffi_jax.eval.fid import extract_features, fid, load_images, statistics
from ediffi_jax.eval.fidelity import prompt_fidelity
from ediffi_jax.eval.inception import load_params
from ediffi_jax.models.unet import UNet
from ediffi_jax.pipeline.denoise import unet_denoise_fn
from ediffi_jax.pipeline.generate import generate, sampling_conditioner
from ediffi_jax.runs.data import held_out_shapes

Features = Callable[[np.ndarray], np.ndarray]  # uint8 images [N, H, W, 3] -> float [N, D]


# ----------------------------------------------------------------------------- data

def _rgb(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:
        image = image[..., :3]
    return image.astype(np.uint8)


def records(path: str, num: int | None = None, field: str | None = "image") -> list:
    """`field` of the first `num` (default all) records of an ArrayRecord dataset prefix (the
    whole records with `field=None`)."""
    source = RecordSource(path)
    num = len(source) if num is None else num
    if num > len(source):
        raise ValueError(f"{path} holds {len(source)} records, {num} are asked for")
    if field is not None and field not in source[0]:
        raise ValueError(f"{path}: records have no {field!r} (they have {sorted(source[0])})")
    return [source[i] if field is None else source[i][field] for i in range(num)]


def reference_images(path: str):
    """Images for reference statistics: a folder of images or an .npz (as ediffi_jax.eval.fid
    reads them, lazily for a folder), or an ArrayRecord dataset prefix (its `image` field, made
    RGB uint8 [N, H, W, 3])."""
    if os.path.isdir(path) or path.endswith(".npz"):
        return load_images(path)
    return np.stack([_rgb(im) for im in records(path)])


def inception_features(weights: str | None = None, batch_size: int = 64) -> Features:
    """FID's Inception pool3 features with the installed (or given) weights, loaded now so that
    missing weights fail before any sampling."""
    params = load_params(weights)
    return lambda images: extract_features(images, params, batch_size=batch_size)


def reference_statistics(images, features: Features):
    return statistics(features(images))


# ----------------------------------------------------------------------------- the sweep

def sample_images(run, ensemble, captions: Sequence[str], *, seed: int = 0, sampling=None,
                  batch: int = 64, runner=None, conditioner=None) -> np.ndarray:
    """uint8 [N, H, W, 3]: caption i is example i of run `seed` (ediffi_jax.pipeline.generate.generate).
    One runner and conditioner (made here unless given) serve every batch, and the last batch
    is padded with examples past N, discarded, so one compile serves all."""

    runner = runner or PlanRunner(unet_denoise_fn(UNet(run.stage.model)))
    conditioner = conditioner or sampling_conditioner(run)
    captions, out = list(captions), []
    if not captions or batch < 1:
        raise ValueError(f"sample_images needs captions and a batch >= 1, got {len(captions)} "
                         f"captions and batch {batch}")
    batch = min(batch, len(captions))
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))
        out.append(generate(run, ensemble, padded, seed=seed, sampling=sampling, first_index=i,
                            runner=runner, conditioner=conditioner)[:len(chunk)])
    return np.concatenate(out)


def evaluate_shapes(run, ensemble, num: int = 256, seed: int = 0, sampling=None, batch: int = 64,
                    progress=None):
    """Rates of samples matching their caption (see ediffi_jax.data.shapes.caption_accuracy),
    on the held-out split (ediffi_jax.runs.data.held_out_shapes). One sampler serves every
    batch and the last is padded, so the plan compiles once. `progress(step, num_steps)`
    hears of every sampler step (PlanRunner's)."""
    source = held_out_shapes(run)
    captions = [source[i]["caption"] for i in range(num)]
    runner = PlanRunner(unet_denoise_fn(UNet(run.stage.model)), progress)
    images = sample_images(run, ensemble, captions, seed=seed, sampling=sampling, batch=batch,
                           runner=runner)
    rates = caption_accuracy(images, [parse_caption(c) for c in captions])
    return rates, images, captions


def measure(images, captions: Sequence[str], ref_stats, features: Features, *,
            fidelity: bool = True, clip=None) -> dict:
    """`{"fid", "prompt_fidelity" (rates or None), "clip_score" (or None)}` of one sample set."""
    return {"fid": fid(statistics(features(images)), ref_stats),
            "prompt_fidelity": prompt_fidelity(images, captions) if fidelity else None,
            "clip_score": clip(images, captions) if clip is not None else None}


def run_sweep(run, ensemble, scales: Sequence[float], captions: Sequence[str], ref_stats,
              features: Features, *, seed: int = 0, sampling=None, batch: int = 64,
              fidelity: bool = True, clip=None, log=print):
    """Sample `captions` at each guidance scale and measure each set. Returns (points: one dict
    per scale, in order, with `guidance_scale`, the `measure` fields and `seconds`; images:
    {scale: uint8 [N, H, W, 3]})."""

    sampling = sampling or run.stage.sampling
    # One runner and conditioner for every scale: the scale is data, so its loops compile once.
    runner = PlanRunner(unet_denoise_fn(UNet(run.stage.model)))
    conditioner = sampling_conditioner(run)
    points, images, start = [], {}, time.perf_counter()
    for k, scale in enumerate(scales):
        t = time.perf_counter()
        at_scale = dataclasses.replace(sampling, guidance_scale=float(scale))
        images[scale] = sample_images(run, ensemble, list(captions), seed=seed, sampling=at_scale,
                                      batch=batch, runner=runner, conditioner=conditioner)
        sampled = time.perf_counter() - t
        point = {"guidance_scale": float(scale),
                 **measure(images[scale], captions, ref_stats, features, fidelity=fidelity,
                           clip=clip),
                 "sample_seconds": sampled, "seconds": time.perf_counter() - t}
        points.append(point)
        elapsed = time.perf_counter() - start
        eta = elapsed / (k + 1) * (len(scales) - k - 1)
        extra = "".join(f", {name} {value:.4f}" for name, value in (
            ("fidelity", (point["prompt_fidelity"] or {}).get("all")),
            ("CLIP score", point["clip_score"])) if value is not None)
        log(f"scale {scale:g}: FID {point['fid']:.3f}{extra} ({point['seconds']:.0f} s; "
            f"{k + 1}/{len(scales)}, ETA {eta:.0f} s)")
    return points, images


# ----------------------------------------------------------------------------- outputs

def x_metric(points) -> tuple[str, str]:
    """(key, axis label) of the plot's x axis: the CLIP score when measured, else fidelity."""
    if all(p.get("clip_score") is not None for p in points):
        return "clip_score", "CLIP score (100 x cosine)"
    if all(p.get("prompt_fidelity") is not None for p in points):
        return "prompt_fidelity", "prompt fidelity (shapes checker: every attribute right)"
    raise ValueError("the sweep points carry neither a CLIP score nor prompt fidelity")


def x_value(point, key: str) -> float:
    return point["clip_score"] if key == "clip_score" else point["prompt_fidelity"]["all"]


def plot_sweep(points, path: str, title: str = "") -> None:
    """FID (y) against the x metric, points joined in scale order and labelled w=scale; a PNG
    written atomically. matplotlib is imported here only, with the Agg canvas (no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key, label = x_metric(points)
    xs = [x_value(p, key) for p in points]
    ys = [p["fid"] for p in points]
    fig = Figure(figsize=(5.5, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys, "-o", color="tab:blue", markersize=5)
    for x, y, p in zip(xs, ys, points):
        ax.annotate(f"w={p['guidance_scale']:g}", (x, y), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("FID")
    ax.margins(0.1)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format="png"))


def write_npz(path: str, **arrays) -> None:
    write_atomically(path, lambda f: np.savez(f, **arrays))


def write_json(path: str, data: dict) -> None:
    write_atomically(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


# ----------------------------------------------------------------------------- command line

def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(not np.isfinite(s) or s < 0 for s in scales):
        raise ValueError(f"--scales must be one or more finite numbers >= 0, got {text!r}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"--scales lists a scale twice: {text!r}")
    return scales


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ediffi_jax.eval.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ensemble", required=True, help="ensemble.json, a run or an export")
    p.add_argument("--scales", default="0,1,2,3,5", help="guidance scales, comma-separated")
    p.add_argument("--num", type=int, default=256, help="samples per scale")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref-stats", help="reference statistics .npz (ediffi_jax.eval.fid stats)")
    ref.add_argument("--ref-images", help="reference images: a folder, an .npz or records prefix")
    ref.add_argument("--ref-shapes", type=int, help="reference: this many held-out shapes images")
    p.add_argument("--save-ref", help="also write the reference statistics made here to this .npz")
    p.add_argument("--captions", help="prompts: captions of the first --num records of this "
                                      "dataset prefix (default: held-out shapes captions)")
    p.add_argument("--clip", help="a CLIPModel directory (HF layout): measure the CLIP score")
    p.add_argument("--out", required=True, help="the plot (.png)")
    p.add_argument("--json", help="the numbers (.json)")
    p.add_argument("--samples", help="also keep the samples: an .npz of `images` uint8 "
                                     "[scales, N, H, W, 3], `scales` and `captions`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="prompts per sampling call")
    p.add_argument("--weights", help="FID Inception weights (default: the installed package's)")
    return p


def main(argv=None, *, features: Features | None = None) -> int:
    """The CLI; `features` replaces the Inception features (tests inject a cheap one)."""
    from ediffi_jax.config import ConfigError, split_overrides

    overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(rest)
    from ediffi_jax.parallel.host import configure_cpu_host

    configure_cpu_host()
    try:
        from ediffi_jax.rng import check_seed

        check_seed(args.seed, "--seed")
        scales = parse_scales(args.scales)
        if args.num < 2:
            raise ValueError(f"--num must be at least 2 (FID needs a covariance), got {args.num}")
        if args.ref_shapes is not None and args.ref_shapes < 2:
            raise ValueError(f"--ref-shapes must be at least 2, got {args.ref_shapes}")
        if args.save_ref and args.ref_stats:
            raise ValueError("--save-ref writes statistics made from --ref-images/--ref-shapes; "
                             "--ref-stats already is a statistics file")
        for name in ("out", "json", "save_ref", "samples"):
            target = getattr(args, name)
            if target and not os.path.isdir(os.path.dirname(os.path.abspath(target))):
                raise ValueError(f"--{name.replace('_', '-')} {target}: its folder does not exist")
        from ediffi_jax.eval import fid
        from ediffi_jax.pipeline.generate import sampling_with_overrides
        from ediffi_jax.runs.store import load_ensemble

        run, ensemble = load_ensemble(args.ensemble)
        sampling = sampling_with_overrides(run, [o.replace("--config.", "", 1) for o in overrides])
        if args.captions:
            captions = records(args.captions, args.num, "caption")
            if not all(isinstance(c, str) for c in captions):
                raise ValueError(f"{args.captions}: the records' `caption` must be a string")
            prompts = f"captions of the first {args.num} records of {args.captions}"
        else:
            if run.data.name != "shapes":
                raise ValueError(f"{args.ensemble} was trained on {run.data.name!r}, not shapes: "
                                 "give its captions with --captions RECORDS")
            source = held_out_shapes(run)
            captions = [source[i]["caption"] for i in range(args.num)]
            prompts = f"held-out shapes captions 0..{args.num - 1} (seed {source.config.seed})"
        fidelity = _all_shapes_captions(captions)
        if not fidelity and not args.clip:
            raise ValueError("the captions are not shapes captions, so prompt fidelity cannot be "
                             "read from the pixels: give --clip CLIP_DIR for the CLIP score")
        clip = None
        if args.clip:
            from ediffi_jax.eval.clip_score import CLIPScorer

            clip = CLIPScorer(args.clip, batch_size=args.batch)
        if features is None:
            features = inception_features(args.weights, args.batch)
        if args.ref_stats:
            ref_stats, ref_source = fid.load_statistics(args.ref_stats), args.ref_stats
        else:
            if args.ref_shapes is not None:
                source = held_out_shapes(run)
                if args.ref_shapes > len(source):
                    raise ValueError(f"--ref-shapes {args.ref_shapes} exceeds the {len(source)} "
                                     "held-out shapes examples")
                ref = np.stack([source[i]["image"] for i in range(args.ref_shapes)])
                ref_source = (f"held-out shapes images 0..{args.ref_shapes - 1} "
                              f"(seed {source.config.seed})")
            else:
                ref, ref_source = reference_images(args.ref_images), args.ref_images
            ref_stats = reference_statistics(ref, features)
            if args.save_ref:
                fid.save_statistics(args.save_ref, ref_stats)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sweep over guidance scales {scales}: {args.num} samples each, "
          f"{sampling.sampler} {sampling.num_steps} steps", flush=True)
    points, images = run_sweep(run, ensemble, scales, captions, ref_stats, features, seed=args.seed,
                          sampling=sampling, batch=args.batch, fidelity=fidelity, clip=clip,
                          log=lambda m: print(m, flush=True))
    key, _ = x_metric(points)
    name = os.path.basename(os.path.normpath(args.ensemble))
    plot_sweep(points, args.out, f"{name}: {args.num} samples per scale, "
                                 f"{sampling.sampler} {sampling.num_steps} steps")
    if args.json:
        write_json(args.json, {
            "ensemble": args.ensemble, "num": args.num, "seed": args.seed, "prompts": prompts,
            "reference": {"source": ref_source, "count": int(ref_stats.count)},
            "sampling": {"sampler": sampling.sampler, "num_steps": sampling.num_steps},
            "x_metric": key, "clip": args.clip, "points": points})
    if args.samples:
        write_npz(args.samples, images=np.stack([images[s] for s in scales]),
                  scales=np.asarray(scales), captions=np.asarray(captions))
    print("wrote " + ", ".join(p for p in (args.out, args.json, args.samples) if p))
    return 0


def _all_shapes_captions(captions) -> bool:

    try:
        for c in captions:
            parse_caption(c)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
