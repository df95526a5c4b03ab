"""GPU energy windows, sampler and NVML handling against a fake pynvml driven by a fake clock."""

from __future__ import annotations

import threading
import time
import warnings
from unittest import mock

import pynvml
import pytest
import torch

from tests.fake_nvml import FakeClock, FakeGpu, fake_nvml
from w2w.config import compose_cell
from w2w.energy.errors import (
    EnergyError,
    GpuInitError,
    GpuNoPermissionError,
    GpuNotSupportedError,
    GpuReadError,
    WindowError,
)
from w2w.energy.monitor import (
    MIN_TRUSTED_WINDOW_S,
    SOURCE_COUNTER,
    SOURCE_INTEGRATED,
    SOURCE_NONE,
    EnergyMonitor,
    Window,
    device_sync,
)
from w2w.energy.nvml import call
from w2w.energy.periodic import PeriodicThread
from w2w.energy.sampler import Sampler, integrate, summarize, timeline_frame
from w2w.errors import ConfigError

CPU = torch.device("cpu")


def monitor_for(gpus: list[FakeGpu], clock=None, **kwargs) -> tuple[EnergyMonitor, object]:
    clock = clock or time.perf_counter
    nvml = fake_nvml(gpus, clock)
    kwargs.setdefault("sampler", False)
    return EnergyMonitor("auto", CPU, nvml=nvml, clock=clock, sleep=getattr(clock, "sleep", time.sleep), **kwargs), nvml


def test_counter_window_follows_the_fake_clock():
    clock = FakeClock()
    monitor, _ = monitor_for([FakeGpu(power_w=250.0)], clock)
    assert monitor.source == SOURCE_COUNTER and monitor.reason is None
    monitor.begin_window("cell")
    clock.sleep(4.0)
    window = monitor.end_window("cell")
    assert isinstance(window, Window)
    assert window.gpu_j == pytest.approx(1000.0)
    assert window.counter_gpu_j == window.gpu_j
    assert window.duration_s == pytest.approx(4.0)
    assert window.source == SOURCE_COUNTER and window.error is None and not window.short


def test_nested_phase_windows_add_up_to_the_cell():
    clock = FakeClock()
    gpu = FakeGpu(power_w=100.0)
    monitor, _ = monitor_for([gpu], clock)
    monitor.begin_window("cell")
    phases = {}
    for phase, seconds, watts in (("prefill", 0.5, 300.0), ("decode", 2.0, 200.0)):
        gpu.set_power(watts, clock())
        monitor.begin_window(phase)
        clock.sleep(seconds)
        phases[phase] = monitor.end_window(phase).gpu_j
    cell = monitor.end_window("cell")
    assert phases == {"prefill": pytest.approx(150.0), "decode": pytest.approx(400.0)}
    assert cell.gpu_j == pytest.approx(550.0)


def test_window_shorter_than_the_counter_period_warns():
    clock = FakeClock(1000.0)
    monitor, _ = monitor_for([FakeGpu(power_w=300.0, counter_period_s=0.1)], clock)
    monitor.begin_window("prefill")
    clock.sleep(0.03)
    with pytest.warns(UserWarning, match="shorter than NVML's energy counter update period"):
        window = monitor.end_window("prefill")
    assert window.short
    assert window.gpu_j == 0.0  # what a real counter reads inside one update period


