"""ScaleCrafter's FID / KID protocol on a diffusers checkpoint: direct vs ScaleCrafter sampling
at a size above the U-Net's own.

    python -m benchmarks.highres_fid --pretrained DIR --prompts PROMPTS.txt --reference IMAGES
        --size HxW [--num N] [--methods direct,scalecrafter,attn-sf] [--steps 50] [--sampler euler]
        [--guidance-scale 7.5] [--batch 8] [--seed 0] [--weights default_1.pt]
        [--out runs/highres_fid] [--crops 1] [--mesh=-1,1,1] [--dtype float32]
        [--scalecrafter-preset sd2 | --scalecrafter-config FILE.yaml | --dilate-settings ...]

Methods: direct sampling at --size, ScaleCrafter, and the paper's Attn-SF baseline (every
self-attention's logits rescaled to keep its entropy at the larger token count; Jin et al.
2023). Image i of every method comes from prompt i (PROMPTS.txt: one a line) and example i of the
seed, so the methods differ in their sampling alone. The base set is image i sampled directly
at the U-Net's own size. Metrics (ScaleCrafter, ICLR 2024, with clean-fid's FID and KID):

- FID_r / KID_r: each method's images against the first N reference images (REFERENCE sorted
  by path: real images, LAION in the paper); the base set's are printed as a yardstick.
- FID_b / KID_b: each method's images downsampled to the base size against the base set: how
  much of the model's own ability survives at the larger size.
- FID_c / KID_c (not the paper's; DemoFusion's and later papers' crop metric): --crops random
  crops of the base size per image, at the same places for every method, against crops of the
  reference images resized to --size: local detail, which the two metrics above average away.

Every image reaches the Inception input (299x299) by clean-fid's resize (PIL bicubic per
channel in float, antialiased), rounded to uint8 for ediffi_jax.eval.fid's feature extractor;
the downsampling for FID_b and the reference resize for FID_c are that resize too. KID is
ediffi_jax.eval.kid's (100 subsets of min(N, 1000)).

--highres scalecrafter's flags of `python -m sample --pretrained` choose ScaleCrafter's settings
(default: the built-in official run for --size of the U-Net's family). --steps / --sampler
count this project's samplers' steps; the paper ran 50 DDIM steps with eta 1 and w 7.5.

OUT holds a folder of PNGs per set (base, direct, scalecrafter) with the settings that made
them, cached features and results.json. A rerun samples only the images missing, and refuses
an OUT made with other settings; input errors stop it before any sampling.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

METHODS = ("direct", "scalecrafter", "attn-sf")
BASE = "base"
Features = Callable[[np.ndarray], np.ndarray]  # uint8 [N, 299, 299, 3] -> float [N, D]


# ----------------------------------------------------------------------------- images

def clean_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size..., 3] as clean-fid's "clean" mode resizes: each channel
    as a float PIL image, bicubic (antialiased when shrinking), clipped, then rounded."""
    from PIL import Image

    if image.shape[:2] == tuple(size):
        return image
    channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize(
        (size[1], size[0]), Image.Resampling.BICUBIC)) for c in range(3)]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def load_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def save_png(path: str, image: np.ndarray) -> None:
    """Atomically: a half-written PNG would pass for a finished image on a rerun."""
    from PIL import Image

    from ediffi_jax.atomic import write_atomically

    write_atomically(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def crop_corners(index: int, size: tuple[int, int], crop: tuple[int, int], count: int,
                 seed: int) -> np.ndarray:
    """`count` (top, left) corners of image `index`'s crops: the same for every set."""
    rng = np.random.default_rng((seed, index))
    return np.stack([rng.integers(0, size[0] - crop[0] + 1, count),
                     rng.integers(0, size[1] - crop[1] + 1, count)], axis=1)


@dataclasses.dataclass(frozen=True)
class Views:
    """What each image of a set becomes at the Inception input: `full` always; `down` (via the
    `base` size, FID_b) for generated sets; `crops` base-size crops of the image at `size`
    (FID_c)."""

    size: tuple[int, int]
    base: tuple[int, int]
    crops: int = 0
    seed: int = 0
    down: bool = False

    def __call__(self, image: np.ndarray, index: int) -> dict[str, list[np.ndarray]]:
        from ediffi_jax.eval.fid import INCEPTION_SIZE

        inception = (INCEPTION_SIZE, INCEPTION_SIZE)
        out = {"full": [clean_resize(image, inception)]}
        if self.down:
            out["down"] = [clean_resize(clean_resize(image, self.base), inception)]
        if self.crops:
            image = clean_resize(image, self.size)
            out["crops"] = [clean_resize(image[t:t + self.base[0], s:s + self.base[1]], inception)
                            for t, s in crop_corners(index, self.size, self.base, self.crops,
                                                     self.seed)]
        return out


def set_features(files, views: Views, features: Features, chunk: int) -> dict[str, np.ndarray]:
    """Each view's features of `files`, streamed `chunk` images at a time (threads load and
    resize), so that tens of thousands of large images never sit in memory at once."""
    parts: dict[str, list] = {}
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for start in range(0, len(files), chunk):
            indices = range(start, min(start + chunk, len(files)))
            made = list(pool.map(lambda k: views(load_rgb(files[k]), k), indices))
            for name in made[0]:
                parts.setdefault(name, []).append(
                    np.asarray(features(np.stack([v for m in made for v in m[name]]))))
    return {name: np.concatenate(p) for name, p in parts.items()}


def cached_features(path: str, files, views: Views, features: Features, feature_name: str,
                    chunk: int, log) -> dict[str, np.ndarray]:
    """set_features, kept in `path` under a key of the files (name, bytes, mtime), the views
    and the feature extractor; recomputed when any of them changed."""
    from ediffi_jax.atomic import write_atomically

    stats = [(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = json.dumps({"files": stats, "views": dataclasses.asdict(views), "features": feature_name})
    if os.path.isfile(path):
        with np.load(path) as data:
            if str(data["key"]) == key:
                log(f"{os.path.basename(path)}: cached")
                return {name: data[name] for name in data.files if name != "key"}
    log(f"{os.path.basename(path)}: features of {len(files)} images")
    out = set_features(files, views, features, chunk)
    write_atomically(path, lambda f: np.savez(f, key=np.asarray(key), **out))
    return out


# ----------------------------------------------------------------------------- metrics

def metrics(feats: dict, methods, seed: int) -> dict[str, dict[str, float]]:
    """Per set, FID / KID (_r, _b, _c as the docstring says; the base set: _r only). Each
    feature set's statistics are computed once (2048 x 2048 covariances of up to 30k rows)."""
    from ediffi_jax.eval.fid import fid, statistics
    from ediffi_jax.eval.kid import kernel_inception_distance

    stats = {}

    def distances(a, b):  # (set, view) pairs
        for key in (a, b):
            if key not in stats:
                stats[key] = statistics(feats[key[0]][key[1]])
        kid = kernel_inception_distance(feats[a[0]][a[1]], feats[b[0]][b[1]], seed=seed)
        return {"fid": fid(stats[a], stats[b]), "kid": kid.mean, "kid_std": kid.std}

    reference = ("reference", "full")
    out = {BASE: {f"{k}_r": v for k, v in distances((BASE, "full"), reference).items()}}
    for method in methods:
        pairs = {"r": ((method, "full"), reference), "b": ((method, "down"), (BASE, "full"))}
        if "crops" in feats[method]:
            pairs["c"] = ((method, "crops"), ("reference", "crops"))
        out[method] = {f"{k}_{suffix}": v for suffix, (a, b) in pairs.items()
                       for k, v in distances(a, b).items()}
    return out


def table(results: dict, sizes: dict) -> str:
    """The metrics as a markdown table, a row per set ("—" where a set has no such metric)."""
    columns = [f"{m}_{s}" for s in "rbc" for m in ("fid", "kid")]
    lines = ["| set | size | " + " | ".join(c.replace(c[:3], c[:3].upper()) for c in columns)
             + " |", "|---|---|" + "---:|" * len(columns)]
    for name, row in results.items():
        cells = ["—" if c not in row else f"{row[c]:.2f}" if c.startswith("fid")
                 else f"{row[c]:.4f}" for c in columns]
        lines.append(f"| {name} | {sizes[name][0]}x{sizes[name][1]} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sampling

def read_prompts(path: str, num: int | None) -> list[str]:
    from ediffi_jax.config import ConfigError

    if not os.path.isfile(path):
        raise ConfigError(f"--prompts {path}: no such file (one prompt a line)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    num = len(prompts) if num is None else num
    if num < 2:
        raise ConfigError(f"--num must be at least 2 (FID needs a covariance), got {num}")
    if len(prompts) < num:
        raise ConfigError(f"--prompts {path} holds {len(prompts)} prompts, --num {num} asks for "
                          f"{num} images (one prompt each)")
    return prompts[:num]


def check_settings(directory: str, settings: dict) -> dict:
    """The settings a set's folder will hold: `settings` where the folder is new or was made
    with the same ones (prompts agreeing where both have them); otherwise an error, so that a
    rerun never mixes images of two configurations."""
    from ediffi_jax.config import ConfigError

    path = os.path.join(directory, "settings.json")
    if not os.path.isfile(path):
        return settings
    with open(path) as f:
        old = json.load(f)
    changed = sorted(k for k in set(old) | set(settings)
                     if k != "prompts" and old.get(k) != settings.get(k))
    overlap = min(len(old["prompts"]), len(settings["prompts"]))
    if old["prompts"][:overlap] != settings["prompts"][:overlap]:
        changed.append("prompts")
    if changed:
        raise ConfigError(f"{directory} holds images made with other settings ({', '.join(changed)}"
                          "): give another --out, or remove that folder")
    return dict(settings, prompts=max(old["prompts"], settings["prompts"], key=len))


@dataclasses.dataclass
class Job:
    """What prepare() checked and loaded: per set (base and each method) its folder, size,
    plan and settings."""

    methods: list[str]
    prompts: list[str]
    negative: str | None
    reference: list[str]  # the first N reference files
    dirs: dict[str, str]
    sizes: dict[str, tuple[int, int]]
    plans: dict
    settings: dict[str, dict]
    cascade: object  # PretrainedCascade of the one pipeline: pads batches to the mesh
    encoder: object
    batch: int
    seed: int
    features: Features
    feature_name: str

    def files(self, name: str) -> list[str]:
        return [os.path.join(self.dirs[name], f"{i:05d}.png") for i in range(len(self.prompts))]


def generate_set(job: Job, name: str, log) -> None:
    """Samples the images of set `name` that its folder lacks, batch by batch (a batch whose
    images all exist is skipped: the same seeds give the same images)."""
    from ediffi_jax.pipeline.generate import StepProgress, to_uint8
    from sample.pretrained import encode

    size, plan, batch, files = job.sizes[name], job.plans[name], job.batch, job.files(name)
    starts = [s for s in range(0, len(files), batch)
              if not all(os.path.isfile(f) for f in files[s:s + batch])]
    there = len(files) - sum(len(files[s:s + batch]) for s in starts)
    log(f"{name} ({size[0]}x{size[1]}): {there} of {len(files)} images there"
        + (f", sampling {len(starts)} batch(es) of {batch}" if starts else ""))
    if not starts:
        return
    pipe = job.cascade.pipes[0]
    pipe.runner.progress = progress = StepProgress(plan.num_steps * len(starts), name)
    negative = None if job.negative is None else [job.negative] * batch
    try:
        for start in starts:
            chunk = job.prompts[start:start + batch]
            padded = chunk + [chunk[-1]] * (batch - len(chunk))  # one shape: one compile
            cond = encode(job.encoder, padded, negative, None, 0, batch, size)
            images, = job.cascade.each_stage([plan], cond, sizes=[size], seed=job.seed,
                                             first_index=start)
            for i, image in enumerate(to_uint8(images)[:len(chunk)], start):
                save_png(files[i], image)
    finally:
        progress.close()
        pipe.runner.progress = None


# ----------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    from sample.pretrained import add_arguments

    p = argparse.ArgumentParser(prog="python -m benchmarks.highres_fid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="a diffusers pipeline folder")
    p.add_argument("--prompts", required=True, help="a text file, one prompt a line")
    p.add_argument("--reference", required=True, help="a folder of real images (any sizes)")
    p.add_argument("--num", type=int, help="images per set (default: every prompt)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: "
                   + ", ".join(METHODS))
    p.add_argument("--batch", type=int, default=8, help="images per sampling call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor device mesh (write "
                   "--mesh=-1,1,1)")
    p.add_argument("--weights", help="FID Inception weights (default: the installed package's)")
    p.add_argument("--feature-batch", type=int, default=64, help="images per Inception call")
    p.add_argument("--crops", type=int, default=1, help="base-size crops per image for FID_c "
                   "/ KID_c (0: none)")
    p.add_argument("--out", default="runs/highres_fid")
    add_arguments(p)  # sample --pretrained's sampling and --highres scalecrafter flags
    p.set_defaults(steps=50)
    return p


def prepare(args, features: Features | None, log) -> Job:
    """Every input checked, the model loaded and each set's plan made: all that can fail
    before sampling."""
    from ediffi_jax.config import ConfigError, parse_mesh, parse_size
    from ediffi_jax.encoders.prompt import PromptEncoder
    from ediffi_jax.eval.fid import ImageFolder, extract_features
    from ediffi_jax.eval.inception import default_weights_path, load_params
    from ediffi_jax.models.diffusers_unet import conv3x3_levels
    from ediffi_jax.parallel.mesh import make_mesh
    from ediffi_jax.pipeline.pretrained import PretrainedCascade, load_pretrained
    from ediffi_jax.rng import check_seed
    from sample.pretrained import (HIGHRES_FLAGS, PRESET, highres_preset, native_size,
                                   read_highres, vae_factor)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS) or len(set(methods)) != len(methods):
        raise ConfigError(f"--methods {args.methods!r}: give some of {', '.join(METHODS)}, "
                          "each once")
    given = [f"--{k.replace('_', '-')}" for k in HIGHRES_FLAGS if getattr(args, k) is not None
             and (k != "highres_skip_missing" or args.highres_skip_missing)]
    if getattr(args, "attention_entropy", False):
        raise ConfigError("--attention-entropy: give --methods attn-sf here")
    if given and "scalecrafter" not in methods:
        raise ConfigError(f"{', '.join(given)}: only with --methods including scalecrafter")
    check_seed(args.seed, "--seed")
    if args.steps < 1 or args.batch < 1 or args.crops < 0 or args.feature_batch < 1:
        raise ConfigError("--steps, --batch and --feature-batch must be >= 1 and --crops >= 0")
    if not args.size:
        raise ConfigError("--size HxW is required: the size each method samples at")
    size = parse_size(args.size)
    if min(size) < 1:
        raise ConfigError(f"--size {args.size}: must be positive")
    if args.negative_prompt and len(args.negative_prompt) > 1:
        raise ConfigError("--negative-prompt: give one, for every prompt")
    negative = args.negative_prompt[0] if args.negative_prompt else None
    # read_highres reads sample's flags: ScaleCrafter's settings files checked before loading
    args.highres, args.resolution = ("scalecrafter" if "scalecrafter" in methods else None), None
    highres = read_highres(args)
    prompts = read_prompts(args.prompts, args.num)
    reference = ImageFolder(args.reference).files
    if len(reference) < len(prompts):
        raise ConfigError(f"--reference {args.reference} holds {len(reference)} images, fewer "
                          f"than the {len(prompts)} images per set (--num)")
    mesh = make_mesh(parse_mesh(args.mesh))
    if features is None:
        params = load_params(args.weights)
        feature_name = f"inception:{os.path.abspath(args.weights or default_weights_path())}"

        def features(images):
            return extract_features(images, params, batch_size=args.feature_batch, mesh=mesh,
                                    progress=False)
    else:
        feature_name = f"{features.__module__}.{features.__qualname__}"
    pipe = load_pretrained(args.pretrained, dtype=args.dtype, variant=args.variant, mesh=mesh)
    native, vae = native_size(pipe), vae_factor(pipe)
    factor = vae * pipe.unet.config.downsample_factor
    if size[0] % factor or size[1] % factor:
        raise ConfigError(f"--size {size[0]}x{size[1]} is not a multiple of {factor} (the VAE's "
                          f"factor {vae} x the U-Net's {pipe.unet.config.downsample_factor})")
    if args.crops and (size[0] < native[0] or size[1] < native[1]):
        raise ConfigError(f"--crops takes {native[0]}x{native[1]} crops (the base size) of the "
                          f"{size[0]}x{size[1]} images: give --size at least that, or --crops 0")

    def plan(highres_plan=None):
        return pipe.plan(args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                         schedule=args.schedule, highres=highres_plan)

    plans, sizes = {BASE: plan()}, {BASE: native}
    for method in methods:
        sizes[method] = size
        if method == "direct":
            plans[method] = plan()
            continue
        if method == "attn-sf":  # the paper's other baseline: self-attention entropy kept
            plans[method] = pipe.plan(
                args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                schedule=args.schedule,
                attention_area_ratio=size[0] * size[1] / (native[0] * native[1]))
            continue
        if highres is PRESET:
            preset, line = highres_preset(args, pipe.unet.config, native, size, vae)
            highres = read_highres(args, preset)
            log(line)
        plans[method] = plan(highres.plan(conv3x3_levels(pipe.unet.config), pipe.schedule,
                                          pipe.scheduler_config,
                                          skip_missing=args.highres_skip_missing))
    common = {"pretrained": os.path.abspath(args.pretrained), "steps": args.steps,
              "sampler": args.sampler, "guidance_scale": args.guidance_scale,
              "schedule": args.schedule, "seed": args.seed, "dtype": args.dtype,
              "variant": args.variant, "clip_skip": args.clip_skip, "negative_prompt": negative}
    dirs = {name: os.path.join(args.out, name) for name in plans}
    settings = {name: check_settings(dirs[name], dict(common, size=list(sizes[name]),
                                                      plan=plans[name].describe(),
                                                      prompts=prompts)) for name in plans}
    cascade = PretrainedCascade([pipe])
    return Job(methods, prompts, negative, reference[:len(prompts)], dirs, sizes, plans,
               settings, cascade,
               PromptEncoder(args.pretrained, args.dtype, clip_skip=args.clip_skip),
               args.batch + -args.batch % cascade.batch_multiple,  # whole batches per device
               args.seed, features, feature_name)


def main(argv=None, *, features: Features | None = None) -> int:
    """The CLI; `features` replaces the Inception features (tests inject a cheap one)."""
    from ediffi_jax.parallel.host import configure_cpu_host

    args = _parser().parse_args(argv)
    configure_cpu_host()  # before jax starts its backends: one CPU device per core
    from ediffi_jax.atomic import write_atomically
    from ediffi_jax.config import ConfigError
    from ediffi_jax.encoders.hf import CheckpointError
    from ediffi_jax.eval.kid import MAX_SUBSET_SIZE, NUM_SUBSETS

    def log(message):
        print(message, flush=True)

    def write_json(path, data):
        write_atomically(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))

    try:
        job = prepare(args, features, log)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in job.plans:
        os.makedirs(job.dirs[name], exist_ok=True)
        write_json(os.path.join(job.dirs[name], "settings.json"), job.settings[name])
        generate_set(job, name, log)
    base, size = job.sizes[BASE], job.sizes[job.methods[0]]
    sets = {BASE: Views(base, base)}
    sets.update({m: Views(size, base, args.crops, args.seed, down=True) for m in job.methods})
    sets["reference"] = Views(size, base, args.crops, args.seed)
    feature_dir = os.path.join(args.out, "features")
    os.makedirs(feature_dir, exist_ok=True)
    feats = {name: cached_features(os.path.join(feature_dir, f"{name}.npz"),
                                   job.reference if name == "reference" else job.files(name),
                                   views, job.features, job.feature_name, args.feature_batch, log)
             for name, views in sets.items()}
    results = metrics(feats, job.methods, args.seed)
    n = len(job.prompts)
    path = os.path.join(args.out, "results.json")
    write_json(path, {
        "pretrained": args.pretrained, "num": n, "prompts": args.prompts,
        "prompts_sha256": hashlib.sha256("\n".join(job.prompts).encode()).hexdigest(),
        "reference": args.reference, "size": list(size), "base_size": list(base),
        "crops": args.crops, "features": job.feature_name,
        "kid": {"num_subsets": NUM_SUBSETS, "subset_size": min(n, MAX_SUBSET_SIZE)},
        "settings": {name: {k: v for k, v in s.items() if k != "prompts"}
                     for name, s in job.settings.items()},
        "metrics": results})
    log(f"\n{n} images per set; KID over {NUM_SUBSETS} subsets of {min(n, MAX_SUBSET_SIZE)}; "
        f"FID_c / KID_c over {args.crops} {base[0]}x{base[1]} crop(s) per image\n")
    log(table(results, job.sizes))
    log(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
