"""Issue 19's boundary ladder in the reducer and report: node energy from sacct, facility by PUE, RAPL once, flags."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch
from w2w.analysis import ladder
from w2w.analysis.reduce import reduce_sweep
from w2w.analysis.sacct import parse_sacct

from tests.test_rapl import bump, powercap  # noqa: F401 (the fixture)
from w2w.energy.monitor import EnergyMonitor
from w2w.files import write_json
from w2w.records import parse_record, record_path

SACCT_OUT = """\
501|0|70
501.batch|50000|70
501.extern|52000|70
501.0|48000|60
502|0|20
502.batch|0|20
502.0|0|18
"""


def _record(cid, rank, node, *, job="501", seconds=(10.0,), backend="slurm", pue=None, local_rank=0, world=1,
            **energy):
    """An ok rank record whose batches ran in `job`, `seconds` each."""
    batches = [{"index": i, "segment": 0, "counts": {"responses": 4, "output_tokens": 80, "output_words": 50},
                "times": {"total_s": s, "prefill_s": 0.1, "decode_s": s - 0.1, "start_unix_s": 1.0 + i},
                "energy": {k: v for k, v in energy.items() if k in ("gpu_j", "gpu_bound_j", "cpu_j", "cpu_package_j",
                                                                    "cpu_dram_j", "cpu_bound_j")}}
               for i, s in enumerate(seconds)]
    # Each batch carries the cell's per-batch figure: totals are len(seconds) times it.
    return {
        "schema": 2, "cell_id": cid, "rank": rank, "world_size": world, "node": node,
        "local_rank": local_rank, "status": "ok", "job_id": job,
        "params": {"model": "tiny", "gpu": "v100", "dataset": "synthetic", "shards": 1, "precision": "fp16",
                   "batch_size": 4, "max_gen_len": 8, "power_cap_w": None},
        "config": {"cluster": {"backend": backend, "pue": pue}},
        "counts": {"responses": 4, "output_tokens": 80, "output_words": 50},
        "times": {"total_s": sum(seconds)},
        "energy": {"source": "nvml_counter", **{k: v for k, v in energy.items() if k not in ("gpu_j",)}},
        "batches": batches, "segments": [{"segment": 0, "job_id": job, "first_batch": 0}],
    }


def _write(sweep: Path, records: list[dict]) -> None:
    for r in records:
        write_json(record_path(sweep, r["cell_id"], r["rank"]), r)


def _fake_command(folder: Path, name: str, stdout: str) -> Path:
    """A script on PATH that logs its argv and prints `stdout`, as the site's own would."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho \"$@\" >> {folder}/{name}.argv\ncat <<'EOF'\n{stdout}EOF\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_sacct_output_sums_numbered_steps_only():
    jobs = {job: attempt for job, (attempt,) in parse_sacct(SACCT_OUT + "503.0|18446744073709551614|5\n").items()}
    assert jobs["501"].energy_j == 48000.0 and jobs["501"].elapsed_s == 60.0  # batch/extern overlap step 0
    assert jobs["502"].energy_j is None  # 0 J: nothing accounted it
    assert jobs["503"].energy_j is None  # NO_VAL


