"""A fake pynvml for tests: the real module autospecced, its functions driven by fake GPUs on a clock."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from unittest import mock

import pynvml

MIB = 1024 * 1024


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeGpu:
    """One GPU: constant power (changeable), and what it offers or refuses."""

    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    name: str = "NVIDIA A100-SXM4-80GB"
    power_w: float = 100.0
    counter: bool = True  # offers nvmlDeviceGetTotalEnergyConsumption
    instant: bool = True  # offers NVML_FI_DEV_POWER_INSTANT
    average: bool = True  # offers nvmlDeviceGetPowerUsage (the 1 s average on Ampere and newer)
    # What each power reading reports, where it differs from the draw the counter counts (None: power_w):
    # a meter that disagrees by a known amount.
    instant_w: float | None = None
    average_w: float | None = None
    counter_period_s: float = 0.0  # > 0: the counter only moves every period, as NVML's does
    mig: bool = False
    may_set_limit: bool = True
    limit_w: float = 400.0
    default_limit_w: float = 400.0
    min_limit_w: float = 100.0
    max_limit_w: float = 400.0
    site_limit_w: float | None = None  # a limit set elsewhere that wins over ours
    failing: Callable[[float], bool] = lambda t: False  # reads raise NVMLError_Unknown while True
    sm_util: int = 90
    temp_at: Callable[[float], float] = lambda t: 61.0  # C at time t
    sm_clock_mhz: float = 1410.0
    default_sm_clock_mhz: float = 1410.0  # where nvmlDeviceResetGpuLockedClocks brings it back
    may_set_clocks: bool = True  # False: nvmlDeviceSetGpuLockedClocks raises NoPermission
    lockable: bool = True  # False: locked clocks NotSupported (a GPU before Volta)
    locked_mhz: tuple[int, int] | None = None  # (min, max) in force
    clock_calls: list[tuple[int, int] | None] = field(default_factory=list)  # set (min, max) and reset (None)
    clock_events_at: Callable[[float], int] = lambda t: 0  # NVML clock event reasons (bit mask) at time t
    mem_util: int = 40
    mem_used_mib: float = 20_000.0
    mem_total_mib: float = 81_920.0
    energy_mj: float = 5_000_000.0  # counter value at `since`
    since: float | None = None
    set_calls: list[int] = field(default_factory=list)  # mW passed to the setter

    def counter_mj(self, t: float) -> int:
        t = math.floor(t / self.counter_period_s) * self.counter_period_s if self.counter_period_s else t
        return int(self.energy_mj + self.power_w * 1000.0 * (t - self.since))

    def set_power(self, watts: float, t: float) -> None:
        """Change the draw from time t on (the counter keeps what was drawn so far)."""
        self.energy_mj = self.counter_mj(t)
        self.since, self.power_w = t, watts

    def enforced_w(self) -> float:
        return min(self.limit_w, self.site_limit_w) if self.site_limit_w is not None else self.limit_w


def nvml_error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


def fake_nvml(gpus: list[FakeGpu], clock: Callable[[], float] = time.perf_counter) -> mock.NonCallableMagicMock:
    """create_autospec(pynvml) with real constants and exception classes, answering from `gpus`."""
    nvml = mock.create_autospec(pynvml)
    for name in dir(pynvml):
        if name.startswith(("NVML_", "NVMLError")):
            setattr(nvml, name, getattr(pynvml, name))
    for gpu in gpus:
        gpu.since = clock() if gpu.since is None else gpu.since

    def read(fn: Callable[[FakeGpu], object], needs: str | None = None):
        def answer(handle: FakeGpu, *args):
            if handle.failing(clock()):
                raise nvml_error(pynvml.NVML_ERROR_UNKNOWN)
            if needs is not None and not getattr(handle, needs):
                raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return fn(handle, *args)

        return answer

    def by_index(index: int) -> FakeGpu:
        if not 0 <= index < len(gpus):
            raise nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpus[index]

    def by_uuid(uuid: str) -> FakeGpu:
        for gpu in gpus:
            if gpu.uuid == uuid:
                return gpu
        raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)

    def field_values(gpu: FakeGpu, ids: list[int]) -> list[SimpleNamespace]:
        status = pynvml.NVML_SUCCESS if gpu.instant else pynvml.NVML_ERROR_NOT_SUPPORTED
        watts = gpu.power_w if gpu.instant_w is None else gpu.instant_w
        return [SimpleNamespace(nvmlReturn=status, valueType=pynvml.NVML_VALUE_TYPE_UNSIGNED_INT,
                                value=SimpleNamespace(uiVal=round(watts * 1000))) for _ in ids]

    def lock_clocks(gpu: FakeGpu, low_mhz: int, high_mhz: int) -> None:
        if not gpu.lockable:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not gpu.may_set_clocks:
            raise nvml_error(pynvml.NVML_ERROR_NO_PERMISSION)
        gpu.clock_calls.append((low_mhz, high_mhz))
        gpu.locked_mhz, gpu.sm_clock_mhz = (low_mhz, high_mhz), float(high_mhz)

    def reset_clocks(gpu: FakeGpu) -> None:
        if not gpu.lockable:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if not gpu.may_set_clocks:
            raise nvml_error(pynvml.NVML_ERROR_NO_PERMISSION)
        gpu.clock_calls.append(None)
        gpu.locked_mhz, gpu.sm_clock_mhz = None, gpu.default_sm_clock_mhz

    def set_limit(gpu: FakeGpu, milliwatts: int) -> None:
        if not gpu.may_set_limit:
            raise nvml_error(pynvml.NVML_ERROR_NO_PERMISSION)
        gpu.set_calls.append(milliwatts)
        gpu.limit_w = milliwatts / 1000.0

    nvml.nvmlInit.return_value = None
    nvml.nvmlShutdown.return_value = None
    nvml.nvmlSystemGetDriverVersion.return_value = "550.54.15"
    nvml.nvmlDeviceGetCount.return_value = len(gpus)
    nvml.nvmlDeviceGetHandleByIndex.side_effect = by_index
    nvml.nvmlDeviceGetHandleByUUID.side_effect = by_uuid
    nvml.nvmlDeviceGetIndex.side_effect = lambda g: next(i for i, x in enumerate(gpus) if x is g)
    nvml.nvmlDeviceGetName.side_effect = lambda g: g.name
    nvml.nvmlDeviceGetUUID.side_effect = lambda g: g.uuid
    nvml.nvmlDeviceIsMigDeviceHandle.side_effect = lambda g: g.uuid.startswith("MIG-")  # a MIG instance's handle
    nvml.nvmlDeviceGetMigMode.side_effect = lambda g: [int(g.mig), int(g.mig)]
    nvml.nvmlDeviceGetTotalEnergyConsumption.side_effect = read(lambda g: g.counter_mj(clock()), "counter")
    nvml.nvmlDeviceGetPowerUsage.side_effect = read(
        lambda g: round((g.power_w if g.average_w is None else g.average_w) * 1000), "average")
    nvml.nvmlDeviceGetFieldValues.side_effect = read(field_values)
    nvml.nvmlDeviceGetUtilizationRates.side_effect = read(lambda g: SimpleNamespace(gpu=g.sm_util, memory=g.mem_util))
    nvml.nvmlDeviceGetMemoryInfo.side_effect = read(
        lambda g: SimpleNamespace(used=int(g.mem_used_mib * MIB), total=int(g.mem_total_mib * MIB),
                                  free=int((g.mem_total_mib - g.mem_used_mib) * MIB)))
    nvml.nvmlDeviceGetTemperature.side_effect = read(lambda g, sensor: round(g.temp_at(clock())))
    nvml.nvmlDeviceGetClockInfo.side_effect = read(lambda g, kind: round(g.sm_clock_mhz))
    events = read(lambda g: g.clock_events_at(clock()))
    nvml.nvmlDeviceGetCurrentClocksEventReasons.side_effect = events
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons.side_effect = events  # its name before NVML 12.2
    nvml.nvmlDeviceGetPowerManagementLimit.side_effect = read(lambda g: round(g.limit_w * 1000))
    nvml.nvmlDeviceGetPowerManagementDefaultLimit.side_effect = read(lambda g: round(g.default_limit_w * 1000))
    nvml.nvmlDeviceGetPowerManagementLimitConstraints.side_effect = read(
        lambda g: [round(g.min_limit_w * 1000), round(g.max_limit_w * 1000)])
    nvml.nvmlDeviceGetEnforcedPowerLimit.side_effect = read(lambda g: round(g.enforced_w() * 1000))
    nvml.nvmlDeviceSetPowerManagementLimit.side_effect = set_limit
    nvml.nvmlDeviceSetGpuLockedClocks.side_effect = read(lock_clocks)
    nvml.nvmlDeviceResetGpuLockedClocks.side_effect = read(reset_clocks)
    return nvml
