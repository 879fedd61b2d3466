"""Expert noise intervals, defined as probability-mass quantiles of the training log-normal.

eDiff-I grows experts as a binary tree: at level l the distribution p(sigma) splits into 2^l
intervals of equal probability mass; node E^l_i owns the i-th (i = 0 is the lowest noise). The
released base model (Config-D) keeps three experts: E^9_511 (top 1/512 of the mass), E^3_0 (lowest
1/8) and one complement model for everything in between.

An interval owns the sigmas in (sigma_lo, sigma_hi]; a layout of intervals must tile (0, inf).
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Sequence

from ediffi_jax.diffusion.edm import P_MEAN, P_STD, sigma_at_quantile_np


@dataclasses.dataclass(frozen=True)
class ExpertInterval:
    """The mass interval (q_lo, q_hi] of p(sigma) that one expert owns; name is for humans."""

    q_lo: Fraction
    q_hi: Fraction
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "q_lo", Fraction(self.q_lo))
        object.__setattr__(self, "q_hi", Fraction(self.q_hi))
        if not (0 <= self.q_lo < self.q_hi <= 1):
            raise ValueError(
                f"expert interval {self.name or ''} needs 0 <= q_lo < q_hi <= 1, "
                f"got q_lo={self.q_lo}, q_hi={self.q_hi}"
            )

    def sigma_bounds(self, p_mean: float = P_MEAN, p_std: float = P_STD) -> tuple[float, float]:
        return (
            sigma_at_quantile_np(float(self.q_lo), p_mean, p_std),
            sigma_at_quantile_np(float(self.q_hi), p_mean, p_std),
        )


def tree_node(level: int, index: int) -> ExpertInterval:
    """E^level_index of the binary tree: the index-th of 2^level equal-mass intervals."""
    if level < 0 or not 0 <= index < 2**level:
        raise ValueError(f"tree node E^{level}_{index} does not exist (index must be < 2^{level})")
    n = 2**level
    return ExpertInterval(Fraction(index, n), Fraction(index + 1, n), f"E^{level}_{index}")


def split(interval: ExpertInterval) -> tuple[ExpertInterval, ExpertInterval]:
    """The two equal-mass children of an interval (the paper's binary split)."""
    mid = (interval.q_lo + interval.q_hi) / 2
    return (
        ExpertInterval(interval.q_lo, mid, f"{interval.name}/low"),
        ExpertInterval(mid, interval.q_hi, f"{interval.name}/high"),
    )


def complement(others: Sequence[ExpertInterval], name: str = "complement") -> ExpertInterval:
    """The single interval that, with `others`, tiles (0, 1] (the paper's M_C)."""
    ordered = sorted(others, key=lambda iv: iv.q_lo)
    gaps = []
    cursor = Fraction(0)
    for iv in ordered:
        if iv.q_lo > cursor:
            gaps.append((cursor, iv.q_lo))
        cursor = max(cursor, iv.q_hi)
    if cursor < 1:
        gaps.append((cursor, Fraction(1)))
    if len(gaps) != 1:
        raise ValueError(f"the complement of {[iv.name for iv in others]} is not one interval: {gaps}")
    return ExpertInterval(gaps[0][0], gaps[0][1], name)


def validate_layout(intervals: Sequence[ExpertInterval]) -> None:
    """Intervals, in order of increasing noise, must tile (0, 1] of the mass: no gap, no overlap."""
    if not intervals:
        raise ValueError("an expert layout needs at least one interval")
    if intervals[0].q_lo != 0:
        raise ValueError(
            f"expert intervals leave a gap: nothing owns quantiles (0, {intervals[0].q_lo}] "
            f"(sigma up to {intervals[0].sigma_bounds()[0]:.4g})"
        )
    for a, b in zip(intervals, intervals[1:]):
        if b.q_lo > a.q_hi:
            lo, hi = a.sigma_bounds()[1], b.sigma_bounds()[0]
            raise ValueError(
                f"expert intervals leave a gap between {a.name or a} and {b.name or b}: "
                f"quantiles ({a.q_hi}, {b.q_lo}], sigma ({lo:.4g}, {hi:.4g}]"
            )
        if b.q_lo < a.q_hi:
            raise ValueError(
                f"expert intervals overlap: {a.name or a} ends at quantile {a.q_hi} but "
                f"{b.name or b} starts at {b.q_lo} (sort them by noise and make them disjoint)"
            )
    if intervals[-1].q_hi != 1:
        raise ValueError(
            f"expert intervals leave a gap: nothing owns quantiles ({intervals[-1].q_hi}, 1] "
            f"(sigma above {intervals[-1].sigma_bounds()[1]:.4g})"
        )


def owner(intervals: Sequence[ExpertInterval], sigma: float, p_mean=P_MEAN, p_std=P_STD) -> int:
    """Index of the interval that owns sigma: sigma in (sigma_lo, sigma_hi]."""
    for i, iv in enumerate(intervals):
        lo, hi = iv.sigma_bounds(p_mean, p_std)
        if lo < sigma <= hi:
            return i
    if sigma <= 0:
        return 0
    raise ValueError(f"no expert owns sigma={sigma}")  # unreachable for a validated layout


SINGLE = (ExpertInterval(0, 1, "all"),)

# eDiff-I base-model layouts (paper Table 1). Ordered by increasing noise.
_E9_511 = tree_node(9, 511)
_E3_0 = tree_node(3, 0)
CONFIG_LAYOUTS: dict[str, tuple[ExpertInterval, ...]] = {
    "A": SINGLE,
    "B": SINGLE,  # Config-B adds experts to SR256 only; the base model is a single network.
    "C": (complement([_E9_511], "M_C"), _E9_511),
    "D": (_E3_0, complement([_E3_0, _E9_511], "M_C"), _E9_511),
}


def resolve_layout(spec) -> tuple[ExpertInterval, ...]:
    """A layout from config: a name in CONFIG_LAYOUTS ("A".."D"), or a list of (q_lo, q_hi)
    mass intervals ordered by noise, e.g. [("0", "1/8"), ("1/8", "511/512"), ("511/512", "1")]."""
    if isinstance(spec, str):
        if spec not in CONFIG_LAYOUTS:
            raise ValueError(
                f"unknown expert layout {spec!r}; use one of {sorted(CONFIG_LAYOUTS)} "
                "or a list of (q_lo, q_hi) quantile pairs"
            )
        return CONFIG_LAYOUTS[spec]
    try:
        layout = tuple(
            ExpertInterval(Fraction(str(lo)), Fraction(str(hi)), f"q({lo},{hi}]") for lo, hi in spec
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"expert layout {spec!r} is not a list of (q_lo, q_hi) pairs: {e}") from e
    validate_layout(layout)
    return layout
