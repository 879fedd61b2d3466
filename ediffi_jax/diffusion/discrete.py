"""Discrete-time (DDPM / VP) diffusers models as EDM denoisers: the scheduler bridge.

A diffusers model is trained on x_t = sqrt(a_t) x0 + sqrt(1 - a_t) n at integer timesteps t with
a_t = alphas_cumprod[t]. Dividing by sqrt(a_t) gives the EDM form x = x0 + sigma n with
sigma_t = sqrt((1 - a_t) / a_t), so the project's samplers (which step x in sigma) drive such a
model through `vp_denoise`: c_in = 1 / sqrt(sigma^2 + 1) maps x back to the model's input, the
model's timestep is sigma's continuous position among the train sigmas (`sigma_to_t`, as
diffusers' EulerDiscreteScheduler / k-diffusion interpolate it), and the prediction becomes x0.

`DiscreteSchedule.from_scheduler_config` reads a diffusers scheduler_config.json; the train
schedule is computed in float32 in diffusers' order of operations, so sigmas match bit for bit
(near enough: tests check 1e-6). `discrete_sigmas` gives the inference sigmas that diffusers'
EulerDiscreteScheduler / DPMSolverMultistepScheduler set_timesteps would use, for a Plan
(plan.build_plan(sigmas, ...) takes them as they are).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from ediffi_jax.diffusion.edm import expand_to
from ediffi_jax.diffusion.schedules import karras_sigmas

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SOLVERS = ("euler", "dpmsolver")  # whose set_timesteps `discrete_sigmas` reproduces

# Fields read into the schedule.
_READ = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
         "prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
         "use_karras_sigmas", "thresholding", "dynamic_thresholding_ratio", "sample_max_value")
# Fields that do not change the bridge: bookkeeping, DDPM's variance (a learned variance's
# extra channels are dropped by shape) and x0 clipping (diffusers' Euler / DPM-Solver++ never
# clip), and the settings of diffusers' own samplers (the project's plan picks the sampler).
_IGNORED_ANY = ("_class_name", "_diffusers_version", "clip_sample", "clip_sample_range",
                "set_alpha_to_one", "skip_prk_steps", "variance_type", "solver_order", "solver_type", "lower_order_final",
                "algorithm_type", "euler_at_final")
# Fields accepted only with these values (the ones the bridge reproduces); any other value is
# an error naming the field.
_IGNORED_IF = {
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "final_sigmas_type": ("zero",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "lambda_min_clipped": (-math.inf,),  # DPM-Solver's spacing as discrete_timesteps has it
}


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' betas_for_alpha_bar (cosine): float64 python floats, then float32."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], np.float32)


def _float32_linspace(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) bit for bit: a float32 step, the first half
    counted up from start and the second down from end, each as one fused multiply-add
    (emulated exactly in float64: a float32 product is exact there)."""
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32])
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    up = np.float64(start32) + step * i
    down = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, up, down).astype(np.float32)


