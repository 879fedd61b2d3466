"""Exact denoisers for known data distributions, to test samplers without a network."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# A 1-D, two-component Gaussian mixture: zero mean (so the N(0, sigma_max^2) prior of the sampler
# matches the true marginal) and well separated (so samples can be assigned to components).
GMM = dict(
    weights=np.array([0.3, 0.7], np.float32),
    means=np.array([-1.05, 0.45], np.float32),
    stds=np.array([0.15, 0.25], np.float32),
)


def gmm_denoise(params, x, sigma, cond=None, settings=None):
    """E[x0 | x_sigma = x] for iid pixels x0 ~ sum_k w_k N(mu_k, s_k^2): closed form."""
    w, mu, s = params["weights"], params["means"], params["stds"]
    sig = jnp.reshape(sigma, sigma.shape + (1,) * (x.ndim - 1))[..., None]
    xk = x[..., None]
    var = s**2 + sig**2
    log_post = jnp.log(w) - 0.5 * jnp.log(var) - 0.5 * (xk - mu) ** 2 / var
    post = jax.nn.softmax(log_post, axis=-1)
    mean_k = mu + (s**2 / var) * (xk - mu)
    return jnp.sum(post * mean_k, axis=-1)


def component_stats(samples: np.ndarray, params=GMM):
    """Empirical weight, mean and variance per component (assigned by the midpoint threshold)."""
    samples = np.asarray(samples).ravel()
    threshold = float(params["means"].mean())
    groups = [samples[samples < threshold], samples[samples >= threshold]]
    return (
        np.array([len(g) / len(samples) for g in groups]),
        np.array([g.mean() for g in groups]),
        np.array([g.var() for g in groups]),
    )


def expected_component_stats(params=GMM):
    """The exact values `component_stats` converges to: weight, mean and variance of the mixture
    on each side of the threshold (a few far-tail points of one component cross it)."""
    from scipy import integrate
    from scipy.stats import norm

    w, mu, s = (np.asarray(params[k], np.float64) for k in ("weights", "means", "stds"))
    density = lambda x: float(np.sum(w * norm.pdf(x, mu, s)))  # noqa: E731
    threshold = float(mu.mean())
    out = []
    for lo, hi in ((-np.inf, threshold), (threshold, np.inf)):
        m0 = integrate.quad(density, lo, hi)[0]
        m1 = integrate.quad(lambda x: x * density(x), lo, hi)[0] / m0
        m2 = integrate.quad(lambda x: (x - m1) ** 2 * density(x), lo, hi)[0] / m0
        out.append((m0, m1, m2))
    return tuple(np.array(v) for v in zip(*out))
