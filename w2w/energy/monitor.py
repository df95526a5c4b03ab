"""EnergyMonitor: named measurement windows on this rank's GPU (and its node's CPUs), or no meter and why."""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from w2w.energy import gpustate
from w2w.energy.bounds import (
    GpuReading,
    Readings,
    agreement_bounds_j,
    cpu_bound_j,
    gpu_bound_j,
    power_sample_coverage,
)
from w2w.energy.errors import EnergyError, GpuError, WindowError
from w2w.energy.nvml import GpuMeter, call, import_nvml, open_gpu_meter
from w2w.energy.rapl import POWERCAP_ROOT, RAPL_POLL_INTERVAL_S, RaplMeter, RaplPoller, open_rapl
from w2w.energy.sampler import Row, Sampler, column, integrate, integrate_column
from w2w.energy.window import GpuState, IdleBaseline, Window, cpu_total, cpu_zones, zone_sum

log = logging.getLogger("w2w.energy")
# NVML's energy counter updates every 20-100 ms depending on the GPU; shorter windows can read
# zero. Each monitor infers its GPU's period at open; this is the fallback where it cannot.
MIN_TRUSTED_WINDOW_S = 0.1
PERIOD_POLL_S = 0.002  # s between counter reads while inferring its update period
PERIOD_CHANGES = 5  # counter changes to see: 4 periods, their median is the period
PERIOD_TIMEOUT_S = 1.0  # an idle GPU whose counter does not move in this long keeps the fallback
SOURCE_COUNTER = "nvml_counter"  # NVML's total-energy counter, read at both ends of the window
SOURCE_INTEGRATED = "nvml_integrated"  # the sampler's power readings integrated over the window
SOURCE_NONE = "none"


@dataclass
class _Open:
    t0_monotonic_s: float
    start_unix_s: float
    counter_mj: int | None
    cpu_j: dict[str, float] | None
    errors: list[str] = field(default_factory=list)
    cpu_read_s: float = 0.0  # s the RAPL read at the opening edge took
    state: GpuState | None = None


