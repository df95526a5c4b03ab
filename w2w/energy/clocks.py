"""Locked SM clocks per cell (the gpu_clock_mhz axis): set through NVML, read back, restored at the end and on SIGTERM."""

from __future__ import annotations

import logging
from typing import Any

from w2w.energy.errors import ClockError, GpuError, GpuNoPermissionError, GpuNotSupportedError
from w2w.energy.nvml import GpuMeter

log = logging.getLogger("w2w.energy")


class ClockLocker:
    """Locks this rank's GPU SM clock (min = max) for a cell and resets it to the GPU's own afterwards.

    A refusal (no right, or a GPU without locked clocks) is remembered: later cells fail with the same
    one line and NVML is not asked again, so nothing on the GPU changes.
    """

    def __init__(self, meter: GpuMeter | None, reason: str | None):
        self.meter = meter
        self.reason = reason
        self.locked_mhz: int | None = None  # what is in force now (None: the GPU's own clocks)
        self.read_back_mhz: float | None = None
        self.refused: str | None = None

    @property
    def locked(self) -> bool:
        return self.locked_mhz is not None

    def apply(self, mhz: int | None) -> None:
        """Lock at `mhz` (None: the GPU's own clocks) and read it back; ClockError where it cannot."""
        if mhz is None:
            if self.locked:
                self.restore()
            return
        if self.refused is not None:
            raise ClockError(self.refused)
        if self.meter is None:
            raise ClockError(f"gpu_clock_mhz={mhz} needs NVML on this rank's GPU, which is unavailable: {self.reason}")
        try:
            self.meter.lock_sm_clocks_mhz(mhz)
        except (GpuNoPermissionError, GpuNotSupportedError) as exc:
            why = "NVML needs administrator rights for it" if isinstance(exc, GpuNoPermissionError) else \
                "this GPU does not offer locked clocks"
            self.refused = (f"gpu_clock_mhz={mhz}: locking the SM clock was refused ({exc}): {why}; ask an "
                            f"administrator or drop gpu_clock_mhz. Nothing was changed on the GPU.")
            log.error("%s", self.refused)
            raise ClockError(self.refused) from exc
        except GpuError as exc:
            raise ClockError(f"gpu_clock_mhz={mhz}: locking the SM clock failed: {exc}") from exc
        self.locked_mhz = mhz
        try:
            self.read_back_mhz = self.meter.read_sm_clock_mhz()
        except GpuError as exc:
            raise ClockError(f"gpu_clock_mhz={mhz}: cannot read the SM clock back: {exc}") from exc

    def restore(self) -> None:
        """Back to the GPU's own clocks (raises ClockError where that fails)."""
        if not self.locked:
            return
        try:
            self.meter.reset_sm_clocks()
        except GpuError as exc:
            raise ClockError(f"resetting the locked SM clock ({self.locked_mhz} MHz) failed: {exc}") from exc
        self.locked_mhz = self.read_back_mhz = None

    def state(self, requested_mhz: int | None) -> dict[str, Any] | None:
        """The record's gpu_clock block (None where the cell asked for no clock)."""
        if requested_mhz is None:
            return None
        return {"requested_mhz": requested_mhz, "locked_mhz": self.locked_mhz, "read_back_mhz": self.read_back_mhz,
                "refused": self.refused}


def restore_clocks_or_log(locker: ClockLocker) -> None:
    try:
        locker.restore()
    except ClockError as exc:
        log.error("the GPU keeps a locked SM clock (reset it with nvidia-smi -rgc): %s", exc)
