"""Run a sampling `Plan`: one jitted `lax.fori_loop` per segment, expert params passed as data.

Noise is per example: example e of a run with seed s draws from fold_in(sampling_key(s), e)
(ediffi_jax/rng.py), so an image does not depend on the batch it was sampled in, on the device
count, or on its position.

The runner is given one conditioning and derives every branch a segment's settings ask for
inside the compiled loop: the unconditional one (`cond.unconditional()`) for classifier-free
guidance, the text-only one (`cond.text_only()`) for separate style guidance, and noise-damped
CFG's milder pass (the same unconditional branch through the milder layer settings).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from ediffi_jax.diffusion.guidance import guided_denoise
from ediffi_jax.diffusion.plan import Plan, SegmentSettings
from ediffi_jax.parallel.mesh import with_activation_rules
from ediffi_jax.rng import Stream, root, sampling_key

# denoise_fn(params, x, sigma[B], cond, settings) -> D(x; sigma) in float32
DenoiseFn = Callable[[Any, jax.Array, jax.Array, Any, SegmentSettings], jax.Array]


class SamplerState(NamedTuple):
    x: jax.Array
    prev_denoised: jax.Array  # the previous step's (first) denoised image: DPM++(2M)'s history


def example_keys(key: jax.Array, example_indices) -> jax.Array:
    """One key per example: fold_in(a stage's sampling key, global example index)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(example_indices, jnp.uint32))


def _normal_per_example(keys, shape, salt):
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), shape, jnp.float32))(keys)


def initial_noise(keys, shape, sigma_max) -> jax.Array:
    return sigma_max * _normal_per_example(keys, shape, Stream.INITIAL_NOISE)


def initial_state(x) -> SamplerState:
    """A plan's first state: a fresh buffer (the loops donate their state, the caller keeps x)
    and no history."""
    x = jnp.array(x, jnp.float32, copy=True)
    return SamplerState(x, jnp.zeros_like(x))


def _step(settings, denoise, state, i, sigmas, gammas, s_noise, keys):
    """One step of the configured sampler. `denoise(which, x, sigma)` evaluates expert call
    `which` (0: first evaluation of the step, 1: second)."""
    x, prev = state
    batch = x.shape[0]
    per_ex = lambda v: jnp.full((batch,), v, jnp.float32)  # noqa: E731
    sigma, sigma_next = sigmas[i], sigmas[i + 1]

    if settings.sampler == "dpmpp_2m":
        d = denoise(0, x, per_ex(sigma))
        t, t_next = -jnp.log(sigma), -jnp.log(sigma_next)
        h = t_next - t
        ratio = sigma_next / sigma
        first_order = ratio * x - jnp.expm1(-h) * d
        sigma_prev = sigmas[jnp.maximum(i - 1, 0)]
        r = (t - (-jnp.log(sigma_prev))) / h
        d_extrap = (1.0 + 0.5 / r) * d - (0.5 / r) * prev
        second_order = ratio * x - jnp.expm1(-h) * d_extrap
        use_second = (i > 0) & (sigma_next > 0)
        return SamplerState(jnp.where(use_second, second_order, first_order), d)

    sigma_hat = sigma * (1.0 + gammas[i])
    if settings.stochastic:
        eps = _normal_per_example(jax.vmap(lambda k: jax.random.fold_in(k, Stream.CHURN))(keys),
                                  x.shape[1:], i)
        x = x + jnp.sqrt(sigma_hat**2 - sigma**2) * s_noise * eps
    denoised = denoise(0, x, per_ex(sigma_hat))
    d = (x - denoised) / sigma_hat
    x_next = x + (sigma_next - sigma_hat) * d
    if settings.sampler == "heun":

        def correct(x_next):
            d2 = (x_next - denoise(1, x_next, per_ex(sigma_next))) / sigma_next
            return x + (sigma_next - sigma_hat) * 0.5 * (d + d2)

        x_next = jax.lax.cond(sigma_next > 0, correct, lambda x_next: x_next, x_next)
    # Kept as history, so a DPM-Solver++(2M) step after this one (a later expert's sampler)
    # extrapolates from the previous step's denoised image as after one of its own.
    return SamplerState(x_next, denoised)