def device_sync(device: torch.device) -> Callable[[], None]:
    """Wait for the work queued on `device`, so a window holds what was launched inside it."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def infer_counter_period(
    read_mj: Callable[[], int], clock: Callable[[], float], sleep: Callable[[float], None],
) -> float | None:
    """The update period in s of an energy counter: the median time between its changes, read
    every PERIOD_POLL_S (as Zeus infers NVML's power update period). None: it did not move often
    enough within PERIOD_TIMEOUT_S (an idle GPU at 0 W, or read errors)."""
    changes: list[float] = []
    start = clock()
    try:
        last = read_mj()
        while len(changes) < PERIOD_CHANGES and clock() - start < PERIOD_TIMEOUT_S:
            sleep(PERIOD_POLL_S)
            value = read_mj()
            if value != last:
                changes.append(clock())
                last = value
    except GpuError:
        return None
    gaps = sorted(b - a for a, b in itertools.pairwise(changes))
    return gaps[len(gaps) // 2] if gaps else None


class EnergyMonitor:
    """begin_window/end_window pairs (nestable) on this rank's own GPU.

    nvml: a pynvml-like module; leave None for the real one. Passing one also meters a CPU run,
    which only tests do (their fake GPU); production never claims a GPU meter on a CPU device.
    sync: waits for the device at window edges (default: torch's for CUDA devices).
    counter_period_s: the GPU energy counter's update period; None infers it at open.
    """

    def __init__(
        self,
        backend: str,
        device: torch.device,
        *,
        sample_interval_s: float = 0.1,
        sampler: bool = True,
        instant_power: bool = True,
        rapl: bool = False,
        local_rank: int = 0,
        nvml: ModuleType | None = None,
        rapl_root: Path = POWERCAP_ROOT,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        sync: Callable[[], None] | None = None,
        counter_period_s: float | None = None,
        rapl_interval_s: float = RAPL_POLL_INTERVAL_S,
    ):
        self.backend = backend
        self.device = device
        self.reason: str | None = None
        self.meter: GpuMeter | None = None
        self.source = SOURCE_NONE
        self._clock = clock
        self._sleep = sleep
        self._sync = sync or device_sync(device)
        self._open: dict[str, _Open] = {}
        self._open_gpu(nvml, local_rank, instant_power)
        self.memory_total_mib = self.meter.memory_total_mib if self.meter is not None else None  # MiB
        self.sampler = self._make_sampler(sample_interval_s) if sampler and self.meter is not None else None
        self.source = self._choose_source()
        self._coverage = self._power_coverage()
        self.counter_period_s = self._counter_period(counter_period_s)  # s; None without a counter
        self.rapl: RaplMeter | None = None
        self.rapl_poller: RaplPoller | None = None
        self.cpu_reason: str | None = "energy.rapl=false"
        if rapl:
            self.rapl, self.cpu_reason = open_rapl(rapl_root)
        if self.rapl is not None:
            self.rapl_poller = RaplPoller(self.rapl, rapl_interval_s, self._rapl_failed)

    @classmethod
    def from_config(cls, energy: Any, device: torch.device, local_rank: int) -> EnergyMonitor:
        """A monitor as the config's energy block says; RAPL on local rank 0 of the node only."""
        monitor = cls(
            energy.backend,
            device,
            sample_interval_s=energy.sample_interval_s,
            sampler=energy.sampler,
            instant_power=energy.instant_power,
            rapl=energy.rapl and local_rank == 0,
            local_rank=local_rank,
        )
        if energy.rapl and local_rank != 0:
            monitor.cpu_reason = "RAPL is read by local rank 0 of each node only"
        return monitor

    # -- opening -------------------------------------------------------------------------

    def _open_gpu(self, nvml: ModuleType | None, local_rank: int, instant_power: bool) -> None:
        if self.backend == "none":
            self.reason = "energy.backend=none"
            return
        if self.device.type != "cuda" and nvml is None:
            if self.backend == "nvml":
                raise EnergyError("energy.backend=nvml needs a GPU: set gpu= to a GPU profile or energy.backend=auto")
            self.reason = "no GPU: this run is on the CPU, where NVML has no energy counter"
            return
        try:
            self.meter = open_gpu_meter(nvml or import_nvml(), self.device, local_rank, instant_power)
        except (GpuError, ImportError, OSError) as exc:
            message = f"NVML unavailable for {self.device} (local rank {local_rank}): {exc}"
            if self.backend == "nvml":
                raise EnergyError(message + " (energy.backend=nvml; use energy.backend=auto to run without)") from exc
            self.reason = message

    def _make_sampler(self, interval_s: float) -> Sampler:
        return Sampler(self.meter.telemetry, interval_s, self._clock)

    def _counter_period(self, given: float | None) -> float | None:
        if self.source != SOURCE_COUNTER:
            return None
        if given is not None:
            return given
        period = infer_counter_period(self.meter.energy_mj, self._clock, self._sleep)
        if period is None:
            log.info("energy counter update period not inferred (counter still or unreadable): "
                     "assuming %.0f ms", MIN_TRUSTED_WINDOW_S * 1000)
            return MIN_TRUSTED_WINDOW_S
        return period

    def _choose_source(self) -> str:
        if self.meter is None:
            return SOURCE_NONE
        if self.meter.has_counter:
            return SOURCE_COUNTER
        if self.sampler is not None and self.meter.power_reading is not None:
            return SOURCE_INTEGRATED
        self.reason = "this GPU has no energy counter and energy.sampler=false: there is no power to integrate"
        if self.backend == "nvml":
            self.close()
            raise EnergyError(self.reason + " (set energy.sampler=true)")
        return SOURCE_NONE

    @property
    def available(self) -> bool:
        return self.source != SOURCE_NONE

    @property
    def power_reading(self) -> str | None:
        return self.meter.power_reading if self.meter is not None else None

    def gpu_record(self) -> dict[str, Any]:
        """Identity and power limits of this rank's GPU, read now (so a record shows the enforced cap)."""
        if self.meter is None:
            return {}
        try:
            return self.meter.info() | self.meter.power_limits() | {"counter_period_s": self.counter_period_s}
        except GpuError as exc:
            return {"read_error": str(exc)}

    # -- windows -------------------------------------------------------------------------

    def _read_counter(self, errors: list[str]) -> int | None:
        if self.source != SOURCE_COUNTER:
            return None
        try:
            return self.meter.energy_mj()
        except GpuError as exc:
            errors.append(str(exc))
            return None

    def _rapl_failed(self, exc: Exception) -> None:
        self.cpu_reason = f"RAPL read failed: {exc}"

    def _read_cpu(self) -> dict[str, float] | None:
        if self.rapl is None:
            return None
        try:
            return self.rapl.read_j()
        except (OSError, ValueError) as exc:
            self.cpu_reason = f"RAPL read failed: {exc}"
            return None

    def _start_threads(self) -> None:
        if self.sampler is not None:
            self.sampler.start()
        if self.rapl_poller is not None:
            self.rapl_poller.start()

    def _stop_threads(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self.rapl_poller is not None:
            self.rapl_poller.stop()

    def begin_window(self, name: str, sync: bool = True) -> None:
        """Open window `name`; sync first waits for the work already queued, so it stays outside."""
        if name in self._open:
            raise WindowError(f"energy window '{name}' is open already: end it before beginning it again")
        if sync:
            self._sync()
        if not self._open:
            self._start_threads()
        t0, unix = self._clock(), time.time()
        errors: list[str] = []
        counter = self._read_counter(errors)
        if self.sampler is not None:
            self.sampler.sample()  # a reading at the edge keeps short windows integrable
        state = self._state()
        cpu = self._read_cpu()
        # The RAPL read lands this long after the edge: the read timer of the CPU figure.
        self._open[name] = _Open(t0, unix, counter, cpu, errors, self._clock() - t0, state)

    def end_window(self, name: str, sync: bool = True) -> Window:
        """Close window `name`; sync first waits for the work queued inside it, so it is counted."""
        if name not in self._open:
            which = ", ".join(f"'{n}'" for n in self._open) or "none"
            raise WindowError(f"energy window '{name}' was never begun (open windows: {which})")
        if sync:
            self._sync()
        opened = self._open.pop(name)
        # Read before the counter: the read's time then lies inside the window that closes, counted in
        # its energy and its seconds alike (what follows the counter read is in no window).
        state_end = self._state()
        t1 = self._clock()
        errors = opened.errors
        counter_end = self._read_counter(errors)
        rows: tuple[Row, ...] = ()
        telemetry_errors: list[str] = []
        if self.sampler is not None:
            self.sampler.sample()
            rows = tuple(self.sampler.rows(opened.t0_monotonic_s, self._clock()))
            telemetry_errors = self.sampler.errors(opened.t0_monotonic_s, self._clock())
        cpu_end = self._read_cpu()
        cpu_read_s = max(opened.cpu_read_s, self._clock() - t1)
        if not self._open:
            self._stop_threads()
        duration = t1 - opened.t0_monotonic_s
        counter_j = None
        if opened.counter_mj is not None and counter_end is not None:
            counter_j = (counter_end - opened.counter_mj) / 1000.0
            if counter_j < 0:
                errors.append(f"NVML energy counter went backwards by {-counter_j:.3f} J (driver reloaded?)")
                counter_j = None
        integrated = integrate(rows, opened.t0_monotonic_s, t1)
        if self.source == SOURCE_INTEGRATED:
            errors.extend(telemetry_errors)
        gpu, error = self._figure(counter_j, integrated, errors)
        short = gpu is not None and self.source == SOURCE_COUNTER and duration < self.counter_period_s
        if short:
            warnings.warn(
                f"energy window '{name}' is shorter than NVML's energy counter update period on this GPU "
                f"({self.counter_period_s * 1000:.0f} ms): its energy is unreliable",
                stacklevel=2,
            )
        period = self._period()
        powers = [row[1] for row in rows if row[1] is not None]
        reading = GpuReading(self.source, duration, period, counter_j, integrated,
                             max(powers, default=None), min(powers, default=None), self._coverage)
        cpu_j = cpu_total(opened.cpu_j, cpu_end)
        zones = cpu_zones(opened.cpu_j, cpu_end)
        voided = bool(errors) or bool(telemetry_errors)  # a read error leaves no reading to compare
        instant = None if voided else integrate_column(rows, "instant_power_w", opened.t0_monotonic_s, t1)
        average = None if voided else integrate_column(rows, "average_power_w", opened.t0_monotonic_s, t1)
        agreement, average_bound = agreement_bounds_j(Readings(
            counter_j, instant, average, duration, self.counter_period_s,
            self.sampler.interval_s if self.sampler else None, reading.power_max_w, reading.power_min_w,
            self._coverage))
        return Window(
            name=name,
            start_unix_s=opened.start_unix_s,
            duration_s=duration,
            gpu_j=gpu,
            source=self.source,
            counter_gpu_j=counter_j,
            integrated_gpu_j=integrated,
            cpu_j=cpu_j,
            cpu_zones_j=zones,
            reason=error or self.reason,
            error=error,
            short=short,
            samples=rows,
            t0_monotonic_s=opened.t0_monotonic_s,
            telemetry_errors=tuple(telemetry_errors),
            period_s=period if gpu is not None else None,
            gpu_bound_j=gpu_bound_j(reading) if gpu is not None else None,
            cpu_bound_j=cpu_bound_j(cpu_j, duration, len(zones or {}), cpu_read_s),
            cpu_package_j=zone_sum(zones, dram=False),
            cpu_dram_j=zone_sum(zones, dram=True),
            state_start=opened.state,
            state_end=state_end,
            clock_events=gpustate.merge_masks([
                opened.state.clock_events if opened.state else None, state_end.clock_events if state_end else None,
                *(None if v is None else int(v) for v in column(rows, "throttle_reasons"))]),
            instant_gpu_j=instant,
            average_gpu_j=average,
            agreement_bound_j=agreement,
            average_bound_j=average_bound,
        )

    def _power_coverage(self) -> float | None:
        if self.meter is None:
            return None
        try:
            return power_sample_coverage(self.meter.name())
        except GpuError:
            return None  # unknown: the bound leaves the term out

    def _period(self) -> float | None:
        """The update period of the window figure's source: the counter's, or the sampler's interval."""
        if self.source == SOURCE_COUNTER:
            return self.counter_period_s
        if self.source == SOURCE_INTEGRATED and self.sampler is not None:
            return self.sampler.interval_s
        return None

    def _state(self) -> GpuState | None:
        """The GPU's temperature, SM clock and clock event reasons now; None where there is no meter or a
        read failed (the state describes the window; it is no part of its energy figure)."""
        if self.meter is None:
            return None
        try:
            return GpuState(self.meter.temperature_c(), self.meter.sm_clock_mhz(), self.meter.clock_events())
        except GpuError as exc:
            log.warning("GPU state unread at a window edge: %s", exc)
            return None

    def settle(self, seconds: float) -> gpustate.Settled:
        """Before a cell: wait until this GPU's temperature holds still, at most `seconds`."""
        read = self.meter.temperature_c if self.meter is not None and self.meter.temperature_c() is not None else None
        return gpustate.settle(seconds, read, self._clock, self._sleep)

    def _figure(self, counter_j: float | None, integrated: float | None, errors: list[str]) -> tuple[float | None, str | None]:
        """The window's energy from the chosen source, or None and the read error."""
        if errors:
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            return None, f"NVML read error during the window: {errors[0]}{more}"
        if self.source == SOURCE_COUNTER:
            return counter_j, None
        if self.source == SOURCE_INTEGRATED:
            if integrated is None:
                return None, "no power sample inside the window"
            return integrated, None
        return None, None

    def measure_idle(self, seconds: float) -> IdleBaseline:
        """Average power over `seconds` of rest (the model loaded, nothing running)."""
        if seconds <= 0:
            return IdleBaseline(None, 0.0, SOURCE_NONE, None, "energy.idle_seconds=0: no idle baseline")
        if not self.available:  # nothing to read: do not make every CPU run wait
            return IdleBaseline(None, 0.0, SOURCE_NONE, None, self.reason)
        self.begin_window("idle")
        self._sleep(seconds)
        window = self.end_window("idle")
        power = window.gpu_j / window.duration_s if window.gpu_j is not None else None
        cpu = window.cpu_j / window.duration_s if window.cpu_j is not None else None
        return IdleBaseline(power, window.duration_s, window.source, cpu, window.reason)

    def measure_active(self, seconds: float) -> Window | None:
        """A window of `seconds` with the model loaded and warmed up and no work queued: the GPU's active
        (not idle) power state, the static part of a cell's energy. None: not asked for, or no meter."""
        if seconds <= 0 or not self.available:
            return None
        self.begin_window("active")
        self._sleep(seconds)
        return self.end_window("active")

    def missing_readings(self) -> dict[str, str] | None:
        """Each GPU reading a window lacks, and why (None: all three, or no GPU meter: `reason` says)."""
        if self.meter is None:
            return None
        missing = dict(self.meter.missing)
        if self.sampler is None:
            for reading in ("instant", "average"):
                missing.setdefault(reading, "energy.sampler=false: power is not sampled")
        return missing or None

    def abandon_windows(self) -> None:
        """Drop windows left open by a failed cell, so the next window starts a fresh recording."""
        self._open.clear()
        self._stop_threads()

    def close(self) -> None:
        self._stop_threads()
        if self.meter is not None:
            try:
                call(self.meter.nvml, "nvmlShutdown")
            except GpuError as exc:
                log.warning("%s", exc)
            self.meter = None
