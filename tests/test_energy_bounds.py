"""Issue 19 on the sensor side: each window's uncertainty bound, short-window flags, the GPU's state and throttle reasons."""

from __future__ import annotations

import pytest
import torch

from tests.fake_nvml import FakeClock, FakeGpu, fake_nvml
from w2w.cell_record import batch_energy, gpu_state, window_flags, window_state
from w2w.energy import gpustate
from w2w.energy.bounds import (
    NVML_COUNTER_RESOLUTION_J,
    RAPL_RESOLUTION_J,
    GpuReading,
    cpu_bound_j,
    gpu_bound_j,
)
from w2w.energy.monitor import EnergyMonitor
from w2w.records import Batch, BatchEnergy, Segment, Totals

CPU = torch.device("cpu")


def monitor_for(gpu: FakeGpu, clock: FakeClock, **kwargs) -> EnergyMonitor:
    kwargs.setdefault("sampler", False)
    return EnergyMonitor("auto", CPU, nvml=fake_nvml([gpu], clock), clock=clock, sleep=clock.sleep, **kwargs)


def test_counter_window_bound_is_resolution_and_one_period_of_peak_power_per_edge():
    clock = FakeClock()
    monitor = monitor_for(FakeGpu(power_w=250.0, counter_period_s=0.1), clock, counter_period_s=0.1)
    monitor.begin_window("batch")
    clock.sleep(4.0)
    window = monitor.end_window("batch")
    assert window.gpu_j == pytest.approx(1000.0) and window.period_s == 0.1
    assert window.gpu_bound_j == pytest.approx(2 * NVML_COUNTER_RESOLUTION_J + 2 * 250.0 * 0.1)
    assert window.window_periods == pytest.approx(40.0)


def test_bound_adds_the_gap_between_counter_and_samples_and_the_unsampled_share():
    counter = GpuReading("nvml_counter", 2.0, 0.05, counter_j=400.0, integrated_j=390.0, power_max_w=220.0,
                         power_min_w=180.0, coverage=0.25)
    assert gpu_bound_j(counter) == pytest.approx(0.002 + 2 * 220.0 * 0.05 + 10.0)
    integrated = GpuReading("nvml_integrated", 2.0, 0.1, counter_j=None, integrated_j=390.0, power_max_w=220.0,
                            power_min_w=180.0, coverage=0.25)
    # Each edge held one interval at the peak; 75% of the time unsampled, anywhere in the 40 W range seen.
    assert gpu_bound_j(integrated) == pytest.approx(2 * 220.0 * 0.1 + 0.75 * 40.0 * 2.0)
    unknown = GpuReading("nvml_integrated", 2.0, 0.1, None, 390.0, 220.0, 180.0, coverage=None)
    assert gpu_bound_j(unknown) == pytest.approx(2 * 220.0 * 0.1)  # no term invented for an unknown GPU
    assert gpu_bound_j(GpuReading("nvml_counter", 2.0, 0.05, None, None, None, None, None)) is None


def test_rapl_bound_counts_the_read_timer_at_both_edges():
    # 100 J over 10 s is 10 W; 3 zones; each edge: resolution per zone, and (1 ms update + 4 ms read) at 10 W.
    assert cpu_bound_j(100.0, 10.0, zones=3, read_s=0.004) == pytest.approx(2 * (3 * RAPL_RESOLUTION_J + 10.0 * 0.005))
    assert cpu_bound_j(None, 10.0, zones=3, read_s=0.0) is None


def test_the_uncertainty_is_carried_through_a_sum():
    def batch(gpu_j, bound):
        return Batch.from_dict({"index": 0, "segment": 0, "counts": {},
                                "times": {"total_s": 1.0, "prefill_s": 0.1, "decode_s": 0.9, "start_unix_s": 1.0},
                                "energy": {"gpu_j": gpu_j, "gpu_bound_j": bound, "cpu_j": None}})

    totals = Totals.of([batch(100.0, 1.5), batch(200.0, 2.5), batch(50.0, 0.25)], [Segment(segment=0)])
    assert totals.energy["gpu_j"] == pytest.approx(350.0)
    assert totals.energy["gpu_bound_j"] == pytest.approx(4.25)  # linear: the worst case, not sqrt of squares
    partial = Totals.of([batch(100.0, 1.5), batch(200.0, None)], [Segment(segment=0)])
    assert partial.energy["gpu_bound_j"] is None  # never a partial bound


