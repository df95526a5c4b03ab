"""CPU energy from RAPL under /sys/class/powercap: packages and DRAM, counter wraps handled."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from w2w.energy.periodic import PeriodicThread

POWERCAP_ROOT = Path("/sys/class/powercap")
# Seconds between background reads: the smallest ranges (32-bit µJ counters, ~4.3 kJ) wrap in
# about 20 s at 200 W, the common 262 kJ range in over 10 minutes; a read is a few small files.
RAPL_POLL_INTERVAL_S = 1.0
_TOP_ZONE = re.compile(r"intel-rapl:\d+")
_SUB_ZONE = re.compile(r"intel-rapl:\d+:\d+")
PERMISSION_FIX = (
    "since Linux 5.10 the RAPL energy files are readable by root only: run as root, or have an "
    "administrator make them readable (e.g. `chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj "
    "/sys/class/powercap/intel-rapl:*/intel-rapl:*/energy_uj` at boot, or a udev rule), or set "
    "energy.rapl=false; the GPU figures are unaffected"
)


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


@dataclass(frozen=True)
class RaplZone:
    name: str  # "package-0", or "package-0/dram" for a package's DRAM domain
    energy_file: Path  # energy_uj: µJ, wraps at max_energy_range_uj
    max_range_uj: int


class RaplMeter:
    """Accumulated energy per zone; call read_j() more often than a counter wraps (minutes at full load)."""

    def __init__(self, zones: list[RaplZone]):
        self.zones = zones
        self._lock = threading.Lock()
        self._last = {z.name: _read_int(z.energy_file) for z in zones}
        self._total_uj = dict.fromkeys(self._last, 0)

    def read_j(self) -> dict[str, float]:
        """Energy in J per zone since this meter opened; one wrap between two reads is undone."""
        with self._lock:
            for zone in self.zones:
                raw = _read_int(zone.energy_file)
                delta = raw - self._last[zone.name]
                if delta < 0:
                    delta += zone.max_range_uj
                self._total_uj[zone.name] += delta
                self._last[zone.name] = raw
            return {name: uj / 1e6 for name, uj in self._total_uj.items()}


class RaplPoller:
    """Reads a RaplMeter every interval_s on a thread of its own, so that no counter wraps twice
    between two reads, whatever else runs (no GPU sampler on CPU runs or with energy.sampler=false)."""

    def __init__(self, meter: RaplMeter, interval_s: float, on_error: Callable[[Exception], None]):
        self.meter = meter
        self._on_error = on_error
        self._thread = PeriodicThread(self._poll, interval_s, "w2w-rapl-poller")
        self.polls = 0  # reads so far (tests wait on it)

    @property
    def running(self) -> bool:
        return self._thread.running

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._thread.stop()

    def _poll(self) -> None:
        try:
            self.meter.read_j()
        except (OSError, ValueError) as exc:  # never let a bad read end the thread
            self._on_error(exc)
        self.polls += 1


def _zone_name(folder: Path) -> str:
    return (folder / "name").read_text().strip()


def discover(root: Path = POWERCAP_ROOT) -> list[RaplZone]:
    """Package zones (intel-rapl:N named package-*) and their DRAM subzones; core/uncore lie inside a package."""
    zones = []
    for top in sorted(p for p in root.glob("intel-rapl:*") if _TOP_ZONE.fullmatch(p.name)):
        package = _zone_name(top)
        if not package.startswith("package"):
            continue  # psys spans the whole platform and would count the packages twice
        zones.append(RaplZone(package, top / "energy_uj", _read_int(top / "max_energy_range_uj")))
        for sub in sorted(p for p in top.glob("intel-rapl:*") if _SUB_ZONE.fullmatch(p.name)):
            if _zone_name(sub) == "dram":
                zones.append(RaplZone(f"{package}/dram", sub / "energy_uj", _read_int(sub / "max_energy_range_uj")))
    return zones


def open_rapl(root: Path = POWERCAP_ROOT) -> tuple[RaplMeter | None, str | None]:
    """The node's RAPL meter, or None and the reason in words (with the fix where there is one)."""
    if not root.is_dir():
        return None, f"no {root}: this node exposes no RAPL (a CPU without it, or a container without powercap)"
    try:
        zones = discover(root)
        if not zones:
            return None, f"no RAPL package zones under {root}"
        return RaplMeter(zones), None
    except PermissionError as exc:
        return None, f"RAPL unreadable ({exc.filename or root}: permission denied): {PERMISSION_FIX}"
    except (OSError, ValueError) as exc:
        return None, f"RAPL unreadable under {root}: {exc}"
