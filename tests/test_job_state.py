"""Issue 18.2: job state you can trust: a local job is its PID and start time, a cell's reason is its own,
a missing record says so, and cells or responses that are not this sweep's are listed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from w2w.launch import process
from w2w.launch.plan import make_plan
from w2w.launch.status import completeness, render, sweep_problems, sweep_status
from w2w.launch.submit import load_manifest, record_plan, save_manifest

from tests.conftest import cli
from w2w.manifest import Manifest, ManifestCell, ManifestJob, Submission
from w2w.records import RankRecord, record_path, write_record
from w2w.responses import responses_path

CELLS = ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc")


def _ok(sweep: Path, cid: str, rank: int = 0, world: int = 1, repeat: int = 0) -> None:
    write_record(sweep, RankRecord.from_dict({
        "cell_id": cid, "rank": rank, "world_size": world, "repeat": repeat, "status": "ok", "node": "n1",
        "counts": {"responses": 2, "output_tokens": 8, "output_words": 6}, "times": {"total_s": 1.0}}))


def _sweep(tmp: Path, pid: int, stamp: str | None, world: int = 1, repeats: int = 1) -> Path:
    """A sweep of CELLS, all given to one local job (pid, stamp), as w2w-sweep would have recorded it."""
    sweep, folder = tmp / "sweep", tmp / "sweep" / "submitit" / str(pid)
    folder.mkdir(parents=True)
    job = ManifestJob("local", 1, world, shape="model=tiny", cells=list(CELLS), submissions=[
        Submission(str(pid), str(folder), submitted_unix_s=1.0, cells=list(CELLS), process_start=stamp)])
    manifest = Manifest(jobs={"j": job}, cells={cid: ManifestCell(world_size=world, job="j", params={"seed": i, "repeats": repeats})
                                                for i, cid in enumerate(CELLS)})
    save_manifest(manifest, sweep)
    return sweep


def _ended_pid() -> int:
    """The PID of a process that has ended (the job's controller, gone)."""
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


@pytest.fixture
def stranger():
    """A live process that is not a w2w job: it may hold a PID a job once had."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_reused_pid_is_not_running(tmp_path, stranger):
    """The PID-reuse reproduction: the job's PID now belongs to another process."""
    sweep = _sweep(tmp_path, stranger, "0-boot:1")  # the job started at another time than this process
    status = sweep_status(sweep)
    job = status.submissions[str(stranger)]
    assert job.state == "KILLED" and not job.active  # gone without its result pickle: it did not finish
    assert job.reason == f"pid {stranger} now belongs to another process (started later)"
    assert not status.in_flight() and {state for state, _ in status.cells.values()} == {"failed"}
    assert completeness(sweep).running == 0  # --require-complete no longer counts it as running
    line = render(sweep, status).splitlines()[1]
    print(line)
    assert f"[local {stranger}: KILLED (pid {stranger} now belongs to another process (started later))]" in line


def test_a_job_recorded_without_start_time_is_known_by_its_command(tmp_path, stranger):
    job = sweep_status(_sweep(tmp_path, stranger, None)).submissions[str(stranger)]
    assert job.state == "KILLED" and "now belongs to another process (sleep 600" in job.reason


def test_the_job_with_its_own_start_time_is_running(tmp_path, stranger):
    status = sweep_status(_sweep(tmp_path, stranger, process.start_stamp(stranger)))
    assert status.submissions[str(stranger)].state == "RUNNING"
    assert {state for state, _ in status.cells.values()} == {"running"}


def _log(sweep: Path, pid: int, lines: list[str]) -> None:
    (sweep / "submitit" / str(pid) / f"{pid}_0_log.err").write_text(
        "".join(f"03:13:09 [rank 0] {line}\n" for line in lines))


def test_deleted_rank_file_says_record_missing(tmp_path):
    pid = _ended_pid()
    sweep = _sweep(tmp_path, pid, "0-boot:1", world=2)
    a, b, _ = CELLS
    _ok(sweep, a, 0, 2)  # rank 1's file was deleted
    _log(sweep, pid, [f"cell 1/3 {a}: started", f"cell 1/3 {a}: ok",
                      f"cell 2/3 {b}: started", "cell batch 1/1: 8 output tokens", f"cell 2/3 {b}: ok"])
    status = sweep_status(sweep)
    state, reason = status.cells[a]
    assert state == "missing" and reason.startswith("record missing: rank-00001.json (the job's log says it ended ok)")
    state, reason = status.cells[b]  # both ranks' files gone: the log says they were written
    assert state == "missing" and reason.startswith("record missing: rank-00000.json, rank-00001.json")
    assert "failed" not in reason and "job ended" not in reason
    assert status.summary().startswith("3 cells: 0 done, 1 failed, 2 missing")
    assert completeness(sweep).missing == 2


def test_a_job_killed_among_repeats_is_failed_not_missing(tmp_path):
    """Runs 0 and 1 of a cell are done and the job died in run 2: no record of run 2 was written, so the
    cell failed in it (its log's last end line is run 1's); a run with one rank's file gone is missing."""
    pid = _ended_pid()
    sweep = _sweep(tmp_path, pid, "0-boot:1", world=2, repeats=3)
    a, b, _ = CELLS
    for repeat in (0, 1):
        for rank in (0, 1):
            _ok(sweep, a, rank, 2, repeat)
    for repeat in (0, 1, 2):
        _ok(sweep, b, 0, 2, repeat)
        if repeat != 1:  # rank 1's file of run 1 was deleted
            _ok(sweep, b, 1, 2, repeat)
    _log(sweep, pid, [f"cell 1/6 repeat 1/3 {b}: started", f"cell 1/6 repeat 1/3 {b}: ok",
                      f"cell 2/6 repeat 1/3 {a}: started", f"cell 2/6 repeat 1/3 {a}: ok",
                      f"cell 3/6 repeat 2/3 {a}: started", f"cell 3/6 repeat 2/3 {a}: ok",
                      f"cell 4/6 repeat 3/3 {a}: started"])
    status = sweep_status(sweep)
    assert status.cells[a] == ("failed", f"job ended KILLED during this cell (its last line: cell 4/6 repeat 3/3 {a}: "
                                         "started)")
    state, reason = status.cells[b]
    assert state == "missing" and reason.startswith("record missing: repeat-1/rank-00001.json:")


def test_killed_job_reason_is_own_cell(tmp_path):
    """The job was killed in its second cell's warm-up: its last log line names the first, which succeeded."""
    pid = _ended_pid()
    sweep = _sweep(tmp_path, pid, "0-boot:1")
    a, b, c = CELLS
    _ok(sweep, a)
    _log(sweep, pid, [f"cell 1/3 {a}: started", "cell batch 1/1: 8 output tokens", f"cell 1/3 {a}: ok",
                      f"cell 2/3 {b}: started"])
    status = sweep_status(sweep)
    job = status.submissions[str(pid)]
    assert job.state == "KILLED" and a not in job.reason  # a log line is not the job's error
    assert status.cells[b] == ("failed", f"job ended KILLED during this cell (its last line: cell 2/3 {b}: started)")
    assert status.cells[c][0] == "failed" and status.cells[c][1].startswith("job ended KILLED before this cell started")
    _log(sweep, pid, [f"cell 1/3 {a}: started", f"cell 1/3 {a}: ok", f"cell 2/3 {b}: started",
                      "cell batch 1/2: 4 output tokens", f"cell 1/3 {a}: ok"])  # another cell's line, out of turn
    assert sweep_status(sweep).cells[b] == ("failed", "job ended KILLED during this cell "
                                                      "(its last line: cell batch 1/2: 4 output tokens)")


@pytest.fixture(scope="module")
def odd_sweep(tmp_path_factory) -> tuple[Path, str, str, dict[str, str]]:
    """A sweep whose manifest plans seed=1; cells/ also holds a seed=2 cell run elsewhere, and the seed=1
    cell's responses.jsonl lost a line. Returns it, both cell ids and what each CLI printed."""
    tmp = tmp_path_factory.mktemp("odd")
    sweep = tmp / "sweep"
    grid = ["shards=1", "precision=fp32", "energy.idle_seconds=0", "max_gen_len=4", "dataset.num_prompts=2",
            "save_responses=true", f"sweep_dir={sweep}"]
    plan = make_plan([*grid, "seed=1"])
    save_manifest(record_plan(load_manifest(sweep), plan, [*grid, "seed=1"]), sweep)
    cli("w2w.run_cli", *grid, "seed=1,2")
    (mine,) = [c.id for c in plan.cells]
    (foreign,) = [p.name for p in (sweep / "cells").iterdir() if p.name != mine]
    path = responses_path(sweep, mine)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    outputs = {"w2w-status": cli("w2w.launch.status", str(sweep)).stdout,
               "w2w-reduce": cli("w2w.analysis.reduce", str(sweep)).stderr,
               "w2w-report": cli("w2w.analysis.report", str(sweep), "--max-timelines", "0").stdout}
    return sweep, mine, foreign, outputs


def test_foreign_cell_listed(odd_sweep):
    sweep, mine, foreign, outputs = odd_sweep
    assert [line.split(":")[0] for line in sweep_problems(sweep, load_manifest(sweep))] == [f"cell {foreign}",
                                                                                              f"cell {mine}"]
    assert sweep_problems(sweep, None)[0].startswith(f"cell {mine}: responses damaged")  # no manifest: no judge
    for prog, out in outputs.items():
        line = f"cell {foreign}: not in this sweep's manifest.json (copied in from another sweep?)"
        assert line in out, (prog, out)
    print(next(line for line in outputs["w2w-status"].splitlines() if foreign in line))


def test_damaged_responses_listed(odd_sweep):
    _, mine, foreign, outputs = odd_sweep
    for prog, out in outputs.items():
        line = f"cell {mine}: responses damaged: responses.jsonl has 1 line(s) where its record counts 2 response(s)"
        assert line in out, (prog, out)
    assert "delete" not in outputs["w2w-status"]
    assert f"cell {foreign}: responses damaged" not in outputs["w2w-status"]


def test_responses_that_do_not_parse_or_repeat_a_prompt_are_damaged(odd_sweep, tmp_path):
    from w2w.records import read_record
    from w2w.responses import responses_problem

    sweep, _, foreign, _ = odd_sweep
    record = read_record(record_path(sweep, foreign, 0))
    path = responses_path(sweep, foreign)
    assert responses_problem(sweep, record) is None
    good = path.read_text()
    try:
        path.write_text(good.splitlines(keepends=True)[0] * 2)
        assert responses_problem(sweep, record) == "responses.jsonl repeats a prompt_id"
        path.write_text(good[:-5] + "\n")
        assert "does not parse" in responses_problem(sweep, record)
        path.unlink()
        assert responses_problem(sweep, record) == "responses.jsonl is missing (the record says it was saved)"
    finally:
        path.write_text(good)


# -- issue 28: status from evidence, never a guess ---------------------------------------------------


def test_a_deleted_record_of_a_finished_run_among_repeats_is_missing_not_failed(tmp_path):
    pid = _ended_pid()
    sweep = _sweep(tmp_path, pid, "0-boot:1", repeats=3)
    a = CELLS[0]
    for repeat in (0, 2):  # run 1's only record was deleted; its end line is in the log
        _ok(sweep, a, 0, 1, repeat)
    _log(sweep, pid, [f"cell {i + 1}/9 repeat {i + 1}/3 {a}: {what}" for i in range(3) for what in ("started", "ok")])
    state, reason = sweep_status(sweep).cells[a]
    assert state == "missing" and reason.startswith("record missing: repeat-1/rank-00000.json (the job's log says "
                                                    "it ended run(s) [1])")


def test_a_record_copied_from_another_cell_is_not_done_and_runs_again(tmp_path):
    from w2w.records import cell_done

    sweep = _sweep(tmp_path, _ended_pid(), "0-boot:1")
    a, b, _ = CELLS
    _ok(sweep, b)
    record_path(sweep, a, 0).parent.mkdir(parents=True)
    record_path(sweep, a, 0).write_bytes(record_path(sweep, b, 0).read_bytes())  # b's record copied into a
    _ok(sweep, b, repeat=1)
    state, reason = sweep_status(sweep).cells[a]
    assert state != "done" and f"holds cell '{b}'" in reason
    assert not cell_done(sweep, a, 1) and cell_done(sweep, b, 1)
    (record_path(sweep, b, 0, 1)).write_bytes(record_path(sweep, b, 0).read_bytes())  # run 0's copied as run 1
    assert not cell_done(sweep, b, 1, repeat=1)


def test_a_cell_whose_lock_a_runner_holds_is_running_not_failed(tmp_path):
    import sys

    from tests.conftest import ROOT

    sweep = _sweep(tmp_path, _ended_pid(), "0-boot:1")
    a = CELLS[0]
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from w2w.cell_lock import CellLock; "
                               "lock = CellLock(sys.argv[1], sys.argv[2]); print(lock.try_acquire(), flush=True); "
                               "sys.stdin.read()", str(sweep), a], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "True"
        state, reason = sweep_status(sweep).cells[a]
        assert state == "running" and reason.startswith(f"held by pid {holder.pid} on ")
        assert sweep_status(sweep).cells[CELLS[1]][0] == "failed"  # its job ended; no runner holds it
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert sweep_status(sweep).cells[a][0] == "failed"  # the holder is gone: the lock says nothing more