class PlanRunner:
    """Compiles one loop per distinct `SegmentSettings` and runs plans with it.

    `trace_count` counts traces of the segment loop (each trace is a compile), so benchmarks and
    tests can check that experts of one architecture share one compiled function.

    `progress(step, num_steps)`, off by default so the compiled loops stay the benchmarked ones,
    is called on the host as each step of a plan runs (a `jax.debug.callback` in the loop body,
    which reads only the step index, so no sampled value changes): once per step, even where
    the callback fires on several devices of a sharded batch. One `run` at a time per runner.

    `guided_transform(x0) -> x0`, when given, acts on every guided denoised image before the
    sampler uses it: DeepFloyd IF's dynamic thresholding, which diffusers applies to the x0 of
    the guided prediction (thresholding each branch before CFG is a different sampler).
    """

    def __init__(self, denoise_fn: DenoiseFn,
                 progress: Callable[[int, int], None] | None = None, mesh=None,
                 guided_transform: Callable[[jax.Array], jax.Array] | None = None):
        self.denoise_fn = denoise_fn
        self.guided_transform = guided_transform
        self.progress = progress
        self.mesh = mesh  # the loops trace inside its activation rules (parallel/mesh.py)
        self.trace_count = 0
        self._loops: dict[SegmentSettings, Callable] = {}
        self._steps_seen: set[int] = set()
        self._num_steps = 0

    def _step_started(self, i) -> None:
        i = int(i)
        if i not in self._steps_seen:
            self._steps_seen.add(i)
            self.progress(i, self._num_steps)

    def _segment_loop(
        self, params_first, params_second, state, sigmas, gammas, s_noise, start, stop, scale,
        style_scale, cond, keys, *, settings: SegmentSettings,
    ):
        self.trace_count += 1
        expert_params = (params_first, params_second)
        uncond = cond.unconditional() if settings.use_cfg else None
        cond_text = cond.text_only() if settings.use_cfg and settings.style_cfg else None

        fn = functools.partial(self.denoise_fn, settings=settings)
        base_fn = None
        if settings.uncond_layers is not None:  # noise-damped CFG: the milder base term
            mild = dataclasses.replace(settings, layers=settings.uncond_layers, uncond_layers=None)
            base_fn = functools.partial(self.denoise_fn, settings=mild)

        def denoise(which, x, sigma):
            d = guided_denoise(
                fn, expert_params[which], x, sigma, cond, uncond, scale, settings.use_cfg,
                base_fn=base_fn, cond_text=cond_text, style_scale=style_scale,
            )
            return d if self.guided_transform is None else self.guided_transform(d)

        def body(i, st):
            if self.progress is not None:
                jax.debug.callback(self._step_started, i)
            return _step(settings, denoise, st, i, sigmas, gammas, s_noise, keys)

        return jax.lax.fori_loop(start, stop, body, state)

    def loop(self, settings: SegmentSettings) -> Callable:
        if settings not in self._loops:
            fn = functools.partial(self._segment_loop, settings=settings)
            if self.mesh is not None:  # the models' activation constraints act
                fn = with_activation_rules(fn, self.mesh)
            self._loops[settings] = jax.jit(fn, donate_argnums=(2,))
        return self._loops[settings]

    def _segment_args(self, plan: Plan, seg, expert_params, state, cond, keys) -> tuple:
        return (expert_params[seg.experts[0]], expert_params[seg.experts[1]], state,
                jnp.asarray(plan.sigmas, jnp.float32), jnp.asarray(plan.gammas, jnp.float32),
                jnp.float32(plan.s_noise), jnp.int32(seg.start), jnp.int32(seg.stop),
                jnp.float32(seg.guidance_scale), jnp.float32(seg.style_scale), cond, keys)

    def lower(self, plan: Plan, expert_params: Sequence[Any], cond: Any, keys: jax.Array,
              x: jax.Array, segment: int = 0):
        """The lowered loop of one segment (jax's Lowered: .as_text(), .compile()), for
        reading what a sampling call compiles to."""
        seg = plan.segments[segment]
        state = SamplerState(x, jnp.zeros_like(x))
        return self.loop(seg.settings).lower(
            *self._segment_args(plan, seg, expert_params, state, cond, keys))

    def run(
        self,
        plan: Plan,
        expert_params: Sequence[Any],
        cond: Any,
        keys: jax.Array,
        x: jax.Array,
    ) -> jax.Array:
        """Integrate from x (already at sigma_max scale) through every segment of the plan.
        Guided segments need `cond.unconditional()` (and style-guided ones `cond.text_only()`):
        models.conditioning.Conditioning has both."""
        self.start(plan)
        state = initial_state(x)
        for seg in plan.segments:
            state = self.run_segment(plan, seg, expert_params, state, cond, keys)
        return state.x

    def start(self, plan: Plan) -> None:
        """Begin a plan: progress counts its steps afresh."""
        self._steps_seen, self._num_steps = set(), plan.num_steps

    def run_segment(self, plan: Plan, seg, expert_params: Sequence[Any], state: SamplerState,
                    cond: Any, keys: jax.Array) -> SamplerState:
        """One segment of a started plan from `state` (donated): the unit an ensemble of
        different networks (pipeline/pretrained_experts.py) hands from runner to runner."""
        return self.loop(seg.settings)(
            *self._segment_args(plan, seg, expert_params, state, cond, keys))

    def sample(
        self,
        plan: Plan,
        expert_params: Sequence[Any],
        shape: tuple[int, ...],
        *,
        seed: int | jax.Array,
        example_indices,
        cond: Any = None,
        batch_sharding: jax.sharding.Sharding | None = None,
    ) -> jax.Array:
        """Draw the examples `example_indices` of run `seed` (an int: its stage-0 sampling key;
        or a stage's key, rng.sampling_key): initial noise, then the plan. `shape` is one
        example's shape (e.g. [H, W, C]); `batch_sharding` places the batch (e.g.
        NamedSharding(mesh, P(("data", "fsdp")))) and with it every segment's work."""
        indices = jnp.asarray(example_indices, jnp.uint32)
        if batch_sharding is not None:
            indices = jax.device_put(indices, batch_sharding)
        key = sampling_key(seed) if isinstance(seed, int) else root(seed)
        keys = example_keys(key, indices)
        x = initial_noise(keys, tuple(shape), float(plan.sigmas[0]))
        return self.run(plan, expert_params, cond, keys, x)
