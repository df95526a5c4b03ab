"""Issue 28: node energy per run and per attempt of a requeued job; a share above 1 flagged, never capped."""

from __future__ import annotations

import os

import pytest
from w2w.analysis import ladder
from w2w.analysis.reduce import reduce_sweep
from w2w.analysis.sacct import apportion, parse_sacct

from tests.test_ladder import _fake_command, _record, _write
from w2w.files import write_json
from w2w.records import record_path

# Job 701 ran twice (requeued): its first attempt drew 100 W over 60 s of steps, its second 300 W over 40 s.
# sacct -D lists both, each attempt's allocation line before its steps (times: SLURM_TIME_FORMAT=%s).
REQUEUED = """\
701|0|70|1000|1070
701.batch|7000|70|1000|1070
701.0|6000|60|1005|1065
701|0|45|2000|2045
701.batch|14000|45|2000|2045
701.0|12000|40|2002|2042
"""


def _attempts(cid: str, rank: int = 0, repeat: int = 0, job: str = "701", starts=(1010.0, 2010.0),
              seconds=(30.0, 20.0)) -> dict:
    """A record whose batches ran in two segments (the two attempts of one requeued job)."""
    record = _record(cid, rank, "n1", job=job, seconds=seconds)
    for i, (batch, start) in enumerate(zip(record["batches"], starts, strict=True)):
        batch["segment"], batch["times"]["start_unix_s"] = i, start
    record["segments"] = [{"segment": i, "job_id": job, "first_batch": i} for i in range(len(starts))]
    record["repeat"] = repeat
    return record


def test_sacct_lists_every_attempt_of_a_requeued_job():
    attempts = parse_sacct(REQUEUED)["701"]
    assert [(a.energy_j, a.elapsed_s, a.start_unix_s) for a in attempts] == [(6000.0, 60.0, 1000.0),
                                                                             (12000.0, 40.0, 2000.0)]


def test_a_requeued_jobs_attempts_are_each_charged_at_their_own_rate():
    seconds = {"701": [(1010.0, 30.0), (2010.0, 20.0)]}  # 30 s in the first attempt, 20 s in the second
    node, note = apportion(seconds, parse_sacct(REQUEUED))
    assert node == pytest.approx(6000.0 * 30 / 60 + 12000.0 * 20 / 40) and note is None


def test_a_share_above_1_is_flagged_never_capped():
    jobs = parse_sacct("801|0|62|0|62\n801.0|6000|60|0|62\n")
    node, note = apportion({"801": [(1.0, 90.0)]}, jobs)  # 90 s of batches in 60 s of steps
    assert node == pytest.approx(9000.0)  # 1.5 x the step's energy: not min(share, 1)
    assert "share above 1" in note and "1.50 x" in note
    assert apportion({"801": [(1.0, 60.5)]}, jobs)[1] is None  # within ElapsedRaw's whole second


def test_node_energy_is_per_run_with_mean_spread_and_interval_and_sacct_asked_for_every_attempt(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _fake_command(bin_dir, "sacct", REQUEUED + "702|0|70|3000|3070\n702.0|9000|60|3000|3060\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = tmp_path / "sweep"
    run0 = _attempts("a")
    run1 = _record("a", 0, "n1", job="702", seconds=(30.0,)) | {"repeat": 1}
    for record in (run0, run1):
        record["config"]["repeats"] = 2
    _write(sweep, [run0])
    write_json(record_path(sweep, "a", 0, 1), run1)
    row = reduce_sweep(sweep).set_index("cell_id").loc["a"]
    first, second = 6000.0 * 30 / 60 + 12000.0 * 20 / 40, 9000.0 * 30 / 60
    assert row["node_energy_j"] == pytest.approx((first + second) / 2)  # not run 0's alone
    assert row["node_energy_j_n"] == 2 and row["node_energy_j_std"] == pytest.approx(abs(first - second) / 2 ** 0.5)
    assert row["node_energy_j_ci95"] > 0
    argv = (bin_dir / "sacct.argv").read_text().split()
    assert "-D" in argv and argv[-1] == "701,702"
    assert ladder.notes(reduce_sweep(sweep)) == []


def test_an_attempt_spans_its_steps_too_as_the_local_slurm_printed_a_requeued_job():
    # From the local SLURM (sacct -D, SLURM_TIME_FORMAT=%s): the first attempt's step ended after its
    # allocation line's End; a batch then still ran in that attempt. A running attempt has no End.
    jobs = parse_sacct("16||5|1704|1709\n16.batch|0|5|1704|1709\n16.0|1200|12|1704|1716\n"
                       "16|0|9|1717|Unknown\n16.batch|0|9|1717|Unknown\n16.0|900|9|1717|Unknown\n")
    first, second = jobs["16"]
    assert (first.start_unix_s, first.end_unix_s, second.end_unix_s) == (1704.0, 1716.0, None)
    node, _ = apportion({"16": [(1712.0, 6.0), (1800.0, 3.0)]}, jobs)
    assert node == pytest.approx(1200.0 * 6 / 12 + 900.0 * 3 / 9)
    assert ladder.sacct.apportion({"16": [(1000.0, 1.0)]}, jobs)[0] is None  # before either attempt: no guess
