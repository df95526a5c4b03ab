"""One rank's GPU through NVML: device lookup, energy counter, power and telemetry reads, power limits."""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Any

import torch

from w2w.energy.errors import (
    GpuError,
    GpuNoPermissionError,
    GpuNotFoundError,
    GpuNotSupportedError,
    gpu_error,
)

# Sampler row after the time stamp: (power W, SM util %, memory util %, memory used MiB, temperature C, SM clock MHz,
# NVML's clock event reasons as a bit mask: w2w.energy.gpustate names them).
# power_w is the primary reading (instant where chosen and offered, else the average); the last two are
# both readings as read, each None where the GPU lacks it (GpuMeter.missing says why).
TELEMETRY_COLUMNS = ("power_w", "sm_util_pct", "mem_util_pct", "mem_used_mib", "temp_c", "sm_clock_mhz",
                     "throttle_reasons", "instant_power_w", "average_power_w")
# The three GPU readings of a window, by name in GpuMeter.missing and in the record.
READINGS = ("counter", "instant", "average")
MIB = 1024 * 1024
# nvmlFieldValue_t.valueType -> the union member that holds the value.
_FIELD_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}


def import_nvml() -> ModuleType:
    """The real binding (nvidia-ml-py); tests pass a fake module to the monitor instead."""
    import pynvml

    return pynvml


def call(nvml: ModuleType, name: str, *args: Any) -> Any:
    """nvml.<name>(*args) with NVML's exceptions mapped to typed GpuErrors."""
    try:
        return getattr(nvml, name)(*args)
    except nvml.NVMLError as exc:
        code = getattr(exc, "value", None)
        kind = type(exc).__name__.removeprefix("NVMLError_") or "NVMLError"
        raise gpu_error(code, f"{name}: {kind} (NVML error {code})") from exc


def nvml_index(cuda_index: int) -> int | str:
    """NVML enumerates all GPUs; CUDA_VISIBLE_DEVICES renumbers them (indices or UUIDs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return cuda_index
    entries = [e.strip() for e in visible.split(",")]
    if cuda_index >= len(entries):
        raise GpuNotFoundError(f"CUDA device {cuda_index} is not in CUDA_VISIBLE_DEVICES={visible}")
    entry = entries[cuda_index]
    return int(entry) if entry.isdigit() else entry


def _torch_uuid(device: torch.device) -> str | None:
    """The CUDA runtime's UUID of this device as torch spells it (bare, no GPU-/MIG- prefix); None where torch does not say."""
    try:
        return str(torch.cuda.get_device_properties(device).uuid)
    except (AttributeError, RuntimeError, AssertionError):
        return None


def _spellings(uuid: str) -> list[str]:
    """NVML's spellings of a CUDA UUID: a bare one is a whole GPU's (GPU-...) or a MIG instance's (MIG-...)."""
    return [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]


def find_handle(nvml: ModuleType, device: torch.device, local_rank: int) -> tuple[Any, int | str]:
    """This rank's NVML handle and how it was found.

    A CUDA device is matched by UUID, which holds whatever CUDA_VISIBLE_DEVICES and
    CUDA_DEVICE_ORDER say; a GPU UUID that NVML does not know fails the rank with the reason (an
    index could name another GPU, and its energy would be recorded as this one's). Only where there
    is no GPU UUID (a MIG instance, or torch does not say) does the CUDA index go through
    CUDA_VISIBLE_DEVICES. A CPU device only reaches here with an injected meter (tests): it takes
    the SLURM/torchrun local rank.
    """
    if device.type == "cuda":
        uuid = _torch_uuid(device)
        if uuid is not None:
            spellings, errors = _spellings(uuid), []
            for spelled in spellings:
                try:
                    return call(nvml, "nvmlDeviceGetHandleByUUID", spelled), spelled
                except GpuError as exc:
                    errors.append(exc)
            if not uuid.startswith("MIG-"):  # a MIG instance NVML does not know by UUID: its CUDA index below
                raise GpuNotFoundError(f"{device}: NVML has no GPU with the CUDA runtime's UUID "
                                       f"{' or '.join(spellings)} ({errors[0]}); not guessing by index") from errors[0]
        cuda_index = device.index or 0
    else:
        cuda_index = local_rank
    index = nvml_index(cuda_index)
    if isinstance(index, int):
        return call(nvml, "nvmlDeviceGetHandleByIndex", index), index
    return call(nvml, "nvmlDeviceGetHandleByUUID", index), index


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_mig(nvml: ModuleType, handle: Any) -> bool:
    """A MIG instance, or a GPU split into MIG instances: NVML gives no per-instance energy or power."""
    try:
        if call(nvml, "nvmlDeviceIsMigDeviceHandle", handle):
            return True
        current, _pending = call(nvml, "nvmlDeviceGetMigMode", handle)
    except GpuNotSupportedError:
        return False  # a GPU without MIG
    return current == nvml.NVML_DEVICE_MIG_ENABLE