def test_short_windows_are_flagged():
    clock = FakeClock()
    monitor = monitor_for(FakeGpu(power_w=300.0, counter_period_s=0.1), clock, counter_period_s=0.1)
    batches = []
    for seconds in (0.5, 2.0, 0.95):  # 5, 20 and 9.5 periods
        monitor.begin_window("batch")
        clock.sleep(seconds)
        batches.append(Batch(0, 0, energy=batch_energy(monitor.end_window("batch"), None, None)))
    flags = window_flags(batches, min_periods=10.0)
    assert flags["short_windows"] == 2 and flags["shortest_window_periods"] == pytest.approx(5.0)
    assert flags["window_period_s"] == 0.1
    assert window_flags(batches, min_periods=0.0)["short_windows"] == 0
    assert window_flags([Batch(0, 0, energy=BatchEnergy())], 10.0)["short_windows"] is None  # no meter: unknown


def test_throttle_reasons_are_read_through_the_fake_nvml():
    clock = FakeClock(1000.0)
    mask = {"now": gpustate_idle()}
    gpu = FakeGpu(power_w=200.0, temp_at=lambda t: 50.0 + (t - 1000.0), clock_events_at=lambda t: mask["now"])
    monitor = monitor_for(gpu, clock, sampler=True, sample_interval_s=3600.0, counter_period_s=0.1)
    monitor.begin_window("cell")
    clock.sleep(1.0)
    mask["now"] = 0x4 | 0x40  # power cap and HW thermal, between the edges: only the sampler sees it
    monitor.sampler.sample()
    mask["now"] = gpustate_idle()
    clock.sleep(2.0)
    window = monitor.end_window("cell")
    assert window.state_start.temp_c == 50.0 and window.state_end.temp_c == 53.0
    assert window.state_start.sm_clock_mhz == 1410.0 and window.state_end.sm_clock_mhz == 1410.0
    assert window.clock_events == 0x1 | 0x4 | 0x40
    state = gpu_state(window, [Batch(0, 0, gpu_state=window_state(window))], None)
    assert state.throttled is True and state.clock_event_names == ["power cap (SW)", "thermal (HW)"]
    assert state.temp_start_c == 50.0 and state.temp_end_c == 53.0
    monitor.begin_window("quiet")
    clock.sleep(1.0)
    quiet = monitor.end_window("quiet")
    assert quiet.clock_events == 0x1 and gpustate.throttled(quiet.clock_events) is False  # idle is no throttle
    assert gpustate.reason_names(quiet.clock_events) == []
    monitor.close()


def gpustate_idle() -> int:
    return 0x1  # nvmlClocksEventReasonGpuIdle


def test_no_gpu_meter_records_no_state():
    monitor = EnergyMonitor("auto", CPU)
    monitor.begin_window("cell")
    window = monitor.end_window("cell")
    assert window.state_start is None and window.clock_events is None and window.gpu_bound_j is None
    assert gpu_state(window, [], None) is None


def test_settle_ends_once_the_temperature_holds_still():
    clock = FakeClock(0.0)
    # Cooling 2 C/s for 10 s, then flat at 40 C.
    monitor = monitor_for(FakeGpu(temp_at=lambda t: max(40.0, 60.0 - 2.0 * t)), clock, counter_period_s=0.1)
    settled = monitor.settle(60.0)
    assert settled.stable is True and settled.temp_c == 40.0
    assert 10.0 <= settled.waited_s <= 10.0 + gpustate.SETTLE_READS * gpustate.SETTLE_POLL_S
    hot = monitor_for(FakeGpu(temp_at=lambda t: 90.0 - t), FakeClock(0.0), counter_period_s=0.1).settle(3.0)
    assert hot.stable is False and hot.waited_s == pytest.approx(3.0)  # gave up at energy.settle_s
    plain = EnergyMonitor("none", CPU, clock=clock, sleep=clock.sleep).settle(2.0)
    assert plain.stable is None and plain.waited_s == pytest.approx(2.0)
