"""End to end on CPU: two gloo ranks, each with a fake NVML GPU, through run_cells and the reducer."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from unittest import mock

import pandas as pd
import pytest
from w2w.analysis.reduce import main as reduce_main
from w2w.analysis.reduce import plot_timeline, reduce_sweep

from tests.fake_nvml import FakeGpu, fake_nvml
from tests.parallel import run_parallel
from w2w.cell import Cell
from w2w.config import compose_grid
from w2w.files import write_atomic
from w2w.records import STATUS_OK, read_record

ACTIVE_W = [120.0, 180.0]  # what each rank's fake GPU draws while the model runs
IDLE_W = [40.0, 70.0]  # ... and at rest during the idle baseline
# The node's CPUs during each batch (the cells below have two): a cell's CPU energy sums its batches.
BATCH_CPU_UJ = {"intel-rapl:0": 3_500_000, "intel-rapl:1": 1_500_000}
MAX_RANGE_UJ = 262_143_328_850


def _cells(sweep: Path, *extra: str) -> list[Cell]:
    return compose_grid([
        "precision=fp32", "max_gen_len=4", "dataset.num_prompts=4", "batch_size=2", "shards=2",
        f"sweep_dir={sweep}", "energy.idle_seconds=0.3", "energy.sample_interval_s=0.02", *extra,
    ])


def _powercap_tree(root: Path) -> Path:
    for zone, start in (("intel-rapl:0", 1_000_000), ("intel-rapl:1", MAX_RANGE_UJ - 1_000_000)):
        (root / zone).mkdir(parents=True)
        (root / zone / "name").write_text(f"package-{zone[-1]}\n")
        (root / zone / "energy_uj").write_text(f"{start}\n")
        (root / zone / "max_energy_range_uj").write_text(f"{MAX_RANGE_UJ}\n")
    return root


def _rank(cells: list[Cell], tree: Path, denied_rank: int | None, failing_run: int | None) -> dict:
    """One rank: its fake GPU is injected into the runner's monitor; the rest is the production path.

    denied_rank: that rank's GPU refuses power limits. failing_run: rank 0's NVML reads fail from
    the first decode of that cell on (counted among the cells that open a window) to its end.
    """
    from w2w import runner
    from w2w.energy.monitor import EnergyMonitor

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    rank = int(os.environ["RANK"])
    gpus = [FakeGpu(uuid=f"GPU-{i}", power_w=ACTIVE_W[i], may_set_limit=i != denied_rank) for i in range(2)]
    gpu = gpus[rank]
    nvml = fake_nvml(gpus)

    class InjectedMonitor(EnergyMonitor):
        """The fake hardware's behaviour: lower draw at rest, CPU energy per cell, a failing cell."""

        cells_begun = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, nvml=nvml, rapl_root=tree, **kwargs)

        def measure_idle(self, seconds):
            gpu.set_power(IDLE_W[rank], self._clock())
            try:
                return super().measure_idle(seconds)
            finally:
                gpu.set_power(ACTIVE_W[rank], self._clock())

        def begin_window(self, name):
            if name == "cell":
                InjectedMonitor.cells_begun += 1
            if name == "decode" and rank == 0 and InjectedMonitor.cells_begun - 1 == failing_run:
                gpu.failing = lambda t: True
            super().begin_window(name)

        def end_window(self, name):
            if name == "batch" and self.rapl is not None:
                for zone, uj in BATCH_CPU_UJ.items():
                    path = tree / zone / "energy_uj"
                    write_atomic(path, f"{(int(path.read_text()) + uj) % MAX_RANGE_UJ}\n".encode())
            try:
                return super().end_window(name)
            finally:
                if name == "cell":
                    gpu.failing = lambda t: False

    with mock.patch.object(runner, "EnergyMonitor", InjectedMonitor):
        statuses = runner.run_cells(cells)
    return {"statuses": statuses, "limit_w": gpu.limit_w, "set_calls": gpu.set_calls}


def _records(sweep: Path, cid: str) -> list[dict]:
    return [read_record(p).to_dict() for p in sorted((sweep / "cells" / cid).glob("rank-*.json"))]


