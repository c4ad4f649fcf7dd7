"""Summaries over seeds: mean and the half-width of a two-sided Student-t confidence interval."""

from __future__ import annotations

import math

import numpy as np


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of the ``level`` t-interval for the mean of ``values`` (i.i.d. draws: one per seed).

    One value has no spread: half-width ``nan`` (shown as "1 seed"), never 0, which would claim certainty."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1) (got {level})")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan")
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, float(stats.t.ppf(0.5 + level / 2, x.size - 1) * sem)
