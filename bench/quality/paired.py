"""Means with 95% confidence intervals over seeds (Student t), and paired differences."""

from __future__ import annotations

import math
from typing import Optional, Sequence

# Two-sided 95% quantiles of Student's t, t(0.975; dof) for dof = 1..30 (what 2..31 seeds
# need), for when scipy is not installed.
T_975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
         2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
         2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
         2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)


def t_quantile_975(dof: int) -> float:
    """t(0.975; dof): scipy's if installed, else the table (dof <= 30)."""
    if dof < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {dof}")
    try:
        from scipy import stats
    except ImportError:
        if dof > len(T_975):
            raise ValueError(f"{dof + 1} seeds: the t table stops at {len(T_975) + 1}; "
                             "install scipy for more") from None
        return T_975[dof - 1]
    return float(stats.t.ppf(0.975, dof))


def _usable(value) -> bool:
    return value is not None and math.isfinite(value)


def mean_interval(values: Sequence[Optional[float]]) -> dict:
    """``{"mean", "low", "high", "n"}``: the mean and its 95% interval, mean -/+ t(0.975; n - 1)
    x sample sd / sqrt(n), over the values that are numbers (None and inf, e.g. a budget no
    evaluation fits or a level never reached, are left out; ``n`` says how many counted).
    With one value the interval is None; with none the mean is too."""
    kept = [float(v) for v in values if _usable(v)]
    n = len(kept)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = sum(kept) / n
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def paired_difference(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> dict:
    """Mean and 95% interval of the per-seed differences ``a[i] - b[i]`` (``mean_interval``
    over the seeds where both are numbers)."""
    if len(a) != len(b):
        raise ValueError(f"paired figures need one value per seed on both sides: "
                         f"{len(a)} vs {len(b)}")
    return mean_interval([x - y if _usable(x) and _usable(y) else None for x, y in zip(a, b)])


def below_zero(interval: dict) -> bool:
    """Whether the interval lies wholly below 0, excluding it (False without an interval)."""
    return interval.get("high") is not None and interval["high"] < 0
