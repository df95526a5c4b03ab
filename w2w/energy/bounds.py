"""The uncertainty bound of one energy window, from its sensor's resolution and update period."""

from __future__ import annotations

from dataclasses import dataclass

# NVML's total-energy counter counts whole mJ.
NVML_COUNTER_RESOLUTION_J = 0.001
# RAPL's energy status registers update about every 1 ms (Intel SDM vol. 3B, 14.10.3) in units
# of 2^-ESU J; ESU is 14 on most parts (61 µJ), finer on some DRAM domains: the coarser is assumed.
RAPL_UPDATE_S = 0.001
RAPL_RESOLUTION_J = 2.0**-14
# Per-GPU sensor facts, by a fragment of NVML's device name: the share of the time its power
# reading actually samples (A100/H100: 25 ms of every 100 ms, arXiv 2312.02741). A GPU not listed
# has no such term in its bound (unknown, not zero).
POWER_SAMPLE_COVERAGE = {"A100": 0.25, "H100": 0.25}
# nvmlDeviceGetPowerUsage averages over the last 1 s on Ampere and newer (arXiv 2312.02741): its
# integral lags the draw by up to this long at each edge of a window.
AVERAGE_POWER_WINDOW_S = 1.0


def power_sample_coverage(gpu_name: str | None) -> float | None:
    """The share of the time this GPU's power reading samples, where it is known."""
    return next((c for fragment, c in POWER_SAMPLE_COVERAGE.items() if gpu_name and fragment in gpu_name), None)


@dataclass(frozen=True)
class GpuReading:
    """What one window saw on the GPU: its figures in J, its span and the sampled power's range in W."""

    source: str  # nvml_counter | nvml_integrated
    duration_s: float
    period_s: float | None  # the counter's update period, or the sampler's interval (integrated)
    counter_j: float | None
    integrated_j: float | None
    power_max_w: float | None
    power_min_w: float | None
    coverage: float | None  # power_sample_coverage of the GPU


def gpu_bound_j(reading: GpuReading) -> float | None:
    """A worst-case bound in J on the window's GPU figure; None where there is no figure or period.

    Counter: at each edge the counter may lag by one update period at the peak power seen, plus
    its resolution; and the counter and the integrated samples may disagree by what they differ.
    Integrated: at each edge the power is held or interpolated over one sampler interval; and where
    the GPU samples only part of the time, the power between samples may lie anywhere in the range seen.
    """
    r = reading
    figure = r.counter_j if r.source == "nvml_counter" else r.integrated_j
    if figure is None or r.period_s is None or r.duration_s <= 0:
        return None
    peak = max(r.power_max_w or 0.0, figure / r.duration_s)
    edges = 2 * peak * r.period_s
    if r.source == "nvml_counter":
        gap = abs(r.counter_j - r.integrated_j) if r.integrated_j is not None else 0.0
        return 2 * NVML_COUNTER_RESOLUTION_J + edges + gap
    unsampled = 0.0
    if r.coverage is not None and r.power_max_w is not None and r.power_min_w is not None:
        unsampled = (1 - r.coverage) * (r.power_max_w - r.power_min_w) * r.duration_s
    return edges + unsampled


def cpu_bound_j(energy_j: float | None, duration_s: float, zones: int, read_s: float) -> float | None:
    """A worst-case bound in J on a RAPL window figure: at each edge, every zone's resolution and
    its update period plus the time the read of all zones took (the read timer), at the window's power."""
    if energy_j is None or duration_s <= 0:
        return None
    power = energy_j / duration_s
    return 2 * (zones * RAPL_RESOLUTION_J + power * (RAPL_UPDATE_S + read_s))


@dataclass(frozen=True)
class Readings:
    """A window's three GPU readings in J (None: the GPU lacks it) and what may separate them honestly."""

    counter_j: float | None
    instant_j: float | None  # NVML_FI_DEV_POWER_INSTANT integrated over the window
    average_j: float | None  # nvmlDeviceGetPowerUsage (1 s average) integrated over the window
    duration_s: float
    counter_period_s: float | None  # the counter's update period
    sample_interval_s: float | None  # the sampler's
    power_max_w: float | None
    power_min_w: float | None
    coverage: float | None


def _edge_terms(r: Readings) -> tuple[float, dict[str, float]]:
    """The unsampled-range term and each present reading's own edge error in J, at the peak power seen."""
    present = {"counter": r.counter_j, "instant": r.instant_j, "average": r.average_j}
    present = {name: j for name, j in present.items() if j is not None}
    peak = max(r.power_max_w or 0.0, max(present.values(), default=0.0) / r.duration_s)
    own = {"counter": 2 * NVML_COUNTER_RESOLUTION_J + 2 * peak * (r.counter_period_s or 0.0),
           "instant": 2 * peak * (r.sample_interval_s or 0.0),
           "average": 2 * peak * max(AVERAGE_POWER_WINDOW_S, r.sample_interval_s or 0.0)}
    unsampled = 0.0
    if r.coverage is not None and r.power_max_w is not None and r.power_min_w is not None:
        unsampled = (1 - r.coverage) * (r.power_max_w - r.power_min_w) * r.duration_s
    return unsampled, {name: own[name] for name in present}


def agreement_bounds_j(r: Readings) -> tuple[float | None, float | None]:
    """How far apart the window's readings may lie with every meter right, in J: (counter vs instant,
    the 1 s average vs the others); None where a pair lacks a reading.

    Each reading's own edge error at the peak power seen (the counter: one update period and its
    resolution; a sampled power: one sampler interval; the 1 s average: AVERAGE_POWER_WINDOW_S of lag),
    plus, where the GPU samples only part of the time, the power range over the unsampled share.
    Unlike gpu_bound_j they leave out the counter-sample gap: that gap is what is checked against them.
    The average's lag is its own bound, so that it does not hide a counter-instant gap in short windows.
    """
    if r.duration_s <= 0:
        return None, None
    unsampled, own = _edge_terms(r)
    pair = own["counter"] + own["instant"] + unsampled if {"counter", "instant"} <= set(own) else None
    others = [own[n] for n in ("counter", "instant") if n in own]
    average = own["average"] + max(others) + unsampled if "average" in own and others else None
    return pair, average


def disagreement(counter_j: float | None, instant_j: float | None, average_j: float | None,
                 bound_j: float | None, average_bound_j: float | None = None) -> str | None:
    """The readings and their spread where a pair lies further apart than its bound (counter vs instant:
    bound_j; the average vs either: average_bound_j); None where they agree or cannot be compared."""
    named = {"counter": counter_j, "instant": instant_j, "average": average_j}
    present = {name: j for name, j in named.items() if j is not None}
    gaps = []
    if bound_j is not None and counter_j is not None and instant_j is not None:
        gaps.append((abs(counter_j - instant_j), bound_j))
    if average_bound_j is not None and average_j is not None:
        gaps += [(abs(average_j - present[n]), average_bound_j) for n in ("counter", "instant") if n in present]
    over = [(gap, bound) for gap, bound in gaps if gap > bound]
    if not over:
        return None
    gap, bound = max(over, key=lambda g: g[0] - g[1])
    shown = ", ".join(f"{name} {j:.3f} J" for name, j in present.items())
    return f"GPU readings disagree: {shown}: {gap:.3f} J apart > bound {bound:.3f} J"