def test_long_window_does_not_warn():
    clock = FakeClock()
    monitor, _ = monitor_for([FakeGpu()], clock)
    monitor.begin_window("cell")
    clock.sleep(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not monitor.end_window("cell").short


def test_counter_missing_integrates_the_samples_and_says_so():
    clock = FakeClock()
    gpu = FakeGpu(power_w=180.0, counter=False)
    # An hour's interval: the thread reads once as it starts, then waits for its stop; the test reads instead.
    monitor, _ = monitor_for([gpu], clock, sampler=True, sample_interval_s=3600.0)
    assert monitor.source == SOURCE_INTEGRATED
    monitor.begin_window("cell")
    for _ in range(10):
        clock.sleep(0.01)
        monitor.sampler.sample()  # what the thread does at each of its deadlines
    window = monitor.end_window("cell")
    monitor.close()
    assert window.source == SOURCE_INTEGRATED and window.counter_gpu_j is None
    assert window.duration_s == pytest.approx(0.1)
    assert window.gpu_j == pytest.approx(180.0 * 0.1, rel=1e-9)
    fed = {round(0.01 * k, 6) for k in range(1, 11)}
    assert fed <= {round(row[0] - 1000.0, 6) for row in window.samples}  # the samples between the edges count


def test_instant_power_preferred_average_otherwise():
    with_field, _ = monitor_for([FakeGpu(instant=True)])
    without, _ = monitor_for([FakeGpu(instant=False)])
    assert with_field.power_reading == "instant"
    assert without.power_reading == "average"
    assert with_field.gpu_record()["power_reading"] == "instant"


def test_read_error_mid_run_voids_that_window_and_later_windows_still_measure():
    clock = FakeClock(1000.0)
    gpu = FakeGpu(power_w=100.0, failing=lambda t: 1001.0 <= t < 1002.0)
    monitor, _ = monitor_for([gpu], clock)
    monitor.begin_window("cell-1")
    clock.sleep(1.5)  # the end read lands inside the failure
    broken = monitor.end_window("cell-1")
    assert broken.gpu_j is None
    assert "NVML read error" in broken.error and "nvmlDeviceGetTotalEnergyConsumption" in broken.error
    clock.sleep(1.0)
    monitor.begin_window("cell-2")
    clock.sleep(1.0)
    assert monitor.end_window("cell-2").gpu_j == pytest.approx(100.0)


def test_sampler_errors_void_an_integrated_window():
    clock = FakeClock(1000.0)
    gpu = FakeGpu(power_w=100.0, counter=False, failing=lambda t: 1000.5 <= t < 1001.0)
    monitor, _ = monitor_for([gpu], clock, sampler=True, sample_interval_s=60.0)
    monitor.begin_window("cell")
    clock.sleep(0.6)
    monitor.sampler.sample()  # a reading inside the failure
    clock.sleep(0.6)
    window = monitor.end_window("cell")
    assert window.gpu_j is None and "NVML read error" in window.error
    assert window.telemetry_errors


def test_mig_is_reported_unsupported_not_a_crash():
    monitor, _ = monitor_for([FakeGpu(mig=True)])
    assert monitor.source == SOURCE_NONE and not monitor.available
    assert "MIG" in monitor.reason
    monitor.begin_window("cell")
    window = monitor.end_window("cell")
    assert window.gpu_j is None and "MIG" in window.reason
    with pytest.raises(EnergyError, match="MIG"):
        EnergyMonitor("nvml", CPU, nvml=fake_nvml([FakeGpu(mig=True)]))


def test_no_nvml_library_is_a_reason_under_auto_and_an_error_under_nvml():
    nvml = fake_nvml([FakeGpu()])
    nvml.nvmlInit.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    monitor = EnergyMonitor("auto", CPU, nvml=nvml)
    assert monitor.source == SOURCE_NONE and "LibraryNotFound" in monitor.reason
    with pytest.raises(EnergyError, match=r"energy\.backend=nvml"):
        EnergyMonitor("nvml", CPU, nvml=nvml)


def test_nvml_backend_on_a_cpu_run_fails_before_anything_loads():
    with pytest.raises(EnergyError, match="needs a GPU"):
        EnergyMonitor("nvml", CPU)
    assert "no GPU" in EnergyMonitor("auto", CPU).reason
    with pytest.raises(ConfigError, match=r"energy\.backend=nvml needs a GPU"):
        compose_cell(["energy.backend=nvml"])


@pytest.mark.parametrize(
    ("code", "kind"),
    [(pynvml.NVML_ERROR_NOT_SUPPORTED, GpuNotSupportedError), (pynvml.NVML_ERROR_NO_PERMISSION, GpuNoPermissionError),
     (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, GpuInitError), (pynvml.NVML_ERROR_UNKNOWN, GpuReadError)],
)
def test_nvml_errors_map_to_typed_exceptions(code, kind):
    nvml = fake_nvml([FakeGpu()])
    nvml.nvmlDeviceGetPowerUsage.side_effect = pynvml.NVMLError(code)
    with pytest.raises(kind) as caught:
        call(nvml, "nvmlDeviceGetPowerUsage", object())
    assert caught.value.code == code and "nvmlDeviceGetPowerUsage" in str(caught.value)


def test_rank_finds_its_gpu_through_cuda_visible_devices(monkeypatch):
    gpus = [FakeGpu(uuid=f"GPU-{i}") for i in range(4)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    monitor, nvml = monitor_for(gpus, local_rank=1)
    nvml.nvmlDeviceGetHandleByIndex.assert_called_once_with(1)
    assert monitor.gpu_record()["gpu_uuid"] == "GPU-1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2,GPU-0")
    monitor, nvml = monitor_for(gpus, local_rank=0)
    nvml.nvmlDeviceGetHandleByUUID.assert_called_once_with("GPU-2")
    assert monitor.gpu_record()["gpu_uuid"] == "GPU-2"


def test_gpu_record_carries_identity_and_power_limits():
    record, _ = monitor_for([FakeGpu(name="NVIDIA H100 80GB HBM3", limit_w=700.0, max_limit_w=700.0, site_limit_w=650.0)])
    info = record.gpu_record()
    assert info["gpu_name"] == "NVIDIA H100 80GB HBM3" and info["driver"] == "550.54.15"
    assert info["power_limit_w"] == 700.0 and info["enforced_power_limit_w"] == 650.0
    assert info["energy_counter"] is True and info["memory_total_mib"] == pytest.approx(81_920.0)


def test_idle_baseline_is_energy_over_time():
    clock = FakeClock()
    monitor, _ = monitor_for([FakeGpu(power_w=62.5)], clock)
    idle = monitor.measure_idle(5.0)
    assert idle.idle_power_w == pytest.approx(62.5) and idle.idle_s == pytest.approx(5.0)
    skipped = monitor.measure_idle(0)
    assert skipped.idle_power_w is None and "idle_seconds=0" in skipped.idle_reason


def test_no_meter_never_invents_a_number():
    monitor = EnergyMonitor("none", CPU)
    monitor.begin_window("cell")
    window = monitor.end_window("cell")
    assert window.gpu_j is None and window.source == SOURCE_NONE and window.reason == "energy.backend=none"
    start = time.perf_counter()
    idle = monitor.measure_idle(5.0)
    assert idle.idle_power_w is None and idle.idle_reason == "energy.backend=none"
    assert time.perf_counter() - start < 1.0  # no meter: no waiting


def test_integrate_is_exact_for_piecewise_linear_power():
    rows = [(0.0, 100.0), (1.0, 200.0), (3.0, 200.0)]
    assert integrate(rows, 0.0, 3.0) == pytest.approx(150.0 + 400.0)
    assert integrate(rows, 0.5, 2.0) == pytest.approx((150.0 + 200.0) / 2 * 0.5 + 200.0)
    assert integrate(rows, -1.0, 4.0) == pytest.approx(100.0 + 550.0 + 200.0)  # held flat outside the rows
    assert integrate([], 0.0, 1.0) is None


def test_sampler_keeps_rows_in_time_order_and_errors_apart():
    clock = FakeClock(10.0)
    values = iter([(1.0,), (2.0,), GpuReadError("boom"), (4.0,)])

    def read():
        value = next(values)
        if isinstance(value, Exception):
            raise value
        return value

    sampler = Sampler(read, 0.1, clock)
    for _ in range(4):
        sampler.sample()
        clock.sleep(0.1)
    assert [row[1] for row in sampler.rows(0.0, 100.0)] == [1.0, 2.0, 4.0]
    assert sampler.errors(10.15, 10.25) == ["boom"]
    assert sampler.rows(10.05, 10.15) == [(pytest.approx(10.1), 2.0)]


def test_periodic_thread_ticks_on_a_grid_of_deadlines_that_a_slow_tick_does_not_shift():
    clock, ticks, waits = FakeClock(0.0), [], []
    took = iter([0.002, 0.015, 0.001, 0.001, 0.0, 0.0])  # the second tick overruns its 10 ms period

    def tick():
        ticks.append(clock())
        clock.sleep(next(took))

    def wait(seconds: float) -> bool:  # the stop event's wait, on the fake clock
        waits.append(seconds)
        clock.sleep(seconds)
        return len(ticks) == 6

    PeriodicThread(tick, 0.01, "test", clock).run(wait)
    assert ticks == pytest.approx([0.0, 0.01, 0.025, 0.03, 0.04, 0.05])  # late once, then back on the grid
    assert waits == pytest.approx([0.008, 0.0, 0.004, 0.009, 0.01, 0.01])


def test_sampler_thread_reads_until_stopped_and_keeps_every_reading():
    calls, third = [], threading.Event()

    def read() -> tuple[float]:
        calls.append(1)
        if len(calls) == 3:
            third.set()
        return (1.0,)

    sampler = Sampler(read, 0.001)
    sampler.start()
    assert sampler.running
    assert third.wait(timeout=60)  # an event, not a wall-clock bound: the thread keeps reading
    sampler.stop()
    assert not sampler.running
    rows = sampler.rows(0.0, float("inf"))
    assert len(rows) == len(calls) >= 3  # one row per reading, none read after the stop
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)