def _cumprod32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod of a float32 CPU tensor: accumulated in float64, each output float32."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' rescale_zero_terminal_snr (arXiv 2305.08891, Algorithm 1), in float32."""
    abar_sqrt = np.sqrt(_cumprod32(np.float32(1.0) - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
    """A diffusers train schedule and inference spacing (the fields of scheduler_config.json)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_karras_sigmas: bool = False
    # Imagen's dynamic thresholding of the predicted x0 (DeepFloyd IF): each sample is clipped
    # to its `ratio` quantile of |x0| (at least 1, at most sample_max_value) and divided by it.
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES and self.trained_betas is None:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, "
                             f"got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, "
                             f"got {self.timestep_spacing!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.trained_betas is not None:
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(f"trained_betas has {len(self.trained_betas)} entries, "
                                 f"num_train_timesteps is {self.num_train_timesteps}")
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "DiscreteSchedule":
        """From a diffusers scheduler_config.json dict (any of diffusers' DDPM-family classes:
        PNDM, DDIM, DDPM, Euler, DPMSolverMultistep). Unknown fields and values the bridge
        does not reproduce raise a ValueError naming the field."""
        kwargs = {}
        for key, value in config.items():
            if key in _READ:
                kwargs[key] = value
            elif key in _IGNORED_ANY:
                continue
            elif key in _IGNORED_IF:
                if value not in _IGNORED_IF[key]:
                    raise ValueError(f"scheduler config field {key!r}={value!r} is not supported "
                                     f"(supported: {_IGNORED_IF[key]})")
            else:
                raise ValueError(f"unknown scheduler config field {key!r}")
        if kwargs.get("use_karras_sigmas") is None:
            kwargs.pop("use_karras_sigmas", None)
        return cls(**kwargs)

    # -- the train schedule, float32 as diffusers computes it -------------------------------------

    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float32)
        elif self.beta_schedule == "linear":
            betas = _float32_linspace(self.beta_start, self.beta_end, n)
        elif self.beta_schedule == "scaled_linear":
            betas = _float32_linspace(self.beta_start**0.5, self.beta_end**0.5, n) ** 2
        else:
            betas = _cosine_betas(n)
        return _zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> np.ndarray:
        """[T] float32, like diffusers' scheduler.alphas_cumprod."""
        a = _cumprod32(np.float32(1.0) - self.betas())
        if self.rescale_betas_zero_snr:
            a[-1] = 2.0**-24  # diffusers: a_T = 0 would make sigma_T infinite
        return a

    def sigmas_train(self) -> np.ndarray:
        """[T] float32, ascending in t: sigma_t = sqrt((1 - a_t) / a_t)."""
        a = self.alphas_cumprod()
        return np.sqrt((np.float32(1.0) - a) / a).astype(np.float32)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas_train()[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas_train()[-1])

    # -- sigma <-> timestep -----------------------------------------------------------------------

    def sigma_to_t(self, sigma, round_t: bool = False):
        """The model's continuous timestep for sigma (any shape, jit-able): linear interpolation
        in log sigma between the neighbouring train timesteps, clamped to [0, T - 1]
        (diffusers' _sigma_to_t). round_t: round to the nearest integer, as diffusers'
        DPMSolverMultistepScheduler does with Karras sigmas (non-cosine schedules)."""
        log_sigmas = jnp.asarray(np.log(self.sigmas_train()), jnp.float32)
        log_sigma = jnp.log(jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-10))
        count = jnp.searchsorted(log_sigmas, log_sigma, side="right")  # train sigmas <= sigma
        low_idx = jnp.clip(count - 1, 0, log_sigmas.shape[0] - 2)
        low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
        w = jnp.clip((low - log_sigma) / (low - high), 0.0, 1.0)
        t = (1.0 - w) * low_idx + w * (low_idx + 1)
        return jnp.round(t) if round_t else t

    # -- inference spacing ------------------------------------------------------------------------

    def discrete_timesteps(self, num_steps: int, solver: str = "euler") -> np.ndarray:
        """The spaced train timesteps (descending) of `solver`'s set_timesteps(num_steps):
        Euler's and DPM-Solver's leading/linspace spacings differ (DPM spaces N + 1 points)."""
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        T, spacing = self.num_train_timesteps, self.timestep_spacing
        if solver == "euler":
            if spacing == "linspace":
                return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
            if spacing == "leading":
                ratio = T // num_steps
                ts = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.float32)
                return ts + self.steps_offset
            ratio = T / num_steps
            return np.arange(T, 0, -ratio).round().astype(np.float32) - 1
        # DPMSolverMultistep (lambda_min_clipped = -inf: last_timestep = T)
        if spacing == "linspace":
            return np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            ratio = T // (num_steps + 1)
            ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            return ts + self.steps_offset
        ratio = T / num_steps
        return np.arange(T, 0, -ratio).round().astype(np.int64) - 1

    def discrete_sigmas(self, num_steps: int, solver: str = "euler",
                        karras: bool | None = None) -> np.ndarray:
        """[num_steps + 1] float64 (float32 values), descending, final 0: the sigmas diffusers'
        EulerDiscreteScheduler ("euler") or DPMSolverMultistepScheduler ("dpmsolver") sample
        with after set_timesteps(num_steps), for build_plan. karras (default: the config's
        use_karras_sigmas): EDM's rho=7 spacing, between the spaced sigmas' ends for Euler and
        between the train sigma_min/max for DPM-Solver, as diffusers does."""
        karras = self.use_karras_sigmas if karras is None else karras
        train = self.sigmas_train()
        if karras and solver == "dpmsolver":
            out = karras_sigmas(num_steps, float(train[0]), float(train[-1]))
        else:
            ts = self.discrete_timesteps(num_steps, solver)
            spaced = np.interp(ts, np.arange(len(train)), train)
            if karras:
                out = karras_sigmas(num_steps, float(spaced[-1]), float(spaced[0]))
            else:
                out = np.append(spaced, 0.0)
        return out.astype(np.float32).astype(np.float64)

    def init_noise_sigma(self, sigmas: np.ndarray, solver: str = "euler") -> float:
        """The scale of the initial noise, in the EDM (sigma) space the project samples in.
        Euler: diffusers' init_noise_sigma (sqrt(sigma_max^2 + 1) for leading spacing, sigma_max
        otherwise). DPM-Solver starts its VP sample at unit noise, which is
        sqrt(sigma_max^2 + 1) here."""
        s = float(np.max(sigmas))
        if solver == "euler" and self.timestep_spacing in ("linspace", "trailing"):
            return s
        return math.sqrt(s * s + 1.0)


