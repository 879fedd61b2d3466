"""The training draws on named streams (ediffi_jax/rng.py): each purpose's key is
fold_in(fold_in(key(seed), salt), index or step), and no purpose of one seed shares a key with
another purpose of any other seed (with key(seed + k) per purpose, seed 1's examples drew what
seed 0's dropout had)."""

import jax
import jax.numpy as jnp
import numpy as np

import ediffi_jax.training.step as step_mod
from ediffi_jax.diffusion import edm, lowres
from ediffi_jax.models.conditioning import Conditioning
from ediffi_jax.training.step import (TrainConfig, dropout_key, example_key, example_randomness,
                                      init_state, lowres_key, make_optimizer, train_step,
                                      with_lowres)

SALTS = {"params": 1, "example": 2, "dropout": 3, "lowres": 4}  # fixed forever (rng.Stream)


def expected(seed, salt, i):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), salt), i)


def bits(key):
    return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())


def test_each_stream_is_fold_in_of_its_salt_then_the_index():
    for seed in (0, 7):
        for i in (0, 5, 123):
            assert bits(example_key(seed, i)) == bits(expected(seed, SALTS["example"], i))
            assert bits(dropout_key(seed, i)) == bits(expected(seed, SALTS["dropout"], i))
            assert bits(lowres_key(seed, i)) == bits(expected(seed, SALTS["lowres"], i))


def test_example_randomness_is_drawn_from_the_example_stream():
    cfg = TrainConfig(seed=3)
    interval = cfg.sigma_interval()
    sigma, noise, keep = example_randomness(cfg, 11, (4, 4, 3), interval)
    k_sigma, k_noise, k_drop = jax.random.split(expected(3, SALTS["example"], 11), 3)
    assert float(sigma) == float(edm.LogNormalSigma().sample(k_sigma, (), interval[0], interval[1]))
    np.testing.assert_array_equal(noise, jax.random.normal(k_noise, (4, 4, 3), jnp.float32))
    np.testing.assert_array_equal(
        keep, jax.random.uniform(k_drop, (3,)) >= jnp.array([0.25, 0.2, 0.9]))


def test_no_purpose_shares_a_key_with_another_across_seeds():
    """The old scheme's collision: seed s+1's example i was seed s's dropout at step i, and
    seed s+2's example i was seed s's low-res augmentation of example i."""
    cfg = TrainConfig(seed=1)
    old_dropout_of_seed0 = jax.random.fold_in(jax.random.key(0 + 1), 4)
    _, noise_seed1, _ = example_randomness(cfg, 4, (8,), cfg.sigma_interval())
    _, old_noise, _ = jax.random.split(old_dropout_of_seed0, 3)
    assert not np.array_equal(noise_seed1, jax.random.normal(old_noise, (8,), jnp.float32))
    seen = {}
    for seed in range(4):
        for i in range(4):
            for name, fn in (("example", example_key), ("dropout", dropout_key),
                             ("lowres", lowres_key)):
                b = bits(fn(seed, i))
                assert b not in seen, (name, seed, i, seen.get(b))
                seen[b] = (name, seed, i)


def test_train_step_and_lowres_use_their_streams(monkeypatch):
    """The step's dropout key is the DROPOUT stream at the step; an SR batch's augmentation
    level is drawn from the TRAIN_LOWRES stream at the example's index."""
    cfg = TrainConfig(seed=5, batch_size=2, noise_aug_sigma=(0.01, 0.4))
    seen = []

    def fake_grads(params, batch, key, interval, *, unet, cfg, loss):
        seen.append(key)
        zeros = jax.tree.map(jnp.zeros_like, params)
        return jnp.float32(0), jnp.zeros(2), jnp.ones(2), zeros

    monkeypatch.setattr(step_mod, "compute_grads", fake_grads)
    opt = make_optimizer(cfg)
    state = init_state({"w": jnp.ones(3)}, opt).replace(step=jnp.int32(6))
    train_step(state, {}, cfg.sigma_interval(), unet=None, cfg=cfg, optimizer=opt)
    assert bits(seen[0]) == bits(expected(5, SALTS["dropout"], 6))

    index = jnp.array([9, 2], jnp.int32)
    batch = {"image": jnp.zeros((2, 8, 8, 3)), "lowres": jnp.zeros((2, 4, 4, 3)),
             "crop": jnp.zeros((2, 2), jnp.int32), "index": index}
    cond = Conditioning(**{f: None for f in Conditioning.__dataclass_fields__})
    out = with_lowres(cfg, cond, batch, 2)
    want = [float(lowres.sample_sigma(expected(5, SALTS["lowres"], int(i)), (0.01, 0.4)))
            for i in index]
    np.testing.assert_array_equal(np.asarray(out.lowres_sigma), np.asarray(want, np.float32))
