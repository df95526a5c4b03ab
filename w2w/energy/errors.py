"""Typed energy errors: NVML failures mapped to classes by error code (as zeus does), power-cap failures."""

from __future__ import annotations


class EnergyError(RuntimeError):
    """The energy meter that was asked for cannot be used."""


class GpuError(EnergyError):
    """An NVML call failed; `code` is NVML's return code (None where NVML did not give one)."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


class GpuInitError(GpuError):
    """NVML itself is unusable: no library, no driver, or a driver/library mismatch."""


class GpuNotFoundError(GpuError):
    """No GPU matches the index, UUID or PCI bus id asked for."""


class GpuNotSupportedError(GpuError):
    """This GPU (or MIG instance) does not offer the reading or setting."""


class GpuNoPermissionError(GpuError):
    """The call needs rights this user does not have (e.g. setting power limits)."""


class GpuLostError(GpuError):
    """The GPU fell off the bus or needs a reset."""


class GpuReadError(GpuError):
    """Any other NVML failure (timeout, unknown error, ...)."""


class WindowError(ValueError):
    """A window name used wrongly: begun while already open, or ended without being open."""


class PowerCapError(EnergyError):
    """A power cap could not be set or is not the one enforced; the cell must not run uncapped."""


# NVML return codes (nvml.h) -> error class; anything else is a GpuReadError.
_CODE_TO_ERROR: dict[int, type[GpuError]] = {
    1: GpuInitError,  # UNINITIALIZED
    2: GpuNotFoundError,  # INVALID_ARGUMENT: a bad index or handle
    3: GpuNotSupportedError,  # NOT_SUPPORTED
    4: GpuNoPermissionError,  # NO_PERMISSION
    6: GpuNotFoundError,  # NOT_FOUND
    9: GpuInitError,  # DRIVER_NOT_LOADED
    12: GpuInitError,  # LIBRARY_NOT_FOUND
    13: GpuInitError,  # FUNCTION_NOT_FOUND: a driver older than the call
    15: GpuLostError,  # GPU_IS_LOST
    16: GpuLostError,  # RESET_REQUIRED
    18: GpuInitError,  # LIB_RM_VERSION_MISMATCH
}


def gpu_error(code: int | None, message: str) -> GpuError:
    return _CODE_TO_ERROR.get(code, GpuReadError)(message, code)


class ClockError(EnergyError):
    """Locked SM clocks could not be set or restored; the cell must not run at the GPU's own clocks."""
