"""What an energy window measured: its figures, bounds and the GPU's state at its edges; the idle baseline."""

from __future__ import annotations

from dataclasses import dataclass

from w2w.energy.sampler import Row


@dataclass(frozen=True)
class Window:
    """One measured interval on this rank. Energies in J, times in s."""

    name: str
    start_unix_s: float  # s since the epoch, when the window opened
    duration_s: float  # s
    gpu_j: float | None  # J from `source`; None: no figure (see reason)
    source: str  # nvml_counter | nvml_integrated | none
    counter_gpu_j: float | None = None  # J: difference of NVML's total-energy counter
    integrated_gpu_j: float | None = None  # J: sampled power integrated over the window
    cpu_j: float | None = None  # J: RAPL packages + DRAM of this node (local rank 0 only)
    cpu_zones_j: dict[str, float] | None = None  # J per RAPL zone ("package-0", "package-0/dram")
    reason: str | None = None  # why gpu_j is None
    error: str | None = None  # an NVML read error inside the window that voids gpu_j
    short: bool = False  # shorter than the counter's update period: gpu_j is unreliable
    samples: tuple[Row, ...] = ()  # sampler rows (t monotonic s, *TELEMETRY_COLUMNS) inside the window
    t0_monotonic_s: float = 0.0  # when the window opened (the time base of samples)
    telemetry_errors: tuple[str, ...] = ()  # sampler read errors inside the window
    period_s: float | None = None  # s: the update period of gpu_j's source (None: no figure)
    gpu_bound_j: float | None = None  # J: worst-case bound on gpu_j (w2w.energy.bounds)
    cpu_bound_j: float | None = None  # J: worst-case bound on cpu_j
    cpu_package_j: float | None = None  # J: the RAPL package zones of cpu_j
    cpu_dram_j: float | None = None  # J: the RAPL DRAM zones of cpu_j
    state_start: GpuState | None = None  # the GPU when the window opened (None: no GPU meter)
    state_end: GpuState | None = None
    clock_events: int | None = None  # NVML clock event reasons seen at the edges or by the sampler (bit mask)
    instant_gpu_j: float | None = None  # J: NVML_FI_DEV_POWER_INSTANT samples integrated (None: not offered)
    average_gpu_j: float | None = None  # J: nvmlDeviceGetPowerUsage (1 s average) samples integrated
    agreement_bound_j: float | None = None  # J: how far counter and instant may lie apart (bounds.agreement_bounds_j)
    average_bound_j: float | None = None  # J: how far the 1 s average may lie from either

    @property
    def window_periods(self) -> float | None:
        """The window's length in update periods of its energy source."""
        return self.duration_s / self.period_s if self.period_s else None


@dataclass(frozen=True)
class GpuState:
    """Temperature, SM clock and clock event reasons of the GPU, read at one instant."""

    temp_c: float | None
    sm_clock_mhz: float | None
    clock_events: int | None


@dataclass(frozen=True)
class IdleBaseline:
    """This rank's GPU at rest with the model loaded, before the first cell."""

    idle_power_w: float | None  # W: window energy / duration; None: no meter or not measured
    idle_s: float  # s the baseline lasted
    idle_source: str
    idle_cpu_power_w: float | None  # W: the node's RAPL (local rank 0 only)
    idle_reason: str | None


def cpu_zones(start: dict[str, float] | None, end: dict[str, float] | None) -> dict[str, float] | None:
    if start is None or end is None:
        return None
    return {zone: end[zone] - start[zone] for zone in start}


def zone_sum(zones: dict[str, float] | None, dram: bool) -> float | None:
    """The package zones' energy, or the DRAM zones' (named "package-N/dram" by w2w.energy.rapl)."""
    if zones is None:
        return None
    return sum(j for name, j in zones.items() if name.endswith("/dram") == dram)


def cpu_total(start: dict[str, float] | None, end: dict[str, float] | None) -> float | None:
    zones = cpu_zones(start, end)
    return sum(zones.values()) if zones is not None else None
