"""A super-resolution stage against bicubic upsampling on held-out images (PSNR, higher is better).

    python -m benchmarks.cascade_sr --stage runs/emoji/sr32 --data data/emoji/test [--num 191]
        [--config.sampling.num_steps=12 ...]

Each held-out image is brought to the stage's size as training does (data/stage.py), shrunk by
the stage's factor with PIL's bicubic filter (the usual SR protocol), and then (a) upsampled
bicubically, the same upsampling that feeds the stage, and (b) sampled by the stage from that
low-res image and the image's caption. PSNR on uint8 pixels against the ground truth, per image,
averaged; a patch-trained stage samples whole images. Both arms run in one process.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 batches [N, H, W, C]."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def main(argv=None) -> int:
    from ediffi_jax.config import split_overrides
    from ediffi_jax.parallel.host import configure_cpu_host

    overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    p = argparse.ArgumentParser(prog="python -m benchmarks.cascade_sr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, help="an SR stage: ensemble.json, workdir or export")
    p.add_argument("--data", required=True, help="held-out ArrayRecords (e.g. data/emoji/test)")
    p.add_argument("--num", type=int, default=0, help="images (default: all)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(rest)
    configure_cpu_host()

    import jax.numpy as jnp
    from PIL import Image

    from ediffi_jax.data.records import RecordSource
    from ediffi_jax.data.stage import resize
    from ediffi_jax.diffusion import lowres
    from ediffi_jax.parallel.mesh import make_mesh
    from ediffi_jax.pipeline.cascade import CascadeSampler, gather, load_stage
    from ediffi_jax.pipeline.generate import to_uint8

    stage = load_stage(args.stage, [o.replace("--config.", "", 1) for o in overrides])
    if not stage.lowres_scale:
        print(f"error: {args.stage} is not a super-resolution stage", file=sys.stderr)
        return 2
    source = RecordSource(args.data)
    num = min(args.num or len(source), len(source))
    size, small = stage.resolution, stage.resolution // stage.lowres_scale
    truth = np.stack([resize(np.asarray(source[i]["image"], np.uint8), size) for i in range(num)])
    low = np.stack([np.asarray(Image.fromarray(t).resize((small, small), Image.BICUBIC))
                    for t in truth])
    captions = [str(source[i]["caption"]) for i in range(num)]
    low_float = low.astype(np.float32) / 127.5 - 1.0

    bicubic = to_uint8(lowres.upsample(jnp.asarray(low_float), size))
    mesh = make_mesh((-1, 1, 1))
    sampler = CascadeSampler([stage], mesh, from_images=True)  # fed the held-out low-res images
    batch = max(args.batch - args.batch % mesh.size, mesh.size)
    t0 = time.perf_counter()
    outputs = []
    for i in range(0, num, batch):
        chunk = list(range(i, min(i + batch, num)))
        pad = chunk + [chunk[-1]] * (-len(chunk) % mesh.size)
        x = sampler.run_stage(0, [captions[j] for j in pad], low_float[pad], seed=args.seed,
                              first_index=i)
        outputs.append(to_uint8(gather(x))[:len(chunk)])
    sampled = np.concatenate(outputs)
    seconds = time.perf_counter() - t0
    result = {
        "stage": stage.name, "images": num, "size": f"{small} -> {size}",
        "sampling": f"{stage.sampling.sampler} {stage.sampling.num_steps} steps, "
                    f"w={stage.sampling.guidance_scale}, noise_aug_sigma="
                    f"{stage.sampling.noise_aug_sigma}",
        "psnr_bicubic": float(psnr(bicubic, truth).mean()),
        "psnr_stage": float(psnr(sampled, truth).mean()),
        "stage_beats_bicubic": float(np.mean(psnr(sampled, truth) > psnr(bicubic, truth))),
        "seconds_sampling": round(seconds, 1),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
