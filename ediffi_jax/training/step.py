"""The training step: EDM loss on sigmas from an expert's interval, independent conditioning
dropout, AdamW with clipping and warmup, EMA, gradient accumulation, and skipping of non-finite
updates. Pure functions of (state, batch); the trainer jits them with shardings.

Randomness is per example: example e draws its sigma, noise and dropout from
fold_in(stream(seed, TRAIN_EXAMPLE), e) where e is the global example index from the input
pipeline, so a run does not depend on batch size, device count or where it was resumed. The
network's dropout masks fold the step into stream(seed, DROPOUT), an SR stage's low-res
augmentation the index into stream(seed, TRAIN_LOWRES) (ediffi_jax/rng.py: no two purposes
share a key, whatever the seeds).
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ediffi_jax.diffusion import edm, lowres
from ediffi_jax.models.conditioning import Conditioning
from ediffi_jax.models.unet import UNet
from ediffi_jax.rng import Stream, stream


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train` config section."""

    batch_size: int = 32  # global, per optimizer step (all microbatches together)
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0  # global norm; 0 disables
    warmup_steps: int = 0
    lr_decay: str = "constant"  # after warmup: "constant", or "cosine" to 0 at `steps`
    ema_decay: float = 0.9999
    ema_half_life_images: float = 0.0  # if > 0, overrides ema_decay (EDM's parameterisation)
    # decay min(ema_decay, (1 + step) / (10 + step)) from a random init: useful on short runs.
    # Never for a branched child: its EMA starts as the parent's and must not be washed out.
    ema_warmup: bool = True
    grad_accum: int = 1  # microbatches per step
    # Conditioning dropout (each part zeroed independently), eDiff-I's rates.
    drop_t5: float = 0.25
    drop_clip_text: float = 0.2
    drop_clip_image: float = 0.9
    # The expert's noise interval as probability-mass quantiles of the training log-normal.
    sigma_quantiles: tuple[str, str] = ("0", "1")
    # Soft intervals (MEME; Decouple-Then-Merge): this fraction of the examples draws its sigma
    # from the whole training distribution instead of the expert's interval (0: hard intervals).
    soft_interval_p: float = 0.0
    # Super-resolution stages: the low-res input's noise-augmentation level, log-uniform here.
    noise_aug_sigma: tuple[float, float] = (0.002, 0.5)
    init_from: str = ""  # a parent run's workdir: start from its latest params and EMA (branching)
    max_nonfinite: int = 10  # stop after this many consecutive skipped (non-finite) steps
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3

    def __post_init__(self):
        q = tuple(str(v) for v in self.sigma_quantiles)
        object.__setattr__(self, "sigma_quantiles", q)
        lo, hi = (Fraction(v) for v in q)
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"sigma_quantiles must satisfy 0 <= lo < hi <= 1, got {q}")
        for name in ("drop_t5", "drop_clip_text", "drop_clip_image", "soft_interval_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr_decay not in ("constant", "cosine"):
            raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {self.lr_decay!r}")
        if self.batch_size < 1 or self.steps < 0:
            raise ValueError("batch_size must be >= 1 and steps >= 0")
        object.__setattr__(self, "noise_aug_sigma",
                           lowres.check_sigma_range(self.noise_aug_sigma, "noise_aug_sigma"))
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(
                f"grad_accum {self.grad_accum} must divide batch_size {self.batch_size}"
            )

    def sigma_interval(self) -> jax.Array:
        """The expert's quantile bounds as the train step's `interval` argument: data, not a
        compile-time constant, so sibling experts compile to one program (shared through JAX's
        persistent compilation cache when JAX_COMPILATION_CACHE_DIR is set)."""
        return jnp.asarray([float(Fraction(v)) for v in self.sigma_quantiles], jnp.float32)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    nonfinite_run: jax.Array  # consecutive skipped steps
    nonfinite_total: jax.Array


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to cfg.lr, then constant or cosine-decayed to 0 at cfg.steps (the
    optimizer's schedule, also what is logged). Decay anneals short runs, such as the demo."""
    if cfg.lr_decay == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1), 0.0)
    return (optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps
            else optax.constant_schedule(cfg.lr))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    lr = learning_rate(cfg)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def init_state(params, optimizer) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        nonfinite_run=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32),
    )


