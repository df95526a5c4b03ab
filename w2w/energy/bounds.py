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


def agreement_bound_j(r: Readings) -> float | None:
    """How far apart the window's readings may lie with every meter right, in J; None with fewer than two.

    Each reading's own edge error at the peak power seen (the counter: one update period and its
    resolution; a sampled power: one sampler interval; the 1 s average: AVERAGE_POWER_WINDOW_S of lag),
    plus, where the GPU samples only part of the time, the power range over the unsampled share.
    Unlike gpu_bound_j it leaves out the counter-sample gap: that gap is what is checked against it.
    """
    present = [j for j in (r.counter_j, r.instant_j, r.average_j) if j is not None]
    if len(present) < 2 or r.duration_s <= 0:
        return None
    peak = max(r.power_max_w or 0.0, max(present) / r.duration_s)
    bound = 0.0
    if r.counter_j is not None:
        bound += 2 * NVML_COUNTER_RESOLUTION_J + 2 * peak * (r.counter_period_s or 0.0)
    if r.instant_j is not None:
        bound += 2 * peak * (r.sample_interval_s or 0.0)
    if r.average_j is not None:
        bound += 2 * peak * max(AVERAGE_POWER_WINDOW_S, r.sample_interval_s or 0.0)
    if r.coverage is not None and r.power_max_w is not None and r.power_min_w is not None:
        bound += (1 - r.coverage) * (r.power_max_w - r.power_min_w) * r.duration_s
    return bound


def disagreement(counter_j: float | None, instant_j: float | None, average_j: float | None,
                 bound_j: float | None) -> str | None:
    """The readings and their spread where it exceeds bound_j (a flag for the record); None where they agree."""
    named = {"counter": counter_j, "instant": instant_j, "average": average_j}
    present = {name: j for name, j in named.items() if j is not None}
    if bound_j is None or len(present) < 2:
        return None
    spread = max(present.values()) - min(present.values())
    if spread <= bound_j:
        return None
    shown = ", ".join(f"{name} {j:.3f} J" for name, j in present.items())
    return f"GPU readings disagree: {shown}: spread {spread:.3f} J > bound {bound_j:.3f} J"