def test_damaged_responses_of_a_repeat_are_listed(tmp_path):
    from w2w.launch.status import damaged_responses

    sweep = tmp_path / "sweep"
    a = CELLS[0]
    for repeat in (0, 1):
        write_record(sweep, RankRecord.from_dict({
            "cell_id": a, "rank": 0, "world_size": 1, "repeat": repeat, "status": "ok", "node": "n1",
            "counts": {"responses": 2, "output_tokens": 8, "output_words": 6}, "times": {"total_s": 1.0},
            "responses": {"requested": True, "saved": True, "file": "responses.jsonl"}}))
        lines = [{"prompt_id": i, "correct": None} for i in range(2 if repeat == 0 else 1)]
        responses_path(sweep, a, repeat).write_text("".join(f"{json.dumps(line)}\n" for line in lines))
    assert damaged_responses(sweep, [a]) == {a: "repeat-1/responses.jsonl has 1 line(s) where its record counts "
                                                "2 response(s)"}


def test_a_cell_of_an_edited_prompt_file_is_superseded_by_its_new_id_not_failed_for_ever(tmp_path):
    from w2w.data import file_sha256

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "a?", "answer": "#### 1"}\n')
    old = file_sha256(prompts)
    prompts.write_text('{"question": "b?", "answer": "#### 2"}\n')  # edited after the first plan
    sweep = _sweep(tmp_path, _ended_pid(), "0-boot:1")
    manifest = load_manifest(sweep)
    a, b, c = CELLS
    params = {"dataset.path": str(prompts), "seed": 0, "repeats": 1}
    manifest.cells[a].params = params | {"dataset.content_sha256": old}
    manifest.cells[b].params = params | {"dataset.content_sha256": file_sha256(prompts)}  # the new plan's cell
    manifest.cells[c].params = {"seed": 2, "repeats": 1}
    save_manifest(manifest, sweep)
    _ok(sweep, b)
    _ok(sweep, c)
    status = sweep_status(sweep)
    assert status.cells[a] == ("superseded", f"dataset.path={prompts} was edited after this cell was planned: "
                                             f"superseded by cell {b}")
    done = completeness(sweep)
    assert done.complete and done.planned == 2
    assert cli("w2w.analysis.reduce", str(sweep), "--require-complete", check=False).returncode == 0
