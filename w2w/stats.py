"""The 95% interval that fits a cell's runs: mean and Student t where they look normal, else median and order statistics."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

CONFIDENCE = 0.95
# Shapiro-Wilk needs 3 values; below that normality cannot be checked and the median's interval is used.
NORMALITY_MIN_N = 3
NORMAL_P = 0.05  # Shapiro-Wilk p below this: the runs are not taken as normal
# The smallest n whose order-statistics interval of the median reaches 95% coverage (1 - 2 * 0.5**6 > 0.95).
MEDIAN_MIN_N = 6
T, MEDIAN = "t", "median"  # which interval a Summary chose


def is_number(value: Any) -> bool:
    """A measured figure: int or float, not bool, not NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def t_half_width(std: float, n: int) -> float:
    """Half-width of the 95% Student t interval of a mean of n values with sample deviation std."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * std / math.sqrt(n)


def median_rank(n: int) -> tuple[int, float]:
    """(k, coverage): the median's interval is [x_(k), x_(n+1-k)] of the sorted values (1-based), with k
    the largest whose binomial coverage 1 - 2 P(B(n, 1/2) <= k - 1) is >= 95%; below MEDIAN_MIN_N no k
    reaches it, and [min, max] is given with the coverage it has (93.75% for 5 values)."""
    from scipy import stats

    k = 1
    while k + 1 <= (n + 1) // 2 and 1 - 2 * stats.binom.cdf(k, n, 0.5) >= CONFIDENCE:
        k += 1
    return k, float(1 - 2 * stats.binom.cdf(k - 1, n, 0.5))


def shapiro_p(xs: list[float]) -> float | None:
    """Shapiro-Wilk's p-value, None below NORMALITY_MIN_N values; 1.0 where all values are equal."""
    if len(xs) < NORMALITY_MIN_N:
        return None
    if max(xs) == min(xs):
        return 1.0  # no spread: nothing to reject (scipy warns and returns 1 too)
    from scipy import stats

    return float(stats.shapiro(xs).pvalue)


@dataclass(frozen=True)
class Summary:
    """One figure over a cell's runs. Both intervals are kept; `interval` names the one that fits:
    t where normality was checked and not rejected and the t interval of a positive quantity stays
    above zero, else the median's. std, ci95 and the intervals are None for one run."""

    mean: float | None
    std: float | None  # sample standard deviation (n - 1)
    n: int  # runs that have the figure
    ci95: float | None  # half-width of the 95% Student t interval of the mean: mean +- ci95
    median: float | None = None
    median_low: float | None = None  # order-statistics interval of the median
    median_high: float | None = None
    median_cover_pct: float | None = None  # its coverage: >= 95 from MEDIAN_MIN_N runs
    normal_p: float | None = None  # Shapiro-Wilk p; None: too few runs to check
    interval: str | None = None  # T or MEDIAN; None for one run

    @property
    def center(self) -> float | None:
        return self.median if self.interval == MEDIAN else self.mean

    @property
    def low(self) -> float | None:
        if self.interval == MEDIAN:
            return self.median_low
        return None if self.mean is None or self.ci95 is None else self.mean - self.ci95

    @property
    def high(self) -> float | None:
        if self.interval == MEDIAN:
            return self.median_high
        return None if self.mean is None or self.ci95 is None else self.mean + self.ci95

    @property
    def half_width_pct(self) -> float | None:
        """The larger side of the chosen interval as a share of its center (the repeats=auto target)."""
        if self.low is None or self.high is None or not self.center:
            return None
        return 100.0 * max(self.center - self.low, self.high - self.center) / abs(self.center)

    @property
    def cover_pct(self) -> float | None:
        """The coverage of the chosen interval."""
        return self.median_cover_pct if self.interval == MEDIAN else 100 * CONFIDENCE if self.interval else None

    def describe(self) -> str:
        """Which interval, in words: for captions and notes."""
        if self.interval is None:
            return "no interval (one run)"
        if self.interval == T:
            return f"mean, 95% Student t (Shapiro-Wilk p = {self.normal_p:.2g}, n = {self.n})"
        check = "normality not checked (n < 3)" if self.normal_p is None else f"Shapiro-Wilk p = {self.normal_p:.2g}"
        return f"median, order statistics covering {self.median_cover_pct:.1f}% ({check}, n = {self.n})"


def summarize(values: Iterable[Any]) -> Summary:
    """Mean, std, t interval, median and its interval, normality and the chosen interval of the runs'
    figures; runs without one are not counted."""
    xs = sorted(float(v) for v in values if is_number(v))
    n = len(xs)
    if n == 0:
        return Summary(None, None, 0, None)
    mean = math.fsum(xs) / n
    median = (xs[(n - 1) // 2] + xs[n // 2]) / 2
    if n == 1:
        return Summary(mean, None, 1, None, median)
    if xs[-1] - xs[0] <= 1e-9 * abs(mean):  # equal but for rounding (a rate of equal counts over equal times)
        xs = [mean] * n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    ci95 = t_half_width(std, n)
    k, cover = median_rank(n)
    normal_p = shapiro_p(xs)
    positive = xs[0] >= 0
    fits_t = normal_p is not None and normal_p >= NORMAL_P and not (positive and mean - ci95 <= 0)
    return Summary(mean, std, n, ci95, median, xs[k - 1], xs[n - k], 100 * cover, normal_p, T if fits_t else MEDIAN)
