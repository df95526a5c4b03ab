"""Power caps through the fake NVML and through a site command: set, verify, refuse, restore."""

from __future__ import annotations

import signal
import subprocess
from unittest import mock

import pytest
import torch

from tests.fake_nvml import FakeGpu, fake_nvml
from w2w.energy.errors import PowerCapError
from w2w.energy.monitor import EnergyMonitor
from w2w.energy.powercap import PowerCapper


def capper_for(gpu: FakeGpu, run=subprocess.run) -> PowerCapper:
    monitor = EnergyMonitor("auto", torch.device("cpu"), nvml=fake_nvml([gpu]), sampler=False)
    return PowerCapper(monitor.meter, monitor.reason, run=run)


def test_cap_is_set_verified_and_restored_through_nvml():
    gpu = FakeGpu(limit_w=400.0)
    capper = capper_for(gpu)
    capper.apply(150.0)
    assert gpu.set_calls == [150_000] and gpu.enforced_w() == 150.0
    state = capper.state(150.0)
    assert state == {"requested_w": 150.0, "enforced_w": 150.0, "original_w": 400.0, "method": "nvml", "read_error": None}
    capper.apply(175.0)
    capper.restore()
    assert gpu.set_calls == [150_000, 175_000, 400_000] and gpu.limit_w == 400.0
    capper.restore()  # nothing changed since: no call
    assert len(gpu.set_calls) == 3


def test_an_uncapped_cell_after_a_capped_one_runs_at_the_original_limit():
    gpu = FakeGpu(limit_w=300.0)
    capper = capper_for(gpu)
    capper.apply(200.0)
    capper.apply(None)
    assert gpu.limit_w == 300.0
    assert capper.state(None)["enforced_w"] == 300.0 and capper.state(None)["method"] is None


def test_permission_denied_fails_with_the_fix_and_never_runs_uncapped():
    gpu = FakeGpu(may_set_limit=False)
    capper = capper_for(gpu)
    with pytest.raises(PowerCapError) as caught:
        capper.apply(150.0)
    message = str(caught.value)
    assert "NoPermission" in message and "power_cap_command" in message and "not run uncapped" in message
    assert gpu.limit_w == 400.0
    capper.restore()  # nothing was changed, so nothing is restored
    assert gpu.set_calls == []


def test_an_enforced_limit_that_differs_fails_the_cell():
    gpu = FakeGpu(site_limit_w=200.0)
    capper = capper_for(gpu)
    with pytest.raises(PowerCapError, match="enforces 200 W"):
        capper.apply(250.0)
    capper.restore()
    assert gpu.limit_w == 400.0


def test_cap_outside_the_gpu_range_is_refused_before_any_change():
    gpu = FakeGpu(min_limit_w=100.0, max_limit_w=400.0)
    with pytest.raises(PowerCapError, match="outside this GPU's range 100-400 W"):
        capper_for(gpu).apply(50.0)
    assert gpu.set_calls == []


def test_no_meter_no_cap():
    monitor = EnergyMonitor("auto", torch.device("cpu"))
    with pytest.raises(PowerCapError, match="needs NVML"):
        PowerCapper(monitor.meter, monitor.reason).apply(150.0)
    PowerCapper(None, "x").apply(None)  # nothing asked, nothing done


def test_site_command_sets_and_restores_the_cap():
    gpu = FakeGpu(uuid="GPU-abc", limit_w=400.0)

    def wrapper(argv, **kwargs):
        gpu.limit_w = float(argv[-1])  # what the site's wrapper does through its own rights
        return subprocess.CompletedProcess(argv, 0, "", "")

    run = mock.create_autospec(subprocess.run, side_effect=wrapper)
    capper = capper_for(gpu, run)
    capper.apply(175.0, "sudo /opt/site/gpu-cap --uuid {gpu_uuid} --index {gpu_index} {watts}")
    run.assert_called_once()
    assert run.call_args.args[0] == ["sudo", "/opt/site/gpu-cap", "--uuid", "GPU-abc", "--index", "0", "175"]
    assert capper.state(175.0)["method"] == "command" and gpu.set_calls == []
    capper.restore()
    assert run.call_args.args[0][-1] == "400" and gpu.limit_w == 400.0


def test_site_command_failure_is_reported():
    run = mock.create_autospec(
        subprocess.run, return_value=subprocess.CompletedProcess([], 1, "", "gpu-cap: not allowed on this partition")
    )
    with pytest.raises(PowerCapError, match="exited with 1: gpu-cap: not allowed"):
        capper_for(FakeGpu(), run).apply(175.0, "gpu-cap {watts}")
    missing = mock.create_autospec(subprocess.run, side_effect=FileNotFoundError(2, "No such file", "gpu-cap"))
    with pytest.raises(PowerCapError, match="No such file"):
        capper_for(FakeGpu(), missing).apply(175.0, "gpu-cap {watts}")


class _Capper:
    def __init__(self, capped: bool):
        self.capped = capped
        self.restored = 0
        self.original_w = 250.0
        self.clocks = mock.Mock()  # its SM clocks' locker: restored beside the cap

    def restore(self) -> None:
        self.restored += 1


def test_a_stop_signal_restores_the_cap_and_closes_the_meter(monkeypatch):
    """Issue 28.1: SIGTERM (scancel) stops the runner by raising Stopped wherever it is; the cap set for a
    cell is restored on the way out (restore_cap_on_sigterm used to act only while capped, else did nothing)."""
    from w2w import runner, signals

    def loading(*args):
        raise signals.Stopped(signal.SIGTERM)

    monkeypatch.setattr(runner, "_load_measured", loading)
    capper, monitor = _Capper(capped=True), mock.Mock()
    with pytest.raises(signals.Stopped) as stop:
        runner._run_loaded([], mock.Mock(), monitor, capper, {})
    assert stop.value.exit_status == 143 and capper.restored == 1 and monitor.close.called
    assert capper.clocks.restore.called
