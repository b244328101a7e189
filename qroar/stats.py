"""Sampling intervals: how far a number measured on a few windows or documents could move on more text.

Two estimators, both plain functions of per-unit sums, no model needed:

1. `ratio_interval`: a mean per token (log-perplexity = sum nll / sum tokens) over units (blocks of
   tokens, windows, documents) of unequal size. Standard error by linearising the ratio:
   se^2 = n / (n - 1) * sum_i (x_i - R t_i)^2 / (sum_i t_i)^2, R = sum x / sum t.
2. `paired_interval`: the difference of two such means measured on the same units (a variant
   against another on the same windows): the ratio interval of the per-unit differences, so the
   text both share cancels and only the change is left.

Intervals are two-sided 95% Student t intervals with n - 1 degrees of freedom (`t95`).
"""

from __future__ import annotations

import math
from typing import Sequence

# two-sided 95%: the 0.975 quantile of Student's t with df = 1..30 degrees of freedom
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)
_Z95 = 1.959964


def t95(df: int) -> float:
    """Half-width multiplier of a two-sided 95% t interval; nan without a degree of freedom."""
    if df < 1:
        return float("nan")
    if df <= len(_T95):
        return _T95[df - 1]
    z, n = _Z95, float(df)  # Cornish-Fisher expansion in 1/df: below 1e-4 off for df > 30
    return (z + (z**3 + z) / (4 * n) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3))


def ratio_interval(x: Sequence[float], t: Sequence[float]) -> tuple[float, float, int]:
    """(sum x / sum t, its standard error, units) over units with totals x_i and sizes t_i.
    The standard error is nan with fewer than two units."""
    n, sx, st = len(x), float(sum(x)), float(sum(t))
    if n == 0 or st <= 0:
        return float("nan"), float("nan"), n
    r = sx / st
    if n < 2:
        return r, float("nan"), n
    ss = sum((xi - r * ti) ** 2 for xi, ti in zip(x, t))
    return r, math.sqrt(n / (n - 1) * ss) / st, n


def paired_interval(xa: Sequence[float], xb: Sequence[float], t: Sequence[float]) -> tuple[float, float, int]:
    """(mean of b per token - mean of a per token, its standard error, units), a and b measured on the same units."""
    if not len(xa) == len(xb) == len(t):
        raise ValueError(f"paired units differ in number: {len(xa)}, {len(xb)}, {len(t)}")
    return ratio_interval([b - a for a, b in zip(xa, xb)], t)


def half_width(se: float, units: int) -> float:
    """Half-width of the 95% interval of an estimate with standard error se from `units` units."""
    return t95(units - 1) * se if units >= 2 and math.isfinite(se) else float("nan")