def ema_decay(cfg: TrainConfig, step):
    decay = (0.5 ** (cfg.batch_size / cfg.ema_half_life_images) if cfg.ema_half_life_images > 0
             else cfg.ema_decay)
    if cfg.ema_warmup and not cfg.init_from:
        step = step.astype(jnp.float32)
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return decay


def example_key(seed: int, index) -> jax.Array:
    """Training example `index`'s key: its sigma, noise and condition-dropout flags."""
    return jax.random.fold_in(stream(seed, Stream.TRAIN_EXAMPLE), index)


def dropout_key(seed: int, step) -> jax.Array:
    """The network's dropout masks at optimizer step `step` (microbatches fold their index)."""
    return jax.random.fold_in(stream(seed, Stream.DROPOUT), step)


def lowres_key(seed: int, index) -> jax.Array:
    """Training example `index`'s low-res augmentation (an SR stage): level and noise."""
    return jax.random.fold_in(stream(seed, Stream.TRAIN_LOWRES), index)


def soft_bounds(cfg: TrainConfig, key, lo, hi, top: float = 1.0):
    """The interval an example draws from: (lo, hi), or with probability
    cfg.soft_interval_p the whole range (0, top). Its own key (fold_in(key, 1)): at p = 0
    every draw is what it always was."""
    if cfg.soft_interval_p > 0:
        anywhere = jax.random.uniform(jax.random.fold_in(key, 1)) < cfg.soft_interval_p
        lo, hi = jnp.where(anywhere, 0.0, lo), jnp.where(anywhere, top, hi)
    return lo, hi


def example_randomness(cfg: TrainConfig, index, image_shape, interval):
    """sigma (within the quantile `interval`, or with probability cfg.soft_interval_p
    anywhere), noise and per-part keep flags of one example, from its global index."""
    key = example_key(cfg.seed, index)
    k_sigma, k_noise, k_drop = jax.random.split(key, 3)
    lo, hi = soft_bounds(cfg, key, interval[0], interval[1])
    sigma = edm.LogNormalSigma().sample(k_sigma, (), lo, hi)
    noise = jax.random.normal(k_noise, image_shape, jnp.float32)
    u = jax.random.uniform(k_drop, (3,))
    keep = u >= jnp.array([cfg.drop_t5, cfg.drop_clip_text, cfg.drop_clip_image])
    return sigma, noise, keep


def with_lowres(cfg: TrainConfig, cond: Conditioning, batch, scale: int) -> Conditioning:
    """A super-resolution batch's low-res input: the whole low-res images upsampled `scale`x,
    cut to the training patches (batch["crop"], top-left corners), noise-augmented to a random
    level per example (its own key from the global index: independent of the denoising draws)."""
    size = batch["image"].shape[1]
    up = lowres.upsample(batch["lowres"], batch["lowres"].shape[1] * scale)
    up = lowres.crop(up, batch["crop"], size)
    keys = jax.vmap(lambda i: lowres_key(cfg.seed, i))(batch["index"])
    sigma = jax.vmap(lambda k: lowres.sample_sigma(k, cfg.noise_aug_sigma))(keys)
    return cond.replace(lowres=jax.vmap(lowres.augment)(keys, up, sigma), lowres_sigma=sigma)


