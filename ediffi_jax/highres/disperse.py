"""ScaleCrafter's dispersed convolution: a fixed linear map R that turns every 3x3 kernel into a
5x5 one whose conv on a 2x-upsampled input behaves like the 3x3 conv on the original, upsampled.

R (25 x 9) is the least-squares solution of two sets of equations in the 25 unknown taps, for
every 3x3 kernel at once (the official MATLAB `kernel_disperse(3, 5, 3, 2, 0.05)` in numpy):

- structure level: conv5(up(x)) = up(conv3(x)) for an n x n input x, where up is bilinear
  align-corners upsampling by 2 (n -> 2n - 1) and the convs zero-pad to "same" size: one
  equation per (output pixel, input pixel) pair, the coefficient of that input pixel;
- pixel level, weighted by eta: conv5(x) = conv3(x) on the original grid.

With A = [S; eta P] and B = [S'; eta P'] (each row a coefficient, as a function of the taps),
R = argmin ||A R - B||, i.e. (A^T A)^-1 A^T B. Kernels flatten row-major over (kh, kw).
"""
from __future__ import annotations

import functools

import numpy as np

from ediffi_jax.models.layers import KernelMap


def bilinear_upsample_matrix(n: int, scale: int = 2) -> np.ndarray:
    """[m, n] 1-D align-corners linear interpolation, m = scale * (n - 1) + 1."""
    m = scale * (n - 1) + 1
    u = np.zeros((m, n))
    for i in range(m):
        pos = i / scale
        lo = min(int(np.floor(pos)), n - 1)
        frac = pos - lo
        u[i, lo] += 1 - frac
        if frac > 0:
            u[i, lo + 1] += frac
    return u


def conv_coefficients(n: int, k: int) -> np.ndarray:
    """C[(p, j), t]: the coefficient of input pixel j in output pixel p of a k x k 'same'
    zero-padded correlation on an n x n grid, as a function of tap t (all row-major)."""
    r = k // 2
    c = np.zeros((n * n, n * n, k * k))
    for py in range(n):
        for px in range(n):
            for ty in range(k):
                for tx in range(k):
                    jy, jx = py + ty - r, px + tx - r
                    if 0 <= jy < n and 0 <= jx < n:
                        c[py * n + px, jy * n + jx, ty * k + tx] = 1.0
    return c


def structure_equations(small: int, large: int, n: int, scale: int = 2):
    """(S, S'): rows (output pixel of the upsampled grid, input pixel), columns the taps of the
    large / small kernel: conv_large(up(x)) vs up(conv_small(x))."""
    u1 = bilinear_upsample_matrix(n, scale)
    up = np.kron(u1, u1)  # [m*m, n*n], row-major 2-D upsampling
    m = u1.shape[0]
    large_conv = conv_coefficients(m, large)  # [(p, q), t] over the m x m grid
    # conv_large(up x)[p] = sum_t k[t] sum_q C[p, q, t] up[q, j] x_j
    s = np.einsum("pqt,qj->pjt", large_conv, up)
    small_conv = conv_coefficients(n, small)  # [(q, j), t'] on the n x n grid
    # up(conv_small x)[p] = sum_q up[p, q] sum_t' k'[t'] C'[q, j, t'] x_j
    s_prime = np.einsum("pq,qjt->pjt", up, small_conv)
    return s.reshape(-1, large * large), s_prime.reshape(-1, small * small)


def pixel_equations(small: int, large: int, n: int):
    """(P, P'): conv_large(x) vs conv_small(x) on the n x n grid."""
    return (conv_coefficients(n, large).reshape(-1, large * large),
            conv_coefficients(n, small).reshape(-1, small * small))


@functools.lru_cache(maxsize=None)
def dispersion_matrix(small: int = 3, large: int = 5, n: int = 3, scale: int = 2,
                      eta: float = 0.05) -> np.ndarray:
    """R [large^2, small^2] (float64): k_large = R @ k_small, flattened row-major."""
    s, s_prime = structure_equations(small, large, n, scale)
    p, p_prime = pixel_equations(small, large, n)
    a = np.concatenate([s, eta * p])
    b = np.concatenate([s_prime, eta * p_prime])
    r, *_ = np.linalg.lstsq(a, b, rcond=None)
    return r


def disperse_kernel(kernel, r: np.ndarray | None = None):
    """HWIO 3x3 kernel -> HWIO 5x5 dispersed kernel (works on numpy and jax arrays)."""
    return (DISPERSED if r is None else dispersion_map(r))(kernel)


def dispersion_map(r: np.ndarray) -> KernelMap:
    return KernelMap("dispersed", tuple(tuple(float(v) for v in row) for row in np.asarray(r)))


DISPERSED = dispersion_map(dispersion_matrix())  # the conv setting's kernel map (3x3 -> 5x5)
