"""Statistics over a cell's repeats: mean, standard deviation, n and a 95% Student t interval."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Student t's two-sided 95% quantile (0.975) for 1..30 degrees of freedom (scipy is not a dependency).
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z_975 = 1.959964
# Suffixes of the columns that go with each metric column of the cells table (the metric column is the mean).
STD, N, CI95 = "_std", "_n", "_ci95"


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with df degrees of freedom: the table up to 30, beyond it
    the Cornish-Fisher expansion around the normal quantile (within 1e-4 of the exact value there)."""
    if df < 1:
        raise ValueError(f"t quantile needs df >= 1, not {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def is_number(value: Any) -> bool:
    """A measured figure: int or float, not bool, not NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


@dataclass(frozen=True)
class Summary:
    """One metric over a cell's runs; std and ci95 are None for one run (no spread to estimate)."""

    mean: float | None
    std: float | None  # sample standard deviation (n - 1)
    n: int  # runs that have the figure
    ci95: float | None  # half-width of the 95% interval of the mean: mean +- ci95

    @property
    def low(self) -> float | None:
        return None if self.mean is None or self.ci95 is None else self.mean - self.ci95

    @property
    def high(self) -> float | None:
        return None if self.mean is None or self.ci95 is None else self.mean + self.ci95


def summarize(values: Iterable[Any]) -> Summary:
    """Mean, standard deviation, n and 95% interval of the runs' figures; runs without one are not counted."""
    xs = [float(v) for v in values if is_number(v)]
    n = len(xs)
    if n == 0:
        return Summary(None, None, 0, None)
    mean = math.fsum(xs) / n
    if n == 1:
        return Summary(mean, None, 1, None)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(mean, std, n, t_975(n - 1) * std / math.sqrt(n))


def overlap(a: tuple[float | None, float | None], b: tuple[float | None, float | None]) -> bool | None:
    """Whether two (mean, ci95) intervals overlap; None where either has no interval (one run)."""
    (ma, ha), (mb, hb) = a, b
    if not (is_number(ma) and is_number(ha) and is_number(mb) and is_number(hb)):
        return None
    return abs(ma - mb) <= ha + hb
