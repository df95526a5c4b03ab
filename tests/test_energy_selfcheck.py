"""Issue 27: three GPU readings reconciled, node boundaries checked, locked clocks, static/dynamic energy, the roof."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from types import SimpleNamespace
from unittest import mock

import pandas as pd
import pynvml
import pytest
import torch
from w2w.analysis import roof, selfcheck
from w2w.analysis.metrics import CellTotals, compute

from tests.fake_nvml import FakeClock, FakeGpu, fake_nvml
from w2w.cell_record import checked_energy
from w2w.energy.bounds import disagreement
from w2w.energy.errors import ClockError
from w2w.energy.monitor import EnergyMonitor
from w2w.energy.powercap import PowerCapper
from w2w.energy.window import Window
from w2w.measure import decode_read_bytes
from w2w.records import BatchCounts, Counts, Energy, RankRecord, Times

CPU = torch.device("cpu")


def metered(gpu: FakeGpu, clock: FakeClock, **kwargs) -> EnergyMonitor:
    # An hour's thread interval: the thread samples once as it starts; the test samples every 0.1 s itself,
    # and the bound is told that interval.
    monitor = EnergyMonitor("auto", CPU, nvml=fake_nvml([gpu], clock), clock=clock, sleep=clock.sleep,
                            sample_interval_s=3600.0, counter_period_s=0.1, **kwargs)
    monitor.sampler.interval_s = 0.1
    return monitor


def window_of(monitor: EnergyMonitor, clock: FakeClock, seconds: float) -> Window:
    monitor.begin_window("cell")
    for _ in range(round(seconds / 0.1)):
        clock.sleep(0.1)
        monitor.sampler.sample()
    window = monitor.end_window("cell")
    monitor.close()
    return window


# -- 6: the fake NVML says no where hardware does --------------------------------------------------------------


def test_fake_nvml_answers_the_field_api_clocks_and_refusals_as_nvml_does():
    gpu, denied, bare = FakeGpu(power_w=100.0, instant_w=150.0, average_w=90.0), FakeGpu(may_set_clocks=False), \
        FakeGpu(average=False, instant=False, lockable=False)
    nvml = fake_nvml([gpu, denied, bare])
    h, d, b = (nvml.nvmlDeviceGetHandleByIndex(i) for i in range(3))
    field = nvml.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT])[0]
    assert field.nvmlReturn == pynvml.NVML_SUCCESS and field.value.uiVal == 150_000
    assert nvml.nvmlDeviceGetPowerUsage(h) == 90_000
    nvml.nvmlDeviceSetGpuLockedClocks(h, 1200, 1200)
    assert nvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) == 1200 and gpu.locked_mhz == (1200, 1200)
    nvml.nvmlDeviceResetGpuLockedClocks(h)
    assert nvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) == 1410 and gpu.clock_calls == [(1200, 1200), None]
    with pytest.raises(pynvml.NVMLError_NoPermission):
        nvml.nvmlDeviceSetGpuLockedClocks(d, 1200, 1200)
    assert denied.clock_calls == [] and denied.sm_clock_mhz == 1410.0
    for call, args in (("nvmlDeviceGetPowerUsage", ()), ("nvmlDeviceSetGpuLockedClocks", (1200, 1200))):
        with pytest.raises(pynvml.NVMLError_NotSupported):
            getattr(nvml, call)(b, *args)
    assert nvml.nvmlDeviceGetFieldValues(b, [pynvml.NVML_FI_DEV_POWER_INSTANT])[0].nvmlReturn \
        == pynvml.NVML_ERROR_NOT_SUPPORTED


def test_a_gpu_without_a_reading_says_which_and_why_never_a_zero():
    clock = FakeClock()
    monitor = metered(FakeGpu(power_w=100.0, instant=False, average=True), clock)
    missing = monitor.missing_readings()
    assert missing == {"instant": "NVML_FI_DEV_POWER_INSTANT: Not Supported (NVML error 3)"}
    assert monitor.gpu_record()["missing_readings"] == missing
    window = window_of(monitor, clock, 2.0)
    assert window.instant_gpu_j is None and window.average_gpu_j == pytest.approx(200.0)
    assert window.counter_gpu_j == pytest.approx(200.0)
    no_sampler = EnergyMonitor("auto", CPU, nvml=fake_nvml([FakeGpu()], clock), clock=clock, sleep=clock.sleep,
                               sampler=False, counter_period_s=0.1)
    assert set(no_sampler.missing_readings()) == {"instant", "average"}
    assert "energy.sampler=false" in no_sampler.missing_readings()["instant"]


# -- 1: three readings per window, reconciled ---------------------------------------------------------------


def test_readings_that_disagree_by_more_than_their_bound_are_flagged_with_the_readings():
    clock = FakeClock()
    # The counter counts 100 W; the instant field reports 150 W: 50 J/s apart, a known amount.
    window = window_of(metered(FakeGpu(power_w=100.0, instant_w=150.0, average=False), clock), clock, 10.0)
    assert window.counter_gpu_j == pytest.approx(1000.0) and window.instant_gpu_j == pytest.approx(1500.0)
    # By hand: peak 150 W; counter edges 2 x 1 mJ + 2 x 150 W x 0.1 s, instant edges 2 x 150 W x 0.1 s.
    assert window.agreement_bound_j == pytest.approx(0.002 + 30.0 + 30.0)
    flag = disagreement(window.counter_gpu_j, window.instant_gpu_j, window.average_gpu_j, window.agreement_bound_j)
    assert flag == "GPU readings disagree: counter 1000.000 J, instant 1500.000 J: 500.000 J apart > bound 60.002 J"
    assert window.average_bound_j is None  # this GPU has no 1 s average


def test_the_one_second_average_is_checked_against_its_own_lag():
    clock = FakeClock()
    # The average reads 10% low for 100 s: 1000 J apart; its lag bound: 2 x 100 W x 1 s + the counter's 20.002 J.
    window = window_of(metered(FakeGpu(power_w=100.0, average_w=90.0), clock), clock, 100.0)
    assert window.average_bound_j == pytest.approx(200.0 + 20.002)
    assert window.agreement_bound_j == pytest.approx(20.002 + 20.0)  # counter vs instant: they agree
    flag = disagreement(window.counter_gpu_j, window.instant_gpu_j, window.average_gpu_j, window.agreement_bound_j,
                        window.average_bound_j)
    assert flag is not None and "average 9000.000 J: 1000.000 J apart > bound 220.002 J" in flag


def test_readings_that_agree_are_not_flagged():
    clock = FakeClock()
    window = window_of(metered(FakeGpu(power_w=100.0), clock), clock, 10.0)
    assert window.counter_gpu_j == pytest.approx(1000.0) == window.instant_gpu_j == pytest.approx(window.average_gpu_j)
    assert disagreement(window.counter_gpu_j, window.instant_gpu_j, window.average_gpu_j,
                        window.agreement_bound_j, window.average_bound_j) is None


# -- 3: locked clocks, restored at the end and on SIGTERM, refused once -----------------------------------------


def capper_for(gpu: FakeGpu) -> PowerCapper:
    monitor = EnergyMonitor("auto", CPU, nvml=fake_nvml([gpu]), sampler=False, counter_period_s=0.1)
    return PowerCapper(monitor.meter, monitor.reason)


def test_clock_is_locked_read_back_and_restored():
    gpu = FakeGpu()
    clocks = capper_for(gpu).clocks
    clocks.apply(1200)
    assert clocks.state(1200) == {"requested_mhz": 1200, "locked_mhz": 1200, "read_back_mhz": 1200.0, "refused": None}
    clocks.apply(1600)
    assert gpu.sm_clock_mhz == 1600.0 and clocks.read_back_mhz == 1600.0
    clocks.apply(None)  # a cell without a clock runs at the GPU's own
    assert gpu.locked_mhz is None and gpu.clock_calls == [(1200, 1200), (1600, 1600), None]
    assert clocks.state(None) is None


def test_without_the_right_one_line_and_nothing_changed():
    gpu = FakeGpu(may_set_clocks=False)
    clocks = capper_for(gpu).clocks
    with pytest.raises(ClockError) as first:
        clocks.apply(1200)
    with pytest.raises(ClockError) as second:
        clocks.apply(1600)  # NVML is not asked again
    assert "\n" not in str(first.value) and "NoPermission" in str(first.value) and str(second.value) == str(first.value)
    assert gpu.clock_calls == [] and gpu.sm_clock_mhz == 1410.0 and gpu.locked_mhz is None
    clocks.restore()
    assert gpu.clock_calls == []


def _stopped_by_sigterm(capper) -> None:
    """The runner's way out of a stop signal (w2w.signals): Stopped raised where the job is, the cap and clocks
    restored in _run_loaded's finally."""
    from w2w import runner, signals

    def loading(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the model loads: a stop at once
        raise AssertionError("SIGTERM did not stop the job")

    with mock.patch.object(runner, "_load_measured", loading), signals.on_signals(), \
            pytest.raises(signals.Stopped) as stop:
        runner._run_loaded([], mock.Mock(), mock.Mock(), capper, {})
    assert stop.value.exit_status == 143


def test_sigterm_while_locked_restores_clock_and_cap_and_stops():
    gpu = FakeGpu(limit_w=400.0)
    capper = capper_for(gpu)
    capper.apply(200.0)
    capper.clocks.apply(1200)
    _stopped_by_sigterm(capper)
    assert gpu.clock_calls == [(1200, 1200), None] and gpu.sm_clock_mhz == 1410.0 and gpu.limit_w == 400.0


def test_sigterm_with_a_clock_and_no_cap_still_stops():
    gpu = FakeGpu()
    capper = capper_for(gpu)
    capper.clocks.apply(1600)
    _stopped_by_sigterm(capper)
    assert gpu.locked_mhz is None


# -- 2: the node's boundary against its parts -------------------------------------------------------------------


def rank_record(rank: int, uuid: str, gpu_j: float, cpu_j: float | None = None, node: str = "n1") -> RankRecord:
    return RankRecord(cell_id="c1", rank=rank, world_size=2, status="ok", node=node, local_rank=rank,
                      gpu={"gpu_uuid": uuid}, energy=Energy(gpu_j=gpu_j, gpu_bound_j=1.0, cpu_j=cpu_j, cpu_bound_j=0.5))


def test_a_two_rank_node_whose_slurm_energy_is_below_its_gpus_is_flagged():
    records = [rank_record(0, "GPU-a", 100.0, cpu_j=20.0), rank_record(1, "GPU-b", 100.0)]
    parts = selfcheck.node_parts(records)
    assert [(p.node, p.gpu_j, p.gpus, p.cpu_j, p.bound_j) for p in parts] == [("n1", 200.0, 2, 20.0, 2.5)]
    assert selfcheck.boundary_flag(parts, 150.0) == (
        "node energy below its parts on n1: SLURM 150.0 J < GPU + CPU + DRAM 220.0 J (2 GPU(s) counted once each, "
        "bound ±2.5 J)")
    assert selfcheck.boundary_flag(parts, 300.0) is None
    table = selfcheck.add_flags(pd.DataFrame([{"cell_id": "c1", "status": "ok", "node_energy_j": 150.0}]),
                                {"c1": records})
    assert table.at[0, "boundary_flag"].startswith("node energy below its parts on n1")
    assert "boundary_flag" in "".join(selfcheck.report_section(table))


def test_gpus_are_counted_once_per_node_whatever_the_ranks():
    # Two ranks report the same GPU: it is counted once, so 150 J of node energy covers it.
    parts = selfcheck.node_parts([rank_record(0, "GPU-a", 100.0, cpu_j=20.0), rank_record(1, "GPU-a", 100.0)])
    assert parts[0].gpu_j == 100.0 and parts[0].gpus == 1
    assert selfcheck.boundary_flag(parts, 150.0) is None


# -- 4 and 5: static/dynamic energy and the roof, by hand --------------------------------------------------------


def test_static_and_dynamic_energy_by_hand():
    # The loaded, waiting GPU drew 60 J over 0.5 s (120 W); the cell's batches took 5 s and 1000 J.
    active = Window(name="active", start_unix_s=0.0, duration_s=0.5, gpu_j=60.0, source="nvml_counter")
    energy = checked_energy(Energy(gpu_j=1000.0), None, active, 5.0)
    assert (energy.active_power_w, energy.static_gpu_j, energy.dynamic_gpu_j) == (120.0, 600.0, 400.0)
    metrics = compute(CellTotals(total_s=5.0, responses=8, output_tokens=200, output_words=150, energy_j=1000.0,
                                 static_energy_j=600.0, dynamic_energy_j=400.0))
    assert metrics["static_energy_per_token_j"] == 3.0 and metrics["dynamic_energy_per_token_j"] == 2.0
    assert checked_energy(Energy(gpu_j=1000.0), None, None, 5.0).static_gpu_j is None  # not measured: no split


def test_roof_column_by_hand():
    # A LLaMA-7B-shaped shard: 32 layers, 8 KV heads here, head dim 4096 / 32 = 128, fp16 (2 bytes).
    model = SimpleNamespace(args=SimpleNamespace(n_layers=32, dim=4096, n_heads=32),
                            layers=[SimpleNamespace(attention=SimpleNamespace(local_kv_heads=8))],
                            parameters=lambda: iter([torch.zeros(1, dtype=torch.float16)]))
    # 8 rows, prompts of 100, 10 decode steps: 10 x 1 GB of weights + KV 2 x 32 x 8 x 128 x 2 B = 131072 B per
    # position and row, over 10 x 100 + (1 + ... + 10) = 1055 positions per row.
    read_b = decode_read_bytes(model, 10**9, rows=8, prompt_len=100, steps=10)
    assert read_b == 10 * 10**9 + 131072 * 8 * 1055 == 11_106_247_680
    record = RankRecord(cell_id="c1", rank=0, world_size=1, status="ok", params={"precision": "fp16"},
                        config={"gpu": {"name": "h100", "hbm_gbs": 3350, "peak_tflops": 989}},
                        counts=Counts(responses=8, batches=1, decode_steps=10, decode_read_bytes=read_b),
                        times=Times(decode_s=0.01))
    row = roof.roof_columns([record])
    # 11.106 GB in 10 ms: 1110.6 GB/s, 33.2% of 3350; 2 FLOP x 8 rows / 2 B = 8 FLOP/B < ridge 989e3/3350 = 295.
    assert row["decode_gbs"] == pytest.approx(1110.624768) and row["roof_pct"] == pytest.approx(33.1530)
    assert row["decode_flop_per_byte"] == 8.0 and row["bound_by"] == roof.LAUNCH_BOUND
    faster = roof.roof_columns([dataclasses.replace(record, times=Times(decode_s=0.005))])
    assert faster["roof_pct"] == pytest.approx(66.306) and faster["bound_by"] == roof.MEMORY_BOUND
    assert roof.roof_columns([dataclasses.replace(record, config={"gpu": {"name": "cpu"}})])["roof_note"] \
        == "no roof: gpu=cpu has no rated bandwidth (hbm_gbs)"


def test_new_fields_are_absent_from_a_record_that_lacks_them():
    written = RankRecord(cell_id="c1", rank=0, world_size=1, status="ok").to_dict()
    assert "gpu_clock" not in written and "readings_flag" not in written["energy"]
    assert "static_gpu_j" not in written["energy"] and "instant_gpu_j" not in written["energy"]
    assert "decode_read_bytes" not in BatchCounts().to_dict()


# -- the acceptance sweeps: one rank through run_cells, the reducer and the report, on the fake NVML ----------


def _sweep_rank(cells, instant_w: float | None, may_set_clocks: bool) -> dict:
    """One rank of run_cells with a fake GPU drawing 100 W whose instant field reports instant_w."""
    import logging

    from w2w import runner
    from w2w.energy.monitor import EnergyMonitor

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    gpu = FakeGpu(power_w=100.0, instant_w=instant_w, may_set_clocks=may_set_clocks)
    nvml = fake_nvml([gpu])
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("w2w.energy").addHandler(handler)

    class Injected(EnergyMonitor):
        def __init__(self, *args, **kwargs):
            kwargs.pop("rapl", None)
            super().__init__(*args, nvml=nvml, rapl=False, **kwargs)

        def measure_active(self, seconds):
            gpu.set_power(60.0, self._clock())  # loaded and waiting: 60 W; working: 100 W
            try:
                return super().measure_active(seconds)
            finally:
                gpu.set_power(100.0, self._clock())

        def begin_window(self, name, sync=True):
            super().begin_window(name, sync)
            if name == "batch":  # at least 0.2 s per batch: a 200 W gap is 40 J, ten times its bound (~4 J)
                time.sleep(0.2)

    from unittest import mock

    with mock.patch.object(runner, "EnergyMonitor", Injected):
        statuses = runner.run_cells(cells)
    return {"statuses": statuses, "clock_calls": gpu.clock_calls, "sm_clock_mhz": gpu.sm_clock_mhz,
            "locked": gpu.locked_mhz, "errors": [line for line in lines if "gpu_clock_mhz" in line]}


def _grid(sweep, clocks: tuple[int, ...] = ()) -> list:
    from w2w.config import compose_grid

    cells = compose_grid(["precision=fp32", "max_gen_len=4", "dataset.num_prompts=2", "batch_size=2", "shards=1",
                          f"sweep_dir={sweep}", "energy.idle_seconds=0", "energy.sample_interval_s=0.005",
                          "energy.active_s=0.2"])
    # Past config validation, which wants a CUDA profile for a clock (the fake GPU stands in for one).
    return [dataclasses.replace(cells[0], gpu_clock_mhz=mhz) for mhz in clocks] or cells


@pytest.mark.slow
def test_fake_metered_sweeps_flag_disagreeing_readings_and_lock_clocks(tmp_path):
    from w2w.analysis.reduce import reduce_sweep

    from tests.parallel import run_parallel
    from w2w.records import read_record

    # Instant power 3x what the counter counts (a known 200 W apart): flagged with both readings; locked
    # clocks 1200, 1600. The bound grows with the peak power and the sampler interval, the gap with the window.
    off = tmp_path / "off"
    [result] = run_parallel(1, _sweep_rank, _grid(off, (1200, 1600)), 300.0, True)
    assert result["statuses"] == ["ok", "ok"]
    assert result["clock_calls"] == [(1200, 1200), (1600, 1600), None]  # set, set, restored after the job
    assert result["locked"] is None and result["sm_clock_mhz"] == 1410.0
    table = reduce_sweep(off)
    assert table["readings_flag"].str.contains("GPU readings disagree: counter").all()
    for cid in table["cell_id"]:
        record = read_record(off / "cells" / cid / "rank-00000.json")
        e = record.energy
        assert e.instant_gpu_j == pytest.approx(3 * e.counter_gpu_j, rel=0.05), record.times
        assert f"counter {e.counter_gpu_j:.3f} J" in e.readings_flag and "instant" in e.readings_flag
        mhz = record.params["gpu_clock_mhz"]
        assert record.gpu_clock == {"requested_mhz": mhz, "locked_mhz": mhz, "read_back_mhz": float(mhz),
                                    "refused": None}
        # Static: the 60 W of the waiting GPU over the cell's time; dynamic: the other 40 W of its 100 W.
        assert e.active_power_w == pytest.approx(60.0, rel=1e-3) and e.active_s >= 0.2
        assert e.static_gpu_j == pytest.approx(e.active_power_w * record.times.total_s)
        assert e.dynamic_gpu_j == pytest.approx(e.gpu_j - e.static_gpu_j)
        assert e.dynamic_gpu_j == pytest.approx(40.0 * record.times.total_s, rel=0.02)
        assert record.counts.decode_steps == 3 and record.counts.decode_read_bytes > 0
    section = "\n".join(selfcheck.report_section(table))
    assert all(f"cell {cid}: readings_flag: rank 0: GPU readings disagree" in section for cid in table["cell_id"])

    # The same sweep where the readings agree: not flagged.
    agree = tmp_path / "agree"
    [result] = run_parallel(1, _sweep_rank, _grid(agree), None, True)
    table = reduce_sweep(agree)
    assert result["statuses"] == ["ok"] and (table["readings_flag"] == "").all()
    assert "No cell flagged" in "\n".join(selfcheck.report_section(table))


@pytest.mark.slow
def test_no_right_to_lock_clocks_one_line_at_the_first_cell_and_nothing_changed(tmp_path):
    from tests.parallel import run_parallel
    from w2w.records import read_record

    sweep = tmp_path / "denied"
    cells = _grid(sweep, (1200, 1600))
    [result] = run_parallel(1, _sweep_rank, cells, None, False)
    assert result["statuses"] == ["error", "error"] and result["clock_calls"] == []
    assert result["sm_clock_mhz"] == 1410.0 and result["locked"] is None
    assert len(result["errors"]) == 1 and "gpu_clock_mhz=1200" in result["errors"][0]  # said once, at the first
    errors = [read_record(sweep / "cells" / c.id / "rank-00000.json").error for c in cells]
    assert all("\n" not in e and "NoPermission" in e and "Nothing was changed" in e for e in errors)


def test_gpu_clock_mhz_is_an_opt_in_axis_checked_by_name():
    from w2w.config import compose_grid
    from w2w.errors import ConfigError

    plain = compose_grid(["gpu=h100"])[0]
    cells = compose_grid(["gpu=h100", "gpu_clock_mhz=1200,1600"])
    assert plain.gpu_clock_mhz is None and [c.gpu_clock_mhz for c in cells] == [1200, 1600]
    assert dataclasses.replace(plain, gpu_clock_mhz=None).id == plain.id  # the default keeps old ids
    assert len({plain.id, *(c.id for c in cells)}) == 3 and cells[0].params()["gpu_clock_mhz"] == 1200
    with pytest.raises(ConfigError, match=r"gpu_clock_mhz=0: must be a whole number of MHz > 0"):
        compose_grid(["gpu=h100", "gpu_clock_mhz=0"])
    with pytest.raises(ConfigError, match=r"gpu_clock_mhz=1200 needs a GPU"):
        compose_grid(["gpu=cpu", "gpu_clock_mhz=1200"])
    with pytest.raises(ConfigError, match=r"energy.active_s=-1"):
        compose_grid(["energy.active_s=-1"])
