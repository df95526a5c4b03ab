"""The GPU's thermal and clock state: NVML's clock event (throttle) reasons by name, and settling before a window."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# nvmlClocksEventReason* bits (NVML API reference, NvmlClocksEventReasons); GPU idle (0x1) is no throttle.
CLOCK_EVENT_REASONS = {
    0x2: "applications clocks setting",
    0x4: "power cap (SW)",
    0x8: "HW slowdown",
    0x10: "sync boost",
    0x20: "thermal (SW)",
    0x40: "thermal (HW)",
    0x80: "power brake (HW)",
    0x100: "display clock setting",
}
# The reasons that mean the clocks were held down by power or heat: a cell that saw one ran throttled.
THROTTLING = 0x4 | 0x8 | 0x20 | 0x40 | 0x80
SETTLE_POLL_S = 1.0  # s between temperature reads while settling
SETTLE_READS = 5  # consecutive reads that must agree within SETTLE_BAND_C
SETTLE_BAND_C = 1.0


def reason_names(mask: int | None) -> list[str] | None:
    """The reasons set in an NVML clock event mask, by name; None where it was not read."""
    if mask is None:
        return None
    return [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]


def throttled(mask: int | None) -> bool | None:
    return None if mask is None else bool(mask & THROTTLING)


def merge_masks(masks: list[int | None]) -> int | None:
    """Every reason seen in any read; None where none was read."""
    seen = [m for m in masks if m is not None]
    result = 0
    for mask in seen:
        result |= mask
    return result if seen else None


@dataclass(frozen=True)
class Settled:
    """How a settle before a cell ended."""

    waited_s: float  # s
    temp_c: float | None  # the last temperature read; None: no thermometer
    stable: bool | None  # the temperature held within the band; None: no thermometer (a plain wait)


def settle(seconds: float, read_temp: Callable[[], float] | None, clock: Callable[[], float],
           sleep: Callable[[float], None]) -> Settled:
    """Wait up to `seconds`, ending early once SETTLE_READS temperature reads agree within SETTLE_BAND_C.

    With no thermometer it is a plain wait of `seconds`.
    """
    start = clock()
    if read_temp is None:
        sleep(seconds)
        return Settled(clock() - start, None, None)
    temps = [read_temp()]
    while clock() - start < seconds:
        recent = temps[-SETTLE_READS:]
        if len(recent) == SETTLE_READS and max(recent) - min(recent) <= SETTLE_BAND_C:
            return Settled(clock() - start, temps[-1], True)
        sleep(min(SETTLE_POLL_S, max(seconds - (clock() - start), 0.0)))
        temps.append(read_temp())
    recent = temps[-SETTLE_READS:]
    return Settled(clock() - start, temps[-1], len(recent) == SETTLE_READS and max(recent) - min(recent) <= SETTLE_BAND_C)