def loss_fn(params, unet: UNet, cfg: TrainConfig, batch, dropout_key, interval):
    """Mean EDM loss of a (micro)batch and per-example (loss, sigma) for logging.

    batch: {"image": [B,H,W,C] in [-1, 1], "index": [B] global example indices,
            "cond": Conditioning}; a super-resolution stage's also has "lowres" [B,h,w,C] in
            [-1, 1] (whole images) and "crop" [B, 2] (where each patch sits in the upsampled one).
    """
    images = batch["image"].astype(jnp.float32)
    sigma, noise, keep = jax.vmap(
        lambda i: example_randomness(cfg, i, images.shape[1:], interval))(batch["index"])
    cond: Conditioning = batch["cond"].keep(t5=keep[:, 0], clip_text=keep[:, 1],
                                           clip_image=keep[:, 2])
    if unet.config.lowres_scale:
        cond = with_lowres(cfg, cond, batch, unet.config.lowres_scale)
    network = lambda x_in, c_noise, cond: unet.apply(  # noqa: E731
        {"params": params}, x_in, c_noise, cond, train=True, rngs={"dropout": dropout_key})
    denoised = edm.denoise(network, images + edm.expand_to(sigma, images) * noise, sigma, cond)
    per_example = edm.edm_loss(denoised, images, sigma)
    return jnp.mean(per_example), (per_example, sigma)


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def compute_grads(params, batch, dropout_key, interval, *, unet: UNet, cfg: TrainConfig,
                  loss=loss_fn):
    """Mean loss and gradients over cfg.grad_accum microbatches (a scan: one microbatch of
    activations alive at a time). Returns (loss, per_example_loss, sigma, grads). `loss`:
    loss_fn's signature and outputs (training/pretrained.py's discrete-time loss plugs in).

    Microbatch m takes examples m, m + A, m + 2A, ... (A = grad_accum): the batch is sharded in
    contiguous blocks, so strided microbatches keep every device busy with 1/A of its block,
    where contiguous slices would put each microbatch on 1/A of the devices and save no memory."""
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    if cfg.grad_accum == 1:
        (loss, (per_example, sigma)), grads = grad_fn(params, unet, cfg, batch, dropout_key,
                                                      interval)
        return loss, per_example, sigma, grads
    a = cfg.grad_accum
    micro = jax.tree.map(
        lambda x: x.reshape((x.shape[0] // a, a) + x.shape[1:]).swapaxes(0, 1), batch)

    def body(acc, inputs):
        i, mb = inputs
        key = jax.random.fold_in(dropout_key, i)
        (l, aux), g = grad_fn(params, unet, cfg, mb, key, interval)
        return jax.tree.map(jnp.add, acc, g), (l, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, (per_example, sigma)) = jax.lax.scan(
        body, zeros, (jnp.arange(cfg.grad_accum), micro))
    grads = jax.tree.map(lambda g: g / a, grads)
    in_batch_order = lambda x: x.swapaxes(0, 1).reshape(-1)  # noqa: E731  [A, B/A] -> [B]
    return jnp.mean(losses), in_batch_order(per_example), in_batch_order(sigma), grads


def apply_update(state: TrainState, grads, finite, *, cfg: TrainConfig,
                 optimizer: optax.GradientTransformation) -> TrainState:
    """The optimizer step, EMA and step count on `grads`; with `finite` false the update is
    skipped and counted instead."""

    def apply(state):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = ema_decay(cfg, state.step)
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema_params, params)
        return state.replace(params=params, opt_state=opt_state, ema_params=ema,
                             nonfinite_run=jnp.zeros_like(state.nonfinite_run))

    def skip(state):
        return state.replace(nonfinite_run=state.nonfinite_run + 1,
                             nonfinite_total=state.nonfinite_total + 1)

    state = jax.lax.cond(finite, apply, skip, state)
    return state.replace(step=state.step + 1)


def train_step(state: TrainState, batch, interval, *, unet: UNet, cfg: TrainConfig,
               optimizer: optax.GradientTransformation, loss=loss_fn):
    """One optimizer step on sigmas from `interval` (cfg.sigma_interval()); an update with a
    non-finite loss or gradient is skipped and counted. Returns (state, metrics)."""
    loss, per_example, sigma, grads = compute_grads(state.params, batch,
                                                    dropout_key(cfg.seed, state.step), interval,
                                                    unet=unet, cfg=cfg, loss=loss)
    finite = jnp.isfinite(loss) & all_finite(grads)
    state = apply_update(state, grads, finite, cfg=cfg, optimizer=optimizer)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "finite": finite,
        # The state's counter after this step, in the (never donated) metrics: the trainer
        # reads it a step late, once the next step is dispatched.
        "nonfinite_run": state.nonfinite_run,
        "per_example_loss": per_example,
        "sigma": sigma,
    }
    return state, metrics


def state_shardings(optimizer, params_abstract, param_shardings, mesh) -> TrainState:
    """Shardings of a TrainState: optimizer moments and EMA follow their parameter, scalars
    (step, counts) are replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    replicated = NamedSharding(mesh, P())
    opt_abstract = jax.eval_shape(optimizer.init, params_abstract)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, opt_abstract, param_shardings,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                      ema_params=param_shardings, nonfinite_run=replicated,
                      nonfinite_total=replicated)
