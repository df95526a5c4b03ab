"""A thread that reads GPU power and telemetry at a fixed interval, and what is derived from its rows."""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from w2w.energy.errors import EnergyError
from w2w.energy.nvml import TELEMETRY_COLUMNS
from w2w.energy.periodic import PeriodicThread

Row = tuple  # (t monotonic s, *TELEMETRY_COLUMNS)


class Sampler:
    """Rows (t, power W, ...) every interval_s while started; read errors are kept, never raised."""

    def __init__(
        self,
        read: Callable[[], tuple[float | None, ...]],
        interval_s: float,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self._read = read
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._times: list[float] = []
        self._rows: list[Row] = []
        self._errors: list[tuple[float, str]] = []
        self._thread = PeriodicThread(self.sample, interval_s, "w2w-energy-sampler", clock)

    @property
    def running(self) -> bool:
        return self._thread.running

    def sample(self) -> None:
        """One reading now (the thread, or a window boundary)."""
        t = self._clock()
        try:
            row = (t, *self._read())
        except EnergyError as exc:
            with self._lock:
                self._errors.append((t, str(exc)))
            return
        with self._lock:
            # Boundary reads and thread reads may finish out of order: keep rows sorted by time.
            at = bisect.bisect(self._times, t)
            self._times.insert(at, t)
            self._rows.insert(at, row)

    def start(self) -> None:
        """Start a fresh recording: earlier rows and errors are dropped."""
        if self.running:
            return
        with self._lock:
            self._times, self._rows, self._errors = [], [], []
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()

    def rows(self, t0: float, t1: float) -> list[Row]:
        with self._lock:
            return self._rows[bisect.bisect_left(self._times, t0) : bisect.bisect_right(self._times, t1)]

    def errors(self, t0: float, t1: float) -> list[str]:
        with self._lock:
            return [message for t, message in self._errors if t0 <= t <= t1]


def _time_integral(points: Sequence[tuple[float, float]], t0: float, t1: float) -> float | None:
    """Integral over [t0, t1] of a quantity linear between its readings, held flat outside them.

    points are in time order; two readings at one instant (the edges of adjacent windows) are a step.
    """
    if not points or t1 <= t0:
        return None
    times = np.array([t for t, _ in points])
    values = np.array([v for _, v in points])
    inside = (times > t0) & (times < t1)
    grid = np.concatenate([[t0], times[inside], [t1]])
    at = np.concatenate([np.interp([t0], times, values), values[inside], np.interp([t1], times, values)])
    return float(np.sum((at[1:] + at[:-1]) / 2 * np.diff(grid)))


def integrate(rows: Sequence[Row], t0: float, t1: float) -> float | None:
    """Energy in J over [t0, t1]: power linear between rows, held flat before the first and after the last."""
    return _time_integral([(row[0], row[1]) for row in rows if row[1] is not None], t0, t1)


def _points(rows: Sequence[Row], name: str) -> list[tuple[float, float]]:
    at = 1 + TELEMETRY_COLUMNS.index(name)
    return [(row[0], row[at]) for row in rows if len(row) > at and row[at] is not None]


def integrate_column(rows: Sequence[Row], name: str, t0: float, t1: float) -> float | None:
    """Energy in J over [t0, t1] from one power column (instant_power_w or average_power_w), as integrate()."""
    return _time_integral(_points(rows, name), t0, t1)


def column(rows: Sequence[Row], name: str) -> list[float]:
    return [value for _, value in _points(rows, name)]


def time_mean(rows: Sequence[Row], name: str, t0: float | None = None, t1: float | None = None) -> float | None:
    """A column's average over [t0, t1] weighted by time, as integrate() weighs power.

    A plain mean over rows would count the two edge readings of every phase window as much as a
    whole sampler interval. Without a span, the rows' own first and last time bound it.
    """
    points = _points(rows, name)
    if not points:
        return None
    start = points[0][0] if t0 is None else t0
    end = points[-1][0] if t1 is None else t1
    if end <= start:  # a single instant: nothing to weigh
        return math.fsum(v for _, v in points) / len(points)
    return _time_integral(points, start, end) / (end - start)


def summarize(
    rows: Sequence[Row], memory_total_mib: float | None, errors: list[str],
    t0: float | None = None, t1: float | None = None,
) -> dict:
    """Per-window telemetry for the record (the paper's Tables IV/V: avg SM %, peak memory %).

    Averages are over the window [t0, t1] (monotonic s; default: the rows' span), weighted by time.
    """
    power, used = column(rows, "power_w"), column(rows, "mem_used_mib")
    mem_used_max = max(used, default=None)
    return {
        "samples": len(rows),
        "power_avg_w": time_mean(rows, "power_w", t0, t1),
        "power_max_w": max(power, default=None),
        "sm_util_avg_pct": time_mean(rows, "sm_util_pct", t0, t1),
        "mem_util_max_pct": max(column(rows, "mem_util_pct"), default=None),
        "mem_used_max_mib": mem_used_max,
        "mem_used_max_pct": 100.0 * mem_used_max / memory_total_mib if mem_used_max is not None and memory_total_mib else None,
        "temp_max_c": max(column(rows, "temp_c"), default=None),
        "sm_clock_avg_mhz": time_mean(rows, "sm_clock_mhz", t0, t1),
        "read_errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def timeline_frame(rows: Sequence[Row], t0: float, start_unix_s: float, rank: int) -> pd.DataFrame:
    """Rows as a table: t_s since the window opened, unix_s wall clock, then TELEMETRY_COLUMNS."""
    width = len(TELEMETRY_COLUMNS)  # a row without the later columns (both powers) leaves them empty
    frame = pd.DataFrame([(*row[1:], *(None,) * (width + 1 - len(row))) for row in rows],
                         columns=list(TELEMETRY_COLUMNS), dtype="float64")
    times = np.array([row[0] for row in rows], dtype="float64") - t0
    frame.insert(0, "t_s", times)
    frame.insert(1, "unix_s", start_unix_s + times)
    frame.insert(0, "rank", np.full(len(rows), rank, dtype="int32"))
    return frame
