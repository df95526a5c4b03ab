"""The cells table's statistics over repeats: its columns per metric, and tests of whether two cells differ."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from w2w.stats import CONFIDENCE, MEDIAN, Summary, T, is_number, summarize

__all__ = ["CONFIDENCE", "MEDIAN", "Summary", "T", "is_number", "summarize"]

# Suffixes of the columns that go with each metric column of the cells table (the metric column is the mean).
STD, N, CI95 = "_std", "_n", "_ci95"
MEDIAN_COL, MEDIAN_LOW, MEDIAN_HIGH, COVER = "_median", "_median_low", "_median_high", "_median_cover_pct"
NORMAL_P, INTERVAL, LOW, HIGH, RUNS = "_normal_p", "_interval", "_low", "_high", "_runs"
# The columns whose runs' values are kept (as a JSON list in <metric>_runs) for the tests between cells.
COMPARED = ("energy_per_token_j", "energy_per_correct_j", "tokens_per_s", "seconds_per_response",
            "responses_per_s", "energy_per_s_w", "energy_j", "total_s")
SIGNIFICANCE = 1 - CONFIDENCE  # p below this: the difference is called significant


def summary_columns(column: str, summary: Summary) -> dict:
    """The cells-table columns of one metric over the runs: the mean in `column`, then both intervals,
    the normality check, which interval fits (t or median) and its bounds."""
    return {column: summary.mean, column + STD: summary.std, column + N: summary.n, column + CI95: summary.ci95,
            column + MEDIAN_COL: summary.median, column + MEDIAN_LOW: summary.median_low,
            column + MEDIAN_HIGH: summary.median_high, column + COVER: summary.median_cover_pct,
            column + NORMAL_P: summary.normal_p, column + INTERVAL: summary.interval,
            column + LOW: summary.low, column + HIGH: summary.high}


def row_summary(row: dict, column: str) -> Summary | None:
    """The Summary of a cells-table row's metric, rebuilt from its runs (None: no runs kept)."""
    runs = run_values(row, column)
    return summarize(runs) if runs else None


def run_values(row: dict, column: str) -> list[float]:
    """The runs' values of a metric that the reducer kept in <column>_runs."""
    text = row.get(column + RUNS)
    return [float(v) for v in json.loads(text) if is_number(v)] if isinstance(text, str) and text else []


def chosen(row: dict, column: str) -> tuple[float | None, float | None, float | None, str | None]:
    """(center, low, high, interval) of a row's metric: the interval that fits; the mean alone for one run."""
    kind = row.get(column + INTERVAL)
    if kind not in (T, MEDIAN):
        return row.get(column), None, None, None
    center = row.get(column + MEDIAN_COL) if kind == MEDIAN else row.get(column)
    return center, row.get(column + LOW), row.get(column + HIGH), kind


@dataclass(frozen=True)
class Difference:
    """Whether two cells' runs of one metric differ: the test that fits, its statistic and p-value,
    and the difference (a - b) with its 95% interval where the test gives one."""

    test: str  # "Welch t" or "Mann-Whitney U"
    statistic: float
    p: float
    n_a: int
    n_b: int
    difference: float  # mean difference (Welch) or Hodges-Lehmann shift: median of pairwise differences
    low: float | None = None
    high: float | None = None

    @property
    def significant(self) -> bool:
        return self.p < SIGNIFICANCE

    def numbers(self) -> str:
        """The test's numbers: "Welch t = 3.2, p = 0.012, n = 3, 3"."""
        name = "t" if self.test == "Welch t" else "U"
        return f"{self.test}: {name} = {self.statistic:.3g}, p = {self.p:.2g}, n = {self.n_a}, {self.n_b}"

    def interval_text(self, unit: str = "") -> str:
        kind = "mean difference" if self.test == "Welch t" else "median shift (Hodges-Lehmann)"
        text = f"{kind} {self.difference:+.4g}"
        if self.low is not None and self.high is not None:
            text += f", 95% interval [{self.low:+.4g}, {self.high:+.4g}]"
        return f"{text} {unit}".rstrip()


def difference(a: list[float], b: list[float]) -> Difference | None:
    """Welch's t where both samples passed the normality check (summarize's t), else Mann-Whitney U;
    None where either has fewer than 2 runs."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    if summarize(a).interval == T and summarize(b).interval == T:
        result = stats.ttest_ind(a, b, equal_var=False)
        low, high = _welch_interval(a, b)
        diff = math.fsum(a) / len(a) - math.fsum(b) / len(b)
        return Difference("Welch t", float(result.statistic), _p(result.pvalue), len(a), len(b), diff, low, high)
    result = stats.mannwhitneyu(a, b, alternative="two-sided")
    shift = float(statistics.median(x - y for x in a for y in b))
    return Difference("Mann-Whitney U", float(result.statistic), _p(result.pvalue), len(a), len(b), shift)


def _p(value: Any) -> float:
    return 1.0 if math.isnan(float(value)) else float(value)  # identical constant samples: nothing differs


def _welch_interval(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """The 95% interval of mean(a) - mean(b), Welch-Satterthwaite degrees of freedom."""
    from scipy import stats

    va, vb = stats.tvar(a) / len(a), stats.tvar(b) / len(b)
    if va + vb == 0:
        return None, None
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * math.sqrt(va + vb)
    diff = math.fsum(a) / len(a) - math.fsum(b) / len(b)
    return diff - half, diff + half


def compare_rows(a: dict, b: dict, column: str, unit: str = "") -> str | None:
    """One phrase on whether two cells differ in a metric, with the test's numbers; None without runs."""
    found = difference(run_values(a, column), run_values(b, column))
    if found is None:
        return None
    if found.significant:
        return f"differ ({found.interval_text(unit)}; {found.numbers()})"
    return f"not distinguishable ({found.numbers()}; {found.interval_text(unit)})"
