"""Energy windows that open and close with the generation phases (prefill, decode) of a cell's batches."""

from __future__ import annotations

from dataclasses import dataclass, field

from w2w.energy.monitor import EnergyMonitor


@dataclass
class PhaseEnergy:
    """Energy windows that follow the generation phases of every batch of a cell."""

    monitor: EnergyMonitor
    joules: dict[str, float | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    short_windows: dict[str, int] = field(default_factory=dict)  # per phase: windows under the counter's period

    def on_boundary(self, previous: str | None, following: str | None) -> None:
        if previous is not None:
            window = self.monitor.end_window(previous)
            total = self.joules.get(previous, 0.0)
            self.joules[previous] = None if total is None or window.gpu_j is None else total + window.gpu_j
            if window.error:
                self.errors.append(f"{previous}: {window.error}")
            self.short_windows[previous] = self.short_windows.get(previous, 0) + int(window.short)
        if following is not None:
            self.monitor.begin_window(following)
