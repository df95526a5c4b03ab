"""Per-rank energy: NVML windows and sampler for the GPU, RAPL for the CPUs, power caps."""

from w2w.energy.errors import (
    EnergyError,
    GpuError,
    GpuInitError,
    GpuLostError,
    GpuNoPermissionError,
    GpuNotFoundError,
    GpuNotSupportedError,
    GpuReadError,
    PowerCapError,
    WindowError,
)
from w2w.energy.monitor import (
    MIN_TRUSTED_WINDOW_S,
    SOURCE_COUNTER,
    SOURCE_INTEGRATED,
    SOURCE_NONE,
    EnergyMonitor,
    IdleBaseline,
    Window,
)
from w2w.energy.nvml import nvml_index
from w2w.energy.powercap import PowerCapper
from w2w.energy.rapl import RaplMeter, RaplPoller, open_rapl
from w2w.energy.sampler import Sampler, integrate, summarize, timeline_frame

__all__ = [
    "MIN_TRUSTED_WINDOW_S",
    "SOURCE_COUNTER",
    "SOURCE_INTEGRATED",
    "SOURCE_NONE",
    "EnergyError",
    "EnergyMonitor",
    "GpuError",
    "GpuInitError",
    "GpuLostError",
    "GpuNoPermissionError",
    "GpuNotFoundError",
    "GpuNotSupportedError",
    "GpuReadError",
    "IdleBaseline",
    "PowerCapError",
    "PowerCapper",
    "RaplMeter",
    "RaplPoller",
    "Sampler",
    "Window",
    "WindowError",
    "integrate",
    "nvml_index",
    "open_rapl",
    "summarize",
    "timeline_frame",
]
