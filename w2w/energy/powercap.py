"""GPU power caps per cell: set through NVML or a site command, verified by reading back, restored at the end."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Callable
from typing import Any

from w2w.energy.clocks import ClockLocker
from w2w.energy.errors import GpuError, GpuNoPermissionError, PowerCapError
from w2w.energy.nvml import GpuMeter

log = logging.getLogger("w2w.energy")
# NVML keeps limits in mW; some GPUs round them to whole watts.
TOLERANCE_W = 1.0
COMMAND_TIMEOUT_S = 120


class PowerCapper:
    """Sets this rank's GPU power limit; remembers the original limit to restore it."""

    def __init__(self, meter: GpuMeter | None, reason: str | None, run: Callable[..., Any] = subprocess.run):
        self.meter = meter
        self.reason = reason
        self._run = run
        self.original_w: float | None = None
        self._command: str | None = None  # how the current cap was set; None: NVML
        self._changed = False
        self.method: str | None = None
        # The cell's other GPU setting (gpu_clock_mhz), travelling with the cap to every cell.
        self.clocks = ClockLocker(meter, reason)

    def apply(self, watts: float | None, command: str | None = None) -> None:
        """Cap at `watts` (None: the original limit) and verify the enforced limit; PowerCapError if not."""
        if watts is None:
            if self._changed:
                self.restore()
            return
        if self.meter is None:
            raise PowerCapError(f"power_cap_w={watts:g} needs NVML on this rank's GPU, which is unavailable: {self.reason}")
        limits = self._limits()
        low, high = limits["min_power_limit_w"], limits["max_power_limit_w"]
        if low is not None and high is not None and not low <= watts <= high:
            raise PowerCapError(f"power_cap_w={watts:g} is outside this GPU's range {low:g}-{high:g} W: choose a cap inside it")
        if self.original_w is None:
            self.original_w = limits["power_limit_w"]
        self._set(watts, command)
        self._changed = True
        self._verify(watts)

    @property
    def capped(self) -> bool:
        """A cap of ours is (or may be) in force."""
        return self._changed

    def restore(self) -> None:
        """Back to the limit found before the first cap (raises PowerCapError where that fails)."""
        if not self._changed or self.original_w is None:
            return
        self._set(self.original_w, self._command)
        # Our own limit is back; a lower one set elsewhere may still be the one enforced.
        restored = self._limits()["power_limit_w"]
        if restored is None or abs(restored - self.original_w) > TOLERANCE_W:
            raise PowerCapError(f"the power limit reads {restored} W after restoring {self.original_w:g} W")
        self._changed = False

    def state(self, requested_w: float | None) -> dict[str, Any]:
        """The record's power_cap block: requested, enforced (read now), original, how it was set."""
        enforced = error = None
        if self.meter is not None:
            try:
                enforced = self.meter.enforced_limit_w()
            except GpuError as exc:
                error = str(exc)
        return {
            "requested_w": requested_w,
            "enforced_w": enforced,
            "original_w": self.original_w,
            "method": self.method if requested_w is not None else None,
            "read_error": error,
        }

    def _limits(self) -> dict[str, float | None]:
        try:
            return self.meter.power_limits()
        except GpuError as exc:
            raise PowerCapError(f"cannot read the GPU's power limits: {exc}") from exc

    def _set(self, watts: float, command: str | None) -> None:
        self._command = command
        self.method = "command" if command else "nvml"
        if command:
            self._run_command(command, watts)
            return
        try:
            self.meter.set_power_limit_w(watts)
        except GpuNoPermissionError as exc:
            raise PowerCapError(
                f"setting the GPU power limit to {watts:g} W was refused ({exc}): NVML needs administrator "
                f"rights for it. Ask an administrator, or set power_cap_command to the wrapper your site "
                f"allows, e.g. power_cap_command='sudo nvidia-smi -i {{gpu_index}} -pl {{watts}}'. "
                f"The cell was not run uncapped."
            ) from exc
        except GpuError as exc:
            raise PowerCapError(f"setting the GPU power limit to {watts:g} W failed: {exc}") from exc

    def _run_command(self, template: str, watts: float) -> None:
        info = self.meter.info()
        argv = shlex.split(template.format(watts=f"{watts:g}", gpu_index=info["nvml_index"], gpu_uuid=info["gpu_uuid"]))
        try:
            done = self._run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PowerCapError(f"power_cap_command {argv}: {exc}") from exc
        if done.returncode != 0:
            tail = (done.stderr or done.stdout or "").strip()[-400:]
            raise PowerCapError(f"power_cap_command {argv} exited with {done.returncode}: {tail}")

    def _verify(self, watts: float) -> None:
        try:
            enforced = self.meter.enforced_limit_w()
        except GpuError as exc:
            raise PowerCapError(f"cannot read back the enforced power limit: {exc}") from exc
        if enforced is None or abs(enforced - watts) > TOLERANCE_W:
            shown = "unknown" if enforced is None else f"{enforced:g} W"
            raise PowerCapError(
                f"asked for a {watts:g} W power limit but the GPU enforces {shown} (another limit wins, "
                f"e.g. one set by the site or the board): the cell was not run"
            )


def restore_or_log(capper: PowerCapper) -> None:
    """Restore the original limit; where that fails, say how to restore it by hand."""
    try:
        capper.restore()
    except PowerCapError as exc:
        log.error("the GPU keeps a power cap (original limit %s W, restore it with nvidia-smi -pl): %s",
                  capper.original_w, exc)
