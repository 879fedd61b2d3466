"""Noise-level schedules for sampling, in sigma (host-side numpy: plans are built before tracing)."""
from __future__ import annotations

import numpy as np


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> np.ndarray:
    """EDM eq. 5: num_steps sigmas from sigma_max down to sigma_min, spaced uniformly in
    sigma^(1/rho), with a final 0 appended (shape [num_steps + 1], float64)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return np.append(sigmas, 0.0)