class GpuMeter:
    """Reads of one GPU; which readings the GPU offers is probed once, at open."""

    def __init__(self, nvml: ModuleType, handle: Any, located_by: int | str, instant_power: bool):
        self.nvml = nvml
        self.handle = handle
        self.located_by = located_by
        # Each reading this GPU lacks, and why (never a silent zero): NVML's answer to the probe.
        self.missing: dict[str, str] = {}
        self.has_counter = self._probe("counter", self.energy_mj)
        self.has_instant = self._probe("instant", self._instant_mw)
        self.has_average = self._probe("average", self._average_mw)
        # instant: NVML_FI_DEV_POWER_INSTANT; average: nvmlDeviceGetPowerUsage, a 1 s average
        # on Ampere and newer (except GA100), instantaneous on older GPUs. Both are sampled where
        # offered; instant_power picks which one is the primary power_w.
        self._instant = instant_power and self.has_instant
        self.power_reading: str | None = "instant" if self._instant else "average" if self.has_average else None
        self._telemetry = {
            "utilization": self._supported(lambda: call(nvml, "nvmlDeviceGetUtilizationRates", handle)),
            "memory": self._supported(lambda: call(nvml, "nvmlDeviceGetMemoryInfo", handle)),
            "temperature": self._supported(self._temperature),
            "clock": self._supported(self._sm_clock),
            "throttle": self._supported(self._clock_events),
        }
        self.memory_total_mib: float | None = None  # MiB
        if self._telemetry["memory"]:
            self.memory_total_mib = call(nvml, "nvmlDeviceGetMemoryInfo", handle).total / MIB

    def _probe(self, reading: str, read) -> bool:
        try:
            read()
        except (GpuNotSupportedError, GpuNoPermissionError) as exc:
            self.missing[reading] = str(exc)
            return False
        return True

    @staticmethod
    def _supported(read) -> bool:
        try:
            read()
        except GpuNotSupportedError:
            return False
        return True

    def energy_mj(self) -> int:
        """NVML's total-energy counter: mJ since the driver loaded."""
        return call(self.nvml, "nvmlDeviceGetTotalEnergyConsumption", self.handle)

    def _instant_mw(self) -> float:
        value = call(self.nvml, "nvmlDeviceGetFieldValues", self.handle, [self.nvml.NVML_FI_DEV_POWER_INSTANT])[0]
        if value.nvmlReturn != self.nvml.NVML_SUCCESS:
            said = str(self.nvml.NVMLError(value.nvmlReturn))  # NVML's own words, e.g. "Not Supported"
            raise gpu_error(value.nvmlReturn, f"NVML_FI_DEV_POWER_INSTANT: {said} (NVML error {value.nvmlReturn})")
        return float(getattr(value.value, _FIELD_MEMBERS.get(value.valueType, "uiVal")))

    def _average_mw(self) -> float:
        return float(call(self.nvml, "nvmlDeviceGetPowerUsage", self.handle))

    def powers_w(self) -> tuple[float | None, float | None]:
        """(instant, 1 s average) power in W, each None where this GPU lacks it."""
        instant = self._instant_mw() / 1000.0 if self.has_instant else None
        average = self._average_mw() / 1000.0 if self.has_average else None
        return instant, average

    def power_w(self) -> float | None:
        if self._instant:
            return self._instant_mw() / 1000.0
        if self.power_reading == "average":
            return self._average_mw() / 1000.0
        return None

    def _temperature(self) -> float:
        return float(call(self.nvml, "nvmlDeviceGetTemperature", self.handle, self.nvml.NVML_TEMPERATURE_GPU))

    def _sm_clock(self) -> float:
        return float(call(self.nvml, "nvmlDeviceGetClockInfo", self.handle, self.nvml.NVML_CLOCK_SM))

    def _clock_events(self) -> int:
        # Renamed from ...ClocksThrottleReasons in NVML 12.2 (same bits); older bindings have only the old name.
        name = "nvmlDeviceGetCurrentClocksEventReasons"
        if not hasattr(self.nvml, name):
            name = "nvmlDeviceGetCurrentClocksThrottleReasons"
        return int(call(self.nvml, name, self.handle))

    def temperature_c(self) -> float | None:
        return self._temperature() if self._telemetry["temperature"] else None

    def sm_clock_mhz(self) -> float | None:
        return self._sm_clock() if self._telemetry["clock"] else None

    def clock_events(self) -> int | None:
        """NVML's current clock event (throttle) reasons as a bit mask; None where the GPU does not say."""
        return self._clock_events() if self._telemetry["throttle"] else None

    def telemetry(self) -> tuple[float | None, ...]:
        """One sampler row in TELEMETRY_COLUMNS order; None for what this GPU does not offer."""
        sm = mem = used = None
        if self._telemetry["utilization"]:
            rates = call(self.nvml, "nvmlDeviceGetUtilizationRates", self.handle)
            sm, mem = float(rates.gpu), float(rates.memory)
        if self._telemetry["memory"]:
            used = call(self.nvml, "nvmlDeviceGetMemoryInfo", self.handle).used / MIB
        events = self.clock_events()
        instant, average = self.powers_w()
        power = instant if self._instant else average
        return (power, sm, mem, used, self.temperature_c(), self.sm_clock_mhz(),
                None if events is None else float(events), instant, average)

    def lock_sm_clocks_mhz(self, mhz: int) -> None:
        """Lock the SM clock at `mhz` (min = max); needs administrator rights."""
        call(self.nvml, "nvmlDeviceSetGpuLockedClocks", self.handle, mhz, mhz)

    def reset_sm_clocks(self) -> None:
        call(self.nvml, "nvmlDeviceResetGpuLockedClocks", self.handle)

    def read_sm_clock_mhz(self) -> float:
        """The SM clock now, read whether or not the sampler reads it (raises GpuError)."""
        return self._sm_clock()

    def _limit_w(self, name: str) -> float | None:
        try:
            return call(self.nvml, name, self.handle) / 1000.0
        except GpuNotSupportedError:
            return None

    def enforced_limit_w(self) -> float | None:
        return self._limit_w("nvmlDeviceGetEnforcedPowerLimit")

    def power_limits(self) -> dict[str, float | None]:
        """Power limits in W: the management limit, its default and range, and the one enforced."""
        try:
            low, high = call(self.nvml, "nvmlDeviceGetPowerManagementLimitConstraints", self.handle)
            low_w, high_w = low / 1000.0, high / 1000.0
        except GpuNotSupportedError:
            low_w = high_w = None
        return {
            "power_limit_w": self._limit_w("nvmlDeviceGetPowerManagementLimit"),
            "default_power_limit_w": self._limit_w("nvmlDeviceGetPowerManagementDefaultLimit"),
            "min_power_limit_w": low_w,
            "max_power_limit_w": high_w,
            "enforced_power_limit_w": self.enforced_limit_w(),
        }

    def set_power_limit_w(self, watts: float) -> None:
        call(self.nvml, "nvmlDeviceSetPowerManagementLimit", self.handle, round(watts * 1000))

    def name(self) -> str:
        return _text(call(self.nvml, "nvmlDeviceGetName", self.handle))

    def info(self) -> dict[str, Any]:
        """What identifies the GPU in a record."""
        index = None
        with contextlib.suppress(GpuError):  # the index is for people; the UUID identifies
            index = call(self.nvml, "nvmlDeviceGetIndex", self.handle)
        return {
            "gpu_name": self.name(),
            "gpu_uuid": _text(call(self.nvml, "nvmlDeviceGetUUID", self.handle)),
            "driver": _text(call(self.nvml, "nvmlSystemGetDriverVersion")),
            "nvml_index": index,
            "located_by": self.located_by,
            "energy_counter": self.has_counter,
            "power_reading": self.power_reading,
            "missing_readings": dict(self.missing) or None,
            "memory_total_mib": self.memory_total_mib,
        }


def open_gpu_meter(nvml: ModuleType, device: torch.device, local_rank: int, instant_power: bool) -> GpuMeter:
    """Initialize NVML and open this rank's GPU; raises a typed GpuError where it cannot be metered."""
    call(nvml, "nvmlInit")
    try:
        handle, located_by = find_handle(nvml, device, local_rank)
        if _is_mig(nvml, handle):
            raise GpuNotSupportedError(
                f"GPU {located_by} is a MIG instance or runs in MIG mode: NVML reports no energy or "
                f"power per MIG instance, so energy is unsupported here (run on a whole GPU to measure)"
            )
        meter = GpuMeter(nvml, handle, located_by, instant_power)
        if not meter.has_counter and meter.power_reading is None:
            raise GpuNotSupportedError(f"GPU {located_by} offers neither an energy counter nor a power reading")
    except BaseException:
        call(nvml, "nvmlShutdown")
        raise
    return meter