def test_two_ranks_reducer_sums_equal_what_the_fake_gpus_reported(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    cells = _cells(sweep)
    results = run_parallel(2, _rank, cells, _powercap_tree(tmp_path / "powercap"), None, None)
    assert [r["statuses"] for r in results] == [[STATUS_OK], [STATUS_OK]]

    table = reduce_sweep(sweep)
    row = table.iloc[0]
    records = _records(sweep, row["cell_id"])
    assert row["status"] == STATUS_OK and row["energy_source"] == "nvml_counter"
    # Each rank's energy is its fake GPU's draw over its own window, and the reducer sums them.
    for record, watts in zip(records, ACTIVE_W, strict=True):
        energy, times = record["energy"], record["times"]
        assert energy["gpu_j"] == pytest.approx(watts * times["total_s"], rel=3e-2)
        assert energy["integrated_gpu_j"] == pytest.approx(energy["gpu_j"], rel=3e-2)
        assert energy["prefill_gpu_j"] + energy["decode_gpu_j"] == pytest.approx(
            watts * (times["prefill_s"] + times["decode_s"]), rel=3e-2)
        assert energy["idle_power_w"] == pytest.approx(IDLE_W[record["rank"]], rel=3e-2)
        assert energy["load_gpu_j"] > 0 and energy["warmup_gpu_j"] > 0
        assert record["gpu"]["gpu_uuid"] == f"GPU-{record['rank']}"
        assert record["power_cap"]["enforced_w"] == 400.0
        assert record["telemetry"]["samples"] >= 2
    assert row["energy_j"] == pytest.approx(sum(r["energy"]["gpu_j"] for r in records), rel=1e-12)
    assert row["prefill_energy_j"] == pytest.approx(sum(r["energy"]["prefill_gpu_j"] for r in records), rel=1e-12)
    assert row["decode_energy_j"] == pytest.approx(sum(r["energy"]["decode_gpu_j"] for r in records), rel=1e-12)
    assert row["idle_power_w"] == pytest.approx(sum(IDLE_W), rel=3e-2)
    expected_above = sum((ACTIVE_W[r["rank"]] - IDLE_W[r["rank"]]) * r["times"]["total_s"] for r in records)
    assert row["energy_j_above_idle"] == pytest.approx(expected_above, rel=3e-2)
    # RAPL: read once for the node (local rank 0), a counter wrap inside the cell.
    assert records[0]["energy"]["cpu_j"] == pytest.approx(10.0)
    assert records[1]["energy"]["cpu_j"] is None and "local rank 0" in records[1]["energy"]["cpu_reason"]
    assert row["cpu_energy_j"] == pytest.approx(10.0) and row["cpu_note"] == ""
    # Tables IV/V telemetry from the fake's utilization and memory.
    assert row["sm_util_avg_pct"] == pytest.approx(90.0) and row["mem_util_max_pct"] == pytest.approx(40.0)
    assert row["mem_used_max_pct"] == pytest.approx(100 * 20_000 / 81_920)
    assert row["power_cap_enforced_w"] == 400.0
    # Issue 19 through the production path: bounds summed over batches and ranks, RAPL by domain, GPU state.
    for record in records:
        batches = record["batches"]
        assert record["energy"]["gpu_bound_j"] == pytest.approx(sum(b["energy"]["gpu_bound_j"] for b in batches))
        assert all(b["energy"]["gpu_bound_j"] > 0 for b in batches)
        assert isinstance(record["energy"]["short_windows"], int) and record["energy"]["min_window_periods"] == 10.0
        state = record["gpu_state"]
        assert state["temp_start_c"] == 61.0 and state["sm_clock_end_mhz"] == 1410.0 and state["throttled"] is False
    assert row["energy_bound_j"] == pytest.approx(sum(r["energy"]["gpu_bound_j"] for r in records))
    assert row["cpu_package_energy_j"] == pytest.approx(10.0) and row["dram_energy_j"] == 0.0
    assert row["throttled"] is False or row["throttled"] == False  # noqa: E712 (a numpy bool)

    for rank, watts in enumerate(ACTIVE_W):
        timeline = pd.read_parquet(sweep / "cells" / row["cell_id"] / f"rank-{rank:05d}.timeline.parquet")
        assert (timeline["power_w"] == watts).all() and (timeline["rank"] == rank).all()
    png = plot_timeline(sweep, row["cell_id"][:6])
    assert png.name == f"timeline_{row['cell_id']}.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert reduce_main([str(sweep), "--plot-timeline", "zzz"]) == 2
    assert "0 cells match" in capsys.readouterr().err


def test_cap_refused_on_one_rank_and_nvml_failing_mid_cell_fail_only_their_cells(tmp_path):
    sweep = tmp_path / "sweep"
    capped, failing, fine = (*_cells(sweep, "seed=1"), *_cells(sweep, "seed=2,3"))
    capped = dataclasses.replace(capped, power_cap_w=150.0)  # past config validation, which wants a CUDA profile
    # The capped cell never opens a window, so the failing cell is the first run.
    results = run_parallel(2, _rank, [capped, failing, fine], _powercap_tree(tmp_path / "powercap"), 1, 0)
    assert [r["statuses"] for r in results] == [["error", "error", STATUS_OK], ["error", STATUS_OK, STATUS_OK]]
    # Rank 0 capped its GPU, then put the original limit back for the uncapped cells.
    assert results[0]["set_calls"] == [150_000, 400_000] and results[0]["limit_w"] == 400.0
    assert results[1]["set_calls"] == []

    table = reduce_sweep(sweep).set_index("cell_id")
    records = {cid: _records(sweep, cid) for cid in table.index}
    capped_records = next(r for r in records.values() if r[0]["params"]["power_cap_w"] == 150.0)
    assert "NoPermission" in capped_records[1]["error"] and "power_cap_command" in capped_records[1]["error"]
    assert "another rank" in capped_records[0]["error"]
    assert capped_records[1]["power_cap"]["requested_w"] == 150.0
    failed_rank0 = [r[0] for r in records.values() if r[0]["status"] == "error" and "NVML read error" in r[0]["error"]]
    assert len(failed_rank0) == 1 and failed_rank0[0]["energy"]["gpu_j"] is None
    assert list(table["status"].value_counts().sort_index().items()) == [("error", 2), (STATUS_OK, 1)]
    assert table.loc[table["status"] == STATUS_OK, "energy_j"].notna().all()
