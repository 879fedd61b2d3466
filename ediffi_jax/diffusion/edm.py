"""EDM formulation (Karras et al. 2022) as eDiff-I uses it: preconditioning, loss weight, and
the log-normal training distribution of sigma, optionally truncated to an expert's interval.

Everything here runs in float32 whatever the network's compute dtype, and sigma is always
sigma (the noise standard deviation), never a discrete timestep.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2


@dataclasses.dataclass(frozen=True)
class LogNormalSigma:
    """ln(sigma) ~ N(p_mean, p_std^2): the training distribution of noise levels."""

    p_mean: float = P_MEAN
    p_std: float = P_STD

    def sigma_at_quantile(self, q):
        """The sigma below which a fraction q of the probability mass lies (q=0 -> 0, q=1 -> inf)."""
        q = jnp.asarray(q, jnp.float32)
        return jnp.exp(self.p_mean + self.p_std * ndtri(q))

    def quantile_of_sigma(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        return ndtr((jnp.log(sigma) - self.p_mean) / self.p_std)

    def sample(self, key, shape, q_lo=0.0, q_hi=1.0):
        """Sigmas from the distribution truncated to the mass interval [q_lo, q_hi] (inverse CDF,
        so an expert's samples never leave its interval); the bounds may be traced."""
        u = jax.random.uniform(key, shape, jnp.float32)
        q = q_lo + (q_hi - q_lo) * u
        # Keep strictly inside (0, 1): ndtri(0) = -inf, ndtri(1) = inf.
        eps = 1e-7
        q = jnp.clip(q, jnp.maximum(q_lo, eps), jnp.minimum(q_hi, 1.0 - eps))
        return self.sigma_at_quantile(q)


def sigma_at_quantile_np(q: float, p_mean: float = P_MEAN, p_std: float = P_STD) -> float:
    """Host-side twin of `LogNormalSigma.sigma_at_quantile` for plan building (no device work)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return math.inf
    from scipy.special import ndtri as np_ndtri

    return float(math.exp(p_mean + p_std * float(np_ndtri(q))))


def precondition_coefficients(sigma, sigma_data: float = SIGMA_DATA):
    """c_skip, c_out, c_in, c_noise of EDM, in float32."""
    sigma = jnp.asarray(sigma, jnp.float32)
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / jnp.sqrt(total)
    c_in = 1.0 / jnp.sqrt(total)
    c_noise = jnp.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def sigma_of_c_noise(c_noise):
    """The inverse of c_noise = ln(sigma) / 4, for networks that need sigma itself."""
    return jnp.exp(4.0 * jnp.asarray(c_noise, jnp.float32))


def loss_weight(sigma, sigma_data: float = SIGMA_DATA):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: cancels c_out^2."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def expand_to(v, x):
    """Broadcast a per-example [B] vector against an image batch [B, ...]."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def denoise(
    network: Callable, x, sigma, *args, sigma_data: float = SIGMA_DATA, **kwargs
):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, ...), preconditioning in float32.

    `network(x_in, c_noise, *args, **kwargs)` is the raw F_theta (e.g. a bound U-Net apply).
    `sigma` is per example, shape [B].
    """
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    c_skip, c_out, c_in, c_noise = precondition_coefficients(sigma, sigma_data)
    x32 = x.astype(jnp.float32)
    f = network(expand_to(c_in, x32) * x32, c_noise, *args, **kwargs)
    return expand_to(c_skip, x32) * x32 + expand_to(c_out, x32) * f.astype(jnp.float32)


def edm_loss(denoised, clean, sigma, sigma_data: float = SIGMA_DATA):
    """Per-example weighted squared error lambda(sigma) * ||D - x||^2 (mean over pixels)."""
    err = jnp.square(denoised.astype(jnp.float32) - clean.astype(jnp.float32))
    err = jnp.mean(err, axis=tuple(range(1, err.ndim)))
    return loss_weight(sigma, sigma_data) * err
