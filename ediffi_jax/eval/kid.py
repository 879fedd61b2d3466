"""Kernel Inception Distance as clean-fid and torch-fidelity compute it.

KID (Binkowski et al. 2018) is the squared maximum mean discrepancy between two feature sets
under the polynomial kernel k(x, y) = (x . y / d + 1)^3, estimated without bias and averaged
over `num_subsets` random subsets of `min(n_a, n_b, max_subset_size)` features from each set
(clean-fid's `kernel_distance`, torch-fidelity's `kid_subsets=100, kid_subset_size=1000`).
Unlike FID it has an unbiased estimator, so sets of a few hundred images compare fairly; it
needs no covariance, so it works with fewer images than feature dimensions.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

NUM_SUBSETS = 100
MAX_SUBSET_SIZE = 1000


class KID(NamedTuple):
    mean: float
    std: float  # over the subsets (numpy's population std, as torch-fidelity reports it)
    subset_size: int
    num_subsets: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x y^T / d + 1)^3 for rows x [n, d] and y [m, d]: KID's kernel (degree 3, gamma 1/d,
    coef0 1)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 of two equal-size sets: the within-set kernel means leave the
    diagonal out, the cross-set mean keeps every pair."""
    m = len(x)
    within = polynomial_kernel(x, x) + polynomial_kernel(y, y)
    return float((within.sum() - np.trace(within)) / (m * (m - 1))
                 - 2.0 * polynomial_kernel(x, y).sum() / (m * m))


def kernel_inception_distance(features_a, features_b, *, num_subsets: int = NUM_SUBSETS,
                              max_subset_size: int = MAX_SUBSET_SIZE, seed: int = 0) -> KID:
    """KID of two feature sets [n_a, d] and [n_b, d] (any order of a and b gives the same
    distribution of subsets' values); the subsets are drawn without replacement from a numpy
    generator seeded with `seed`, so a call is deterministic."""
    a, b = (np.asarray(f, np.float64) for f in (features_a, features_b))
    for name, f in (("first", a), ("second", b)):
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"KID needs features [N >= 2, D]; the {name} set is {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError(f"KID: the {name} feature set holds non-finite values")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"KID: the feature sets have {a.shape[1]} and {b.shape[1]} dimensions")
    if num_subsets < 1 or max_subset_size < 2:
        raise ValueError(f"KID needs num_subsets >= 1 and max_subset_size >= 2, got "
                         f"{num_subsets} and {max_subset_size}")
    m = min(len(a), len(b), max_subset_size)
    rng = np.random.default_rng(seed)
    values = np.array([unbiased_mmd2(a[rng.choice(len(a), m, replace=False)],
                                     b[rng.choice(len(b), m, replace=False)])
                       for _ in range(num_subsets)])
    return KID(float(values.mean()), float(values.std()), m, num_subsets)