def test_sacct_energy_is_parsed_and_apportioned_from_a_fake_sacct(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _fake_command(bin_dir, "sacct", SACCT_OUT)
    _fake_command(bin_dir, "scontrol", "AcctGatherEnergyType   = acct_gather_energy/none\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = tmp_path / "sweep"
    _write(sweep, [_record("a", 0, "n1", seconds=(10.0, 20.0), pue=1.5, gpu_j=100.0),  # 30 of step 0's 60 s
                   _record("b", 0, "n1", seconds=(6.0,), gpu_j=100.0),  # 6 of 60 s, no PUE
                   _record("c", 0, "n1", job="502", seconds=(9.0,), pue=1.2, gpu_j=100.0),
                   _record("d", 0, "n1", job="99", backend="local", gpu_j=100.0)])
    table = reduce_sweep(sweep).set_index("cell_id")
    assert table.at["a", "node_energy_j"] == pytest.approx(48000.0 * 30 / 60)
    assert table.at["a", "facility_energy_j_est"] == pytest.approx(1.5 * 24000.0)
    assert table.at["b", "node_energy_j"] == pytest.approx(4800.0)
    assert pd_missing(table.at["b", "facility_energy_j_est"]) and "cluster.pue" in table.at["b", "facility_note"]
    assert pd_missing(table.at["c", "node_energy_j"])
    assert "job 502" in table.at["c", "node_note"] and "acct_gather_energy/none" in table.at["c", "node_note"]
    assert pd_missing(table.at["d", "node_energy_j"]) and "cluster.backend=local" in table.at["d", "node_note"]
    assert (bin_dir / "sacct.argv").read_text().split()[-1] == "501,502"  # one query; the local cell not in it


def pd_missing(value) -> bool:
    return value is None or value != value


@pytest.mark.slurm
@pytest.mark.usefixtures("local_slurm")
def test_the_local_slurm_gives_an_empty_node_column_with_its_reason(tmp_path):
    """The real local SLURM has no acct_gather_energy plugin: a job's step is accounted 0 J, so no figure."""
    done = subprocess.run(["sbatch", "--parsable", "--wait", "-p", "debug", "-o", str(tmp_path / "out"),
                           "--wrap", "srun true"], capture_output=True, text=True, timeout=300, check=True)
    job = done.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    while f"{job}.0|" not in subprocess.run(["sacct", "-n", "-P", "-j", job, "-o", "JobID,State"],
                                            capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, f"slurmdbd never listed step {job}.0"
        time.sleep(0.5)
    _write(tmp_path / "sweep", [_record("a", 0, "n1", job=job, seconds=(1.0,), pue=1.3, gpu_j=10.0)])
    row = reduce_sweep(tmp_path / "sweep").iloc[0]
    assert pd_missing(row["node_energy_j"]) and pd_missing(row["facility_energy_j_est"])
    assert f"job {job}" in row["node_note"] and "acct_gather_energy/none" in row["node_note"]
    assert row["facility_note"] == "no facility estimate: no node energy"


def test_rapl_domains_are_never_double_counted(powercap):  # noqa: F811 (the fixture)
    monitor = EnergyMonitor("none", torch.device("cpu"), rapl=True, rapl_root=powercap["root"])
    monitor.begin_window("cell")
    bump(powercap["package-0"], 10_000_000)
    bump(powercap["package-0/dram"], 3_000_000)
    bump(powercap["package-1"], 5_000_000)
    for zone in ("intel-rapl:0/intel-rapl:0:1", "intel-rapl:2", "intel-rapl-mmio:0"):  # core, psys, MMIO copy
        bump(powercap["root"] / zone / "energy_uj", 70_000_000)
    window = monitor.end_window("cell")
    assert window.cpu_package_j == pytest.approx(15.0) and window.cpu_dram_j == pytest.approx(3.0)
    assert window.cpu_j == pytest.approx(18.0)  # packages + DRAM, nothing of core, psys or MMIO
    # Two ranks on one node: the node's figure is its local rank 0's, once.
    figures = {"cpu_j": 18.0, "cpu_package_j": 15.0, "cpu_dram_j": 3.0, "cpu_bound_j": 0.5}
    records = [_record("a", 0, "n1", local_rank=0, world=2, gpu_j=1.0, **figures),
               _record("a", 1, "n1", local_rank=1, world=2, gpu_j=1.0, **figures)]
    columns = ladder.cell_columns([parse_record(r) for r in records])
    assert columns["cpu_package_energy_j"] == 15.0 and columns["dram_energy_j"] == 3.0
    assert columns["cpu_energy_bound_j"] == 0.5


def test_report_lists_flagged_and_throttled_cells_and_raw_beside_above_idle(tmp_path):
    state = {"temp_start_c": 60.0, "temp_end_c": 83.0, "sm_clock_start_mhz": 1410.0, "sm_clock_end_mhz": 1200.0,
             "clock_events": 0x24, "clock_event_names": ["power cap (SW)", "thermal (SW)"], "throttled": True}
    flagged = _record("a", 0, "n1", backend="local", seconds=(0.5, 0.5), gpu_j=50.0, gpu_bound_j=2.0,
                      short_windows=2, shortest_window_periods=5.0, min_window_periods=10.0, window_period_s=0.1,
                      idle_power_w=20.0, cpu_j=30.0, idle_cpu_power_w=10.0)
    flagged["gpu_state"] = state
    _write(tmp_path, [flagged])
    row = reduce_sweep(tmp_path).iloc[0]
    assert row["energy_j"] == pytest.approx(100.0) and row["energy_bound_j"] == pytest.approx(4.0)
    assert row["energy_j_above_idle"] == pytest.approx(100.0 - 20.0 * 1.0)
    assert row["cpu_energy_j_above_idle"] == pytest.approx(60.0 - 10.0 * 1.0)
    assert row["throttled"] is True or row["throttled"] == True  # noqa: E712
    page = "\n".join(ladder.report_sections(reduce_sweep(tmp_path)))
    assert "## Energy boundaries" in page and "## Measurement uncertainty" in page and "## GPU state" in page
    assert "- a (tiny, batch_size=4): 2 of 2 batch windows under 10 update periods of 100 ms" in page
    assert "- throttled: a (power cap (SW), thermal (SW))" in page
    assert "added linearly" in page
    assert "node (SLURM), J empty: cluster.backend=local" in page