def vp_denoise(network: Callable, x, sigma, schedule: DiscreteSchedule, *args,
               round_t: bool = False, **kwargs):
    """EDM's D(x; sigma) for a discrete-time diffusers model, in float32.

    network(x_in, t, *args, **kwargs) -> the model's prediction (channels last); x_in = x /
    sqrt(sigma^2 + 1) is the model's VP input and t = schedule.sigma_to_t(sigma). Output
    channels beyond x's (DeepFloyd IF's learned variance) are dropped, as diffusers'
    deterministic samplers do. `sigma` is per example, shape [B]."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    x32 = x.astype(jnp.float32)
    s = expand_to(sigma, x32)
    c_in = 1.0 / jnp.sqrt(s * s + 1.0)
    out = network(c_in * x32, schedule.sigma_to_t(sigma, round_t), *args, **kwargs)
    out = out.astype(jnp.float32)
    channels = x.shape[-1]
    if out.shape[-1] != channels:
        if out.shape[-1] != 2 * channels:
            raise ValueError(f"network output has {out.shape[-1]} channels; the input has "
                             f"{channels} (expected {channels} or {2 * channels})")
        out = out[..., :channels]
    if schedule.prediction_type == "epsilon":
        return x32 - s * out
    if schedule.prediction_type == "v_prediction":
        # x_vp = alpha x0 + s_t n, v = alpha n - s_t x0 (alpha = c_in, s_t = sigma c_in):
        # x0 = alpha x_vp - s_t v = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v.
        return x32 * c_in * c_in - s * c_in * out
    return out  # "sample": the model predicts x0


def vp_training_pair(schedule: DiscreteSchedule, x0, noise, t):
    """(x_t, target) of the model's own training loss at integer timesteps t [B]: x_t =
    sqrt(a_t) x0 + sqrt(1 - a_t) noise and the target of its parameterisation (noise for
    epsilon, v = sqrt(a_t) noise - sqrt(1 - a_t) x0, or x0 itself), as diffusers' training
    scripts build them (DDPMScheduler.add_noise / get_velocity), in float32."""
    a = expand_to(jnp.asarray(schedule.alphas_cumprod())[t], x0)
    alpha, s_t = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    x_t = alpha * x0 + s_t * noise
    if schedule.prediction_type == "epsilon":
        return x_t, noise
    if schedule.prediction_type == "v_prediction":
        return x_t, alpha * noise - s_t * x0
    return x_t, x0


def guided_transform(schedule: DiscreteSchedule):
    """What PlanRunner applies to each guided x0 for this schedule: IF's dynamic thresholding
    where the scheduler config asks for it, else None."""
    if not schedule.thresholding:
        return None
    return functools.partial(dynamic_threshold, ratio=schedule.dynamic_thresholding_ratio,
                             max_value=schedule.sample_max_value)


def dynamic_threshold(x0, ratio: float, max_value: float):
    """diffusers' _threshold_sample: per example, s = the `ratio` quantile of |x0| (linear
    interpolation, as torch.quantile) clamped to [1, max_value]; x0 clipped to [-s, s] / s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    q = jnp.clip(jnp.quantile(flat, ratio, axis=1), 1.0, max_value)
    q = q.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -q, q) / q


def vp_denoiser(network: Callable, schedule: DiscreteSchedule, round_t: bool = False):
    """denoise(x, sigma, *args, **kwargs) = vp_denoise(network, x, sigma, schedule, ...)."""

    def denoise(x, sigma, *args, **kwargs):
        return vp_denoise(network, x, sigma, schedule, *args, round_t=round_t, **kwargs)

    return denoise