def test_telemetry_summary_and_timeline_frame():
    rows = [(1.0, 100.0, 80.0, 30.0, 1000.0, 60.0, 1400.0, 0.0), (1.1, 200.0, 100.0, 50.0, 2000.0, 62.0, 1500.0, 4.0)]
    summary = summarize(rows, memory_total_mib=4000.0, errors=[])
    assert summary["sm_util_avg_pct"] == pytest.approx(90.0) and summary["mem_util_max_pct"] == 50.0
    assert summary["mem_used_max_pct"] == 50.0 and summary["power_max_w"] == 200.0
    frame = timeline_frame(rows, t0=1.0, start_unix_s=1.7e9, rank=3)
    assert list(frame.columns[:3]) == ["rank", "t_s", "unix_s"]
    assert frame["t_s"].tolist() == pytest.approx([0.0, 0.1]) and (frame["rank"] == 3).all()
    assert summarize([], None, ["x"])["sm_util_avg_pct"] is None


@pytest.mark.parametrize(
    ("override", "message"),
    [("energy.idle_seconds=-1", "energy.idle_seconds=-1"),
     ("power_cap_command='sudo setcap {gpu_index}'", "must contain {watts}"),
     ("power_cap_command='sudo setcap {watt}'", "unknown or malformed placeholder"),
     ("energy.min_window_periods=-1", "energy.min_window_periods=-1.0: must be >= 0"),
     ("energy.settle_s=-5", "energy.settle_s=-5.0: must be in"),
     ("cluster.pue=0.8", "cluster.pue=0.8: must be finite and >= 1")],
)
def test_config_rejects_bad_energy_options(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_cell([override])


def test_config_defaults():
    cfg = compose_cell([])
    assert cfg.energy.idle_seconds == 5.0 and cfg.energy.rapl and cfg.energy.sampler and cfg.energy.instant_power
    assert cfg.power_cap_command is None
    assert cfg.energy.min_window_periods == 10.0 and cfg.energy.settle_s == 0.0 and cfg.cluster.pue is None


def test_telemetry_averages_are_weighted_by_time_not_by_row():
    # 9 s at 10 % seen by two sampler rows, then a burst of phase-edge rows in the last second.
    rows = [(t, 200.0, sm, 40.0, 1000.0, 60.0, 1400.0, 0.0)
            for t, sm in ((0.0, 10.0), (9.0, 10.0), (9.5, 100.0), (9.6, 100.0), (9.7, 100.0), (10.0, 100.0))]
    summary = summarize(rows, None, [], 0.0, 10.0)
    assert summary["sm_util_avg_pct"] == pytest.approx((9 * 10.0 + 0.5 * 55.0 + 0.5 * 100.0) / 10)  # 16.75
    assert summary["samples"] == 6  # a plain mean over these rows would say 70 %
    # Held flat outside the rows, as integrate() holds power: a window wider than its rows.
    assert summarize(rows, None, [], -10.0, 10.0)["sm_util_avg_pct"] == pytest.approx((100.0 + 167.5) / 20)
    assert summarize(rows[:1], None, [])["sm_util_avg_pct"] == 10.0  # one instant: its value


def test_phase_edge_samples_do_not_bias_a_cells_averages():
    """Four batches: a short prefill at low SM use, a long decode at high, two edge rows per boundary."""
    clock = FakeClock(0.0)
    gpu = FakeGpu(power_w=100.0)
    monitor, _ = monitor_for([gpu], clock, counter_period_s=0.1)  # no inference: the clock stays at 0
    sampler = Sampler(monitor.meter.telemetry, 1.0, clock)
    phases = [(0.05, 30, 100.0), (2.45, 90, 300.0)] * 4  # (s, SM %, W)
    ticks = iter(float(t) for t in range(1, 11))
    next_tick = next(ticks)
    truth_sm = truth_j = 0.0
    for seconds, sm, watts in phases:
        sampler.sample()  # the previous phase's end edge
        gpu.sm_util, gpu.power_w = sm, watts
        sampler.sample()  # this phase's start edge
        end = clock() + seconds
        while next_tick is not None and next_tick < end - 1e-9:  # the sampler thread's grid
            clock.now = next_tick
            sampler.sample()
            next_tick = next(ticks, None)
        clock.now = end
        truth_sm, truth_j = truth_sm + sm * seconds, truth_j + watts * seconds
    sampler.sample()
    rows = sampler.rows(0.0, 10.0)
    summary = summarize(rows, None, [], 0.0, 10.0)
    plain = sum(row[2] for row in rows) / len(rows)
    assert abs(plain - truth_sm / 10) > 5.0  # the bias this guards against is real here
    assert summary["sm_util_avg_pct"] == pytest.approx(truth_sm / 10)
    assert summary["power_avg_w"] * 10.0 == pytest.approx(integrate(rows, 0.0, 10.0))  # one weighting
    assert summary["power_avg_w"] * 10.0 == pytest.approx(truth_j)


def test_a_duplicate_or_unknown_window_name_is_a_typed_error_and_changes_nothing():
    clock = FakeClock()
    monitor, _ = monitor_for([FakeGpu(power_w=100.0)], clock, counter_period_s=0.1)
    monitor.begin_window("cell")
    clock.sleep(1.0)
    with pytest.raises(WindowError, match="energy window 'cell' is open already"):
        monitor.begin_window("cell")  # before: it silently restarted the window
    with pytest.raises(WindowError, match=r"energy window 'decode' was never begun \(open windows: 'cell'\)"):
        monitor.end_window("decode")  # before: a bare KeyError
    clock.sleep(1.0)
    assert monitor.end_window("cell").gpu_j == pytest.approx(200.0)  # the first begin still counts
    with pytest.raises(WindowError, match=r"'cell' was never begun \(open windows: none\)"):
        monitor.end_window("cell")


def test_windows_sync_the_device_at_both_edges_unless_told_not_to():
    clock = FakeClock()
    queued_s = 0.5  # work launched before each edge that the device has not finished

    def sync():
        clock.sleep(queued_s)

    synced = mock.Mock(side_effect=sync)
    monitor, _ = monitor_for([FakeGpu(power_w=100.0)], clock, counter_period_s=0.1, sync=synced)
    monitor.begin_window("cell")  # the earlier work finishes before the window opens
    clock.sleep(1.0)
    window = monitor.end_window("cell")  # the window's own queued work is counted in it
    assert synced.call_count == 2
    assert window.duration_s == pytest.approx(1.0 + queued_s) and window.gpu_j == pytest.approx(150.0)
    monitor.begin_window("raw", sync=False)
    with pytest.warns(UserWarning, match="update period"):  # 0 s long
        monitor.end_window("raw", sync=False)
    assert synced.call_count == 2


def test_device_sync_waits_on_cuda_devices_only():
    with mock.patch.object(torch.cuda, "synchronize", autospec=True) as synchronize:
        device_sync(torch.device("cuda", 1))()
        device_sync(CPU)()
    synchronize.assert_called_once_with(torch.device("cuda", 1))


def test_counter_update_period_is_inferred_per_gpu():
    clock = FakeClock()
    gpus = [FakeGpu(uuid="GPU-fast", counter_period_s=0.02), FakeGpu(uuid="GPU-slow", counter_period_s=0.1),
            FakeGpu(uuid="GPU-still", power_w=0.0)]
    nvml = fake_nvml(gpus, clock)

    def monitor(local_rank: int) -> EnergyMonitor:
        return EnergyMonitor("auto", CPU, nvml=nvml, clock=clock, sleep=clock.sleep, sampler=False,
                             local_rank=local_rank)

    fast, slow, still = monitor(0), monitor(1), monitor(2)
    assert fast.counter_period_s == pytest.approx(0.02, abs=0.0021)  # within one poll
    assert slow.counter_period_s == pytest.approx(0.1, abs=0.0021)
    assert still.counter_period_s == MIN_TRUSTED_WINDOW_S  # a counter that never moved: the fallback
    assert slow.gpu_record()["counter_period_s"] == slow.counter_period_s
    for meter, warns in ((fast, False), (slow, True)):
        meter.begin_window("phase")
        clock.sleep(0.05)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            short = meter.end_window("phase").short
        assert short is warns and any("update period" in str(w.message) for w in caught) is warns
    assert EnergyMonitor("none", CPU).counter_period_s is None  # no counter, nothing to infer
