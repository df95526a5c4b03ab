"""RAPL CPU energy over a fake /sys/class/powercap tree: two packages, DRAM, a counter wrap, no permission."""

from __future__ import annotations

import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.fake_nvml import FakeGpu, fake_nvml
from w2w.energy import rapl as rapl_module
from w2w.energy.monitor import EnergyMonitor
from w2w.energy.rapl import open_rapl
from w2w.files import write_atomic

MAX_RANGE_UJ = 262_143_328_850


def write_zone(folder: Path, name: str, energy_uj: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "name").write_text(name + "\n")
    (folder / "energy_uj").write_text(f"{energy_uj}\n")
    (folder / "max_energy_range_uj").write_text(f"{MAX_RANGE_UJ}\n")
    return folder / "energy_uj"


@pytest.fixture
def powercap(tmp_path: Path) -> dict[str, Path]:
    """Two packages (the first with DRAM and a core subzone), a psys zone, and an MMIO duplicate."""
    root = tmp_path / "powercap"
    files = {
        "package-0": write_zone(root / "intel-rapl:0", "package-0", 1_000_000),
        "package-0/dram": write_zone(root / "intel-rapl:0" / "intel-rapl:0:0", "dram", 500_000),
        "package-1": write_zone(root / "intel-rapl:1", "package-1", MAX_RANGE_UJ - 2_000_000),
    }
    write_zone(root / "intel-rapl:0" / "intel-rapl:0:1", "core", 7)  # inside the package already
    write_zone(root / "intel-rapl:2", "psys", 9)  # the whole platform: would count twice
    write_zone(root / "intel-rapl-mmio:0", "package-0", 11)  # the same package through MMIO
    files["root"] = root
    return files


def bump(path: Path, delta_uj: int) -> None:
    value = (int(path.read_text()) + delta_uj) % MAX_RANGE_UJ  # the hardware wraps at the range
    path.write_text(f"{value}\n")


def test_discovers_packages_and_dram_only(powercap):
    meter, reason = open_rapl(powercap["root"])
    assert reason is None
    assert [z.name for z in meter.zones] == ["package-0", "package-0/dram", "package-1"]


def test_energy_accumulates_across_a_counter_wrap(powercap):
    meter, _ = open_rapl(powercap["root"])
    bump(powercap["package-0"], 30_000_000)
    bump(powercap["package-0/dram"], 4_000_000)
    bump(powercap["package-1"], 5_000_000)  # from 2 J below the range: wraps
    assert int(powercap["package-1"].read_text()) < 5_000_000
    first = meter.read_j()
    assert first == {"package-0": pytest.approx(30.0), "package-0/dram": pytest.approx(4.0), "package-1": pytest.approx(5.0)}
    bump(powercap["package-1"], 1_000_000)
    assert meter.read_j()["package-1"] == pytest.approx(6.0)


def test_monitor_window_reports_node_cpu_energy_with_a_wrap_inside(powercap):
    monitor = EnergyMonitor("none", torch.device("cpu"), rapl=True, rapl_root=powercap["root"])
    assert monitor.rapl is not None and monitor.cpu_reason is None
    monitor.begin_window("cell")
    bump(powercap["package-0"], 120_000_000)
    bump(powercap["package-1"], 80_000_000)  # wraps
    window = monitor.end_window("cell")
    assert window.cpu_j == pytest.approx(200.0) and window.cpu_j > 0
    assert window.cpu_zones_j == {"package-0": pytest.approx(120.0), "package-0/dram": 0.0, "package-1": pytest.approx(80.0)}
    assert window.gpu_j is None  # the CPU figure stands alone


def test_permission_denied_gives_the_fix(powercap):
    denied = PermissionError(13, "Permission denied", str(powercap["package-0"]))
    with mock.patch.object(rapl_module, "_read_int", autospec=True, side_effect=denied):
        monitor = EnergyMonitor("none", torch.device("cpu"), rapl=True, rapl_root=powercap["root"])
    assert monitor.rapl is None
    assert "permission denied" in monitor.cpu_reason and "chmod" in monitor.cpu_reason
    assert "energy.rapl=false" in monitor.cpu_reason and "GPU figures are unaffected" in monitor.cpu_reason
    monitor.begin_window("cell")
    assert monitor.end_window("cell").cpu_j is None


def test_no_powercap_tree(tmp_path):
    meter, reason = open_rapl(tmp_path / "absent")
    assert meter is None and "exposes no RAPL" in reason


def test_rapl_off_and_other_local_ranks_say_why():
    cfg_energy = type("E", (), {"backend": "none", "sample_interval_s": 0.1, "sampler": True,
                                "instant_power": True, "rapl": True})()
    other = EnergyMonitor.from_config(cfg_energy, torch.device("cpu"), local_rank=1)
    assert other.rapl is None and "local rank 0" in other.cpu_reason
    assert EnergyMonitor("none", torch.device("cpu")).cpu_reason == "energy.rapl=false"


def _bump_atomic(path: Path, delta_uj: int) -> None:
    """bump(), but never a half-written file under the poller's thread."""
    write_atomic(path, f"{(int(path.read_text()) + delta_uj) % MAX_RANGE_UJ}\n".encode())


def _next_poll(poller, timeout_s: float = 10.0) -> None:
    polls, deadline = poller.polls, time.monotonic() + timeout_s
    while poller.polls == polls:
        assert time.monotonic() < deadline, "the RAPL poller did not read"
        time.sleep(0.005)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-only", "gpu-without-sampler"])
def test_rapl_is_read_on_its_own_timer_across_several_wraps_in_one_window(powercap, gpu):
    """No GPU sampler thread (a CPU run, or energy.sampler=false): RAPL still never misses a wrap."""
    if gpu:
        nvml = fake_nvml([FakeGpu()])
        monitor = EnergyMonitor("auto", torch.device("cpu"), nvml=nvml, sampler=False, rapl=True,
                                rapl_root=powercap["root"], rapl_interval_s=0.01, counter_period_s=0.001)
        assert monitor.available and monitor.sampler is None
    else:
        monitor = EnergyMonitor("none", torch.device("cpu"), rapl=True, rapl_root=powercap["root"],
                                rapl_interval_s=0.01)
    assert not monitor.rapl_poller.running  # reads only while a window is open
    monitor.begin_window("cell")
    step = int(0.7 * MAX_RANGE_UJ)
    for _ in range(3):  # 2.1 ranges in one window: more than one wrap between its two edges
        _bump_atomic(powercap["package-1"], step)
        _next_poll(monitor.rapl_poller)
    window = monitor.end_window("cell")
    assert window.cpu_zones_j["package-1"] == pytest.approx(3 * step / 1e6)
    assert not monitor.rapl_poller.running and monitor.cpu_reason is None
    monitor.close()
