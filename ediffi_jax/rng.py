"""Named random streams: one root key per run (its seed), one fixed salt per purpose.

Every draw of the project starts from `stream(seed, Stream.X)` = fold_in(key(seed), X), and
per-example or per-step keys fold the example index or the step into that. Two purposes never
share a key, whatever the seeds: with `key(seed + k)` per purpose, a seed-2 run drew as its
example noise what a seed-0 run had drawn for its low-res augmentation.

Within one example's sampling key, the initial noise, each step's churn and the low-res
augmentation take their own salt too (`Stream.INITIAL_NOISE`, ...), so no draw reuses another's.
"""
from __future__ import annotations

import enum

import jax


class Stream(enum.IntEnum):
    """The salt of each purpose. Values are fixed forever: changing one changes every run's bits."""

    PARAMS = 1  # the U-Net's initial parameters
    TRAIN_EXAMPLE = 2  # per training example: its sigma, noise and condition-dropout flags
    DROPOUT = 3  # per training step: the network's dropout masks
    TRAIN_LOWRES = 4  # per training example: an SR stage's low-res augmentation level and noise
    SAMPLE = 5  # per sampling stage and example: everything a sampler draws
    # Salts inside one example's sampling key:
    INITIAL_NOISE = 101  # x_T = sigma_max * n
    CHURN = 102  # per step: the churn noise of stochastic samplers (folded with the step index)
    LOWRES_AUG = 103  # an SR stage's noise augmentation of its low-res input


def check_seed(seed: int, what: str = "seed") -> int:
    """Seeds are 32-bit: jax would silently alias a negative or larger one to another seed."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"{what} must be in [0, 2**32 - 1], got {seed}")
    return seed


def root(seed: int | jax.Array) -> jax.Array:
    """The run's root key (a key is passed through)."""
    return jax.random.key(check_seed(seed)) if isinstance(seed, int) else seed


def stream(seed: int | jax.Array, purpose: Stream) -> jax.Array:
    return jax.random.fold_in(root(seed), int(purpose))


def sampling_key(seed: int | jax.Array, stage: int = 0) -> jax.Array:
    """The key of cascade stage `stage` of sampling run `seed` (a single ensemble is stage 0):
    each example's key folds its global index into it."""
    return jax.random.fold_in(stream(seed, Stream.SAMPLE), stage)
