"""w2w-status: per job and per cell, pending / running / done / failed (with the reason)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from w2w.launch import process
from w2w.launch.axes import cell_axes, describe
from w2w.launch.submit import load_manifest

from w2w.cell_lock import CellLock
from w2w.data import file_sha256
from w2w.exits import quiet_on_broken_pipe
from w2w.manifest import MANIFEST, Manifest, ManifestCell, ManifestError, ManifestJob, Submission
from w2w.records import (
    REPEAT_PREFIX,
    cell_dir,
    misplaced,
    read_record,
    record_path,
    sampling_restarts,
)
from w2w.responses import responses_problem
from w2w.schema import RecordError
from w2w.stopping import read_stop, runs_planned

MISSING = "missing"  # the job ended and wrote the cell's records, but one is not there (deleted)
SUPERSEDED = "superseded"  # its prompt or few-shot file was edited after it was planned: a new cell id runs it
KILLED = "KILLED"  # a local job whose process is gone without its result (kill -9, a reboot)
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}


@dataclass(frozen=True)
class JobState:
    state: str  # SLURM's words: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... or NOT_SUBMITTED
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


class StatusError(RuntimeError):
    """The job states cannot be read here (no sacct): one line, not a traceback."""


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()
    except FileNotFoundError as exc:
        raise StatusError(
            f"{command[0]} not found: the SLURM jobs' states need SLURM's client commands; run this on the "
            "cluster's login node (the cells' records alone are in cells/: w2w-reduce reads them anywhere)"
        ) from exc


def _slurm_state(job_id: str) -> JobState:
    out = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,Reason"]).splitlines()
    if out:
        state, exit_code, reason = [*out[-1].split("|"), "", ""][:3]
        state = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
        detail = f"exit {exit_code}" if exit_code not in ("", "0:0") else ""
        return JobState(state, ", ".join(x for x in (detail, reason if reason != "None" else "") if x))
    queued = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    return JobState(queued or "UNKNOWN")


def _local_state(job_id: str, folder: str, tasks: int, stamp: str | None = None) -> JobState:
    """submitit's local controller: finished once every task left its result pickle, or once the
    process with its PID and start time (or, recorded without one, its command) is gone."""
    if all((Path(folder) / f"{job_id}_{task}_result.pkl").is_file() for task in range(tasks)):
        return JobState("FINISHED")
    try:
        running, why = process.alive(int(job_id), stamp)
    except ValueError:
        return JobState("FINISHED")
    # Gone without every task's result pickle (submitit writes one even for an exception): killed, not finished.
    return JobState("RUNNING") if running else JobState(KILLED, why or "its process is gone and left no result")


def _job_error(folder: str, job_id: str, state: str) -> str:
    """Why a finished job's first task failed: its exception (submitit's result pickle), else, for
    a job that failed by itself, the last line of its stderr (a failure before Python started,
    such as a setup line). A cancelled or timed-out job needs no more than its state."""
    from submitit.core.utils import pickle_load

    result, log = Path(folder) / f"{job_id}_0_result.pkl", Path(folder) / f"{job_id}_0_log.err"
    if result.is_file():
        try:
            outcome, value = pickle_load(result)
        except Exception:
            return ""
        text = str(value) if outcome == "error" else ""
    elif state in ("FAILED", "NODE_FAIL", "FINISHED", KILLED):
        text = log.read_text(errors="replace") if log.is_file() else ""
    else:
        text = ""
    # w2w's own log lines are progress, not the error: a killed job's last one names a cell it ran.
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not LOG_LINE.match(line)]
    return lines[-1] if lines else ""


# runner.setup_logging's prefix, and the runner's lines that open and close a cell.
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \[rank [^\]]*\] ")
CELL_START = re.compile(r"cell \d+/\d+(?: repeat (?P<repeat>\d+)/\d+)? (?P<cid>\w+): started$")  # runner._run_one's
CELL_END = re.compile(r"cell \d+/\d+(?: repeat (?P<repeat>\d+)/\d+)? (?P<cid>\w+): (?P<status>ok|oom|error)$")


@dataclass(frozen=True)
class CellLog:
    """What a job's task logs say of one cell: whether it started, how it ended, its last line."""

    started: bool = False
    ended: str | None = None  # the status its end line gave (its record was then written)
    last: str = ""
    ended_runs: frozenset[int] = frozenset()  # the runs (repeat 0..K-1) whose end line is in the logs


def cell_log(folder: str, job_id: str, tasks: int, cid: str) -> CellLog:
    """The cell's own lines in the job's task logs (its latest run there): from its start line to the
    next cell's; never the lines of another cell."""
    found, ended_runs = CellLog(), set()
    for task in range(tasks):
        path = Path(folder) / f"{job_id}_{task}_log.err"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        mine: list[str] | None = None  # the cell's latest span of lines in this task's log
        inside = False
        for line in lines:
            text = LOG_LINE.sub("", line.strip())
            end = CELL_END.search(text)
            if end and end["cid"] == cid:  # "repeat 2/3": run 1
                ended_runs.add(int(end["repeat"]) - 1 if end["repeat"] else 0)
            start = CELL_START.search(text)
            if start:
                inside = start["cid"] == cid
                mine = [text] if inside else mine
            elif inside and text and not _names_another_cell(text, cid):
                mine.append(text)
        if mine is None:
            continue
        ends = [m["status"] for m in map(CELL_END.search, mine) if m]
        ended = ends[-1] if ends else None
        if not found.started or (found.ended and not ended):  # a task that did not end says more
            found = CellLog(True, ended, mine[-1])
    return dataclasses.replace(found, ended_runs=frozenset(ended_runs))


def _names_another_cell(text: str, cid: str) -> bool:
    match = CELL_START.search(text) or CELL_END.search(text)
    return match is not None and match["cid"] != cid


def submission_state(entry: ManifestJob, submission: Submission) -> JobState:
    """The state of one submission of a placement (entry), with the reason a finished one failed."""
    if entry.backend == "slurm":
        state = _slurm_state(submission.job_id)
    else:
        state = _local_state(submission.job_id, submission.folder, entry.nodes * entry.tasks_per_node,
                             submission.process_start)
    if not state.active:
        error = _job_error(submission.folder, submission.job_id, state.state)
        if error:
            state = JobState("FAILED" if state.state in ("COMPLETED", "FINISHED") else state.state,
                             ", ".join(x for x in (state.reason, error) if x))
    return state


def cell_records(sweep_dir: Path, cid: str, world_size: int, repeats: int = 1) -> tuple[str | None, str]:
    """(state, reason) that the cell's records alone decide: failed when a run failed, done when all
    its runs (repeats, or as many as repeats=auto took: stopping.read_stop) are; else (None, progress)."""
    stop = read_stop(sweep_dir, cid)
    repeats = stop.runs if stop is not None else repeats
    if repeats == 1 and stop is None:
        return run_records(sweep_dir, cid, world_size)
    runs = [run_records(sweep_dir, cid, world_size, k) for k in range(repeats)]
    failed = [f"repeat {k}: {reason}" for k, (state, reason) in enumerate(runs) if state == "failed"]
    if failed:
        return "failed", "; ".join(failed)
    done = sum(state == "done" for state, _ in runs)
    if done == repeats:
        stopped = f" (repeats=auto: stopped {stop.stopped})" if stop is not None else ""
        return "done", f"{repeats} repeats{stopped}, " + runs[0][1]
    return None, "; ".join([f"{done}/{repeats} repeats done", *[r for s, r in runs if s is None and "; " in r]])


def run_records(sweep_dir: Path, cid: str, world_size: int, repeat: int = 0) -> tuple[str | None, str]:
    """(state, reason) of one run of the cell from its records (done or failed), else (None, progress)."""
    records, problems = [], []
    for rank in range(world_size):
        path = record_path(sweep_dir, cid, rank, repeat)
        if path.is_file():
            try:
                record = read_record(path)
            except RecordError as exc:
                problems.append(str(exc))
                continue
            wrong = misplaced(record, cid, rank, repeat)  # a copy from another cell: no result of this one
            problems += [wrong] if wrong else []
            records += [] if wrong else [record]
    failed = [r for r in records if not r.ok]
    if failed:
        return "failed", "; ".join(f"rank {r.rank}: {r.status}: {r.error or ''}" for r in failed)
    if len(records) == world_size:
        restarts = sampling_restarts(records[0].segments)
        restarted = f"; sampling restarted at batch(es) {restarts} (no stream state saved)" if restarts else ""
        return "done", "on " + ",".join(sorted({str(r.node) for r in records})) + restarted
    return None, "; ".join([f"{len(records)}/{world_size} ranks written", *problems])


def cell_repeats(cell: ManifestCell) -> int:
    """The runs planned for the cell (manifests from before repeats: one)."""
    repeats = cell.params.get("repeats", 1)
    return repeats if isinstance(repeats, int) and repeats >= 1 else 1


# The input files a cell's id holds the hash of (w2w.data sets them): editing one gives the cell a new id.
HASHED_FILES = (("dataset.path", "dataset.content_sha256"), ("dataset.fewshot_path", "dataset.fewshot_sha256"))


def superseded(cell: ManifestCell, cells: dict[str, ManifestCell]) -> str | None:
    """Why a planned cell without results will never run, or None: its prompt or few-shot file was edited
    after it was planned (its job refuses it) and the manifest plans the edited file's cell, under a new id,
    with every other setting the same."""
    for key, sha_key in HASHED_FILES:
        path, planned = cell.params.get(key), cell.params.get(sha_key)
        if not path or not planned or not Path(path).is_file():
            continue
        try:
            now = file_sha256(Path(path))
        except OSError:
            continue
        if now == planned:
            continue
        same = {k: v for k, v in cell.params.items() if k != sha_key} | {sha_key: now}
        new = [cid for cid, other in cells.items() if other.params == same]
        if new:
            return f"{key}={path} was edited after this cell was planned: superseded by cell {new[0]}"
    return None


def cell_state(sweep_dir: Path, cid: str, cell: ManifestCell, job: JobState | None,
               log: CellLog | None = None, cells: dict[str, ManifestCell] | None = None) -> tuple[str, str]:
    """(state, reason) of one cell, from its records first, then from the job that last held it and
    the cell's own lines in that job's logs (log)."""
    if cell.skip_reason:
        return "skipped", cell.skip_reason
    state, progress = cell_records(sweep_dir, cid, cell.world_size, cell_repeats(cell))
    if state:
        return state, progress
    edited = superseded(cell, cells or {})
    if edited:
        return SUPERSEDED, edited
    lock = CellLock(sweep_dir, cid)
    if lock.taken():  # a w2w-run (this sweep's job or a command of its own) holds the cell now
        return "running", "; ".join([f"held by {lock.holder()}", progress])
    if job is None or job.state == "NOT_SUBMITTED":
        return "pending", "not submitted"
    if job.active:
        return ("running" if job.state == "RUNNING" else "pending"), progress
    return _ended_without_records(sweep_dir, cid, cell.world_size, cell_repeats(cell), job, log or CellLog(),
                                  progress)


def _ended_without_records(sweep_dir: Path, cid: str, world_size: int, repeats: int, job: JobState, log: CellLog,
                           progress: str) -> tuple[str, str]:
    """A cell whose job ended and whose records are not all there: missing where the job wrote them
    (some rank's file of an unfinished run, or, run once, its log's end line), else failed with the
    cell's own last line. With repeats the log's end line may be another run's, so it decides nothing."""
    problems = progress.split("; ")[1:]
    repeats = runs_planned(sweep_dir, cid, repeats)
    absent = {(k, r): record_path(sweep_dir, cid, r, k) for k in range(repeats) for r in range(world_size)}
    absent = {key: path for key, path in absent.items() if not path.is_file()}
    partial = any(len([p for p in absent.values() if p.parent == run.parent]) < world_size for run in absent.values())
    # A run whose end line is in the logs wrote its records: they were deleted since (with repeats, its own line).
    written = sorted({k for k, _ in absent} & log.ended_runs)
    ended = log.ended if repeats == 1 else (f"run(s) {written}" if written else None)
    if partial or ended:
        said = f" (the job's log says it ended {ended})" if ended else ""
        names = ", ".join(str(path.relative_to(cell_dir(sweep_dir, cid))) for path in absent.values())
        return MISSING, "; ".join([f"record missing: {names}{said}: re-run the sweep's command to run it again",
                                   *problems])
    ended = f"job ended {job.state}"
    if log.started:
        return "failed", "; ".join([f"{ended} during this cell (its last line: {log.last})", *problems])
    return "failed", "; ".join([f"{ended} before this cell started" + (f": {job.reason}" if job.reason else ""),
                                *problems])


@dataclass
class SweepStatus:
    manifest: Manifest
    submissions: dict[str, JobState]  # job id -> state, for the submissions that were asked
    cells: dict[str, tuple[str, str]]
    holders: dict[str, str] = field(default_factory=dict)  # cell id -> job id of its latest submission

    def counts(self, cells: Iterable[str] | None = None) -> Counter:
        ids = self.cells if cells is None else cells
        return Counter(self.cells[cid][0] for cid in ids if cid in self.cells)

    def summary(self, cells: Iterable[str] | None = None) -> str:
        ids = list(self.cells if cells is None else cells)
        counts = self.counts(ids)
        order = ("done", "failed", MISSING, "running", "pending", "skipped", SUPERSEDED)
        shown = [k for k in order if k not in (MISSING, SUPERSEDED) or counts.get(k)]  # only where there are
        return f"{len(ids)} cells: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in shown)

    @property
    def active(self) -> list[str]:
        """Job ids still queued or running."""
        return [job_id for job_id, state in self.submissions.items() if state.active]

    def in_flight(self) -> dict[str, str]:
        """Cell id -> job id, for cells that an active job is still to run."""
        return {cid: self.holders[cid] for cid, (state, _) in self.cells.items()
                if state in ("running", "pending") and self.submissions.get(self.holders.get(cid, ""), _NONE).active}


_NONE = JobState("NOT_SUBMITTED")


def sweep_status(sweep_dir: Path, manifest: Manifest | None = None) -> SweepStatus:
    """Each cell's state from its records, else from the job that last held it (asked once per job)."""
    manifest = load_manifest(sweep_dir) if manifest is None else manifest
    status = SweepStatus(manifest, {}, {})
    for cid, cell in manifest.cells.items():
        job, log = None, None
        if not cell.skip_reason:
            state, reason = cell_records(sweep_dir, cid, cell.world_size, cell_repeats(cell))
            if state:
                status.cells[cid] = (state, reason)
                continue
            held = manifest.holder(cid)
            if held is not None:
                entry, submission = held
                status.holders[cid] = submission.job_id
                if submission.job_id not in status.submissions:
                    status.submissions[submission.job_id] = submission_state(entry, submission)
                job = status.submissions[submission.job_id]
                if not job.active:
                    log = cell_log(submission.folder, submission.job_id, entry.nodes * entry.tasks_per_node, cid)
        status.cells[cid] = cell_state(sweep_dir, cid, cell, job, log, manifest.cells)
    for entry in manifest.jobs.values():  # for the listing: each job that last held a cell, and the latest
        holding = {s.job_id for s in map(entry.holder, entry.cells) if s is not None}
        for submission in entry.submissions:
            if submission.job_id not in status.submissions and (submission.job_id in holding
                                                                 or submission is entry.submissions[-1]):
                status.submissions[submission.job_id] = submission_state(entry, submission)
    return status


@dataclass(frozen=True)
class Completeness:
    """How much of the planned sweep has results: what w2w-reduce and w2w-report warn about."""

    sweep_dir: Path
    planned: int  # cells planned to run (the planner's skipped cells excluded)
    missing: int  # not submitted (or, without job states, no records yet), or a record missing
    failed: int  # a rank's record says so, or the job ended without the records
    running: int  # queued or running
    note: str = ""  # why job states could not be asked

    @property
    def complete(self) -> bool:
        return self.missing == self.failed == self.running == 0

    def warning(self) -> str:
        short = self.missing + self.failed + self.running
        return (f"incomplete sweep: {short} of {self.planned} planned cell(s) have no result: "
                f"{self.missing} missing, {self.failed} failed, {self.running} running or queued"
                + (f" ({self.note})" if self.note else "") + f"; see w2w-status {shlex.quote(str(self.sweep_dir))}")


def completeness(sweep_dir: Path, manifest: Manifest | None = None) -> Completeness | None:
    """From the manifest (None without one, e.g. after a bare w2w-run; read here unless given); where
    job states cannot be asked (no sacct here), a cell without records counts as missing."""
    if not (sweep_dir / MANIFEST).is_file():
        return None
    manifest = load_manifest(sweep_dir) if manifest is None else manifest
    note = ""
    try:
        cells = sweep_status(sweep_dir, manifest).cells
    except StatusError as exc:
        note = f"job states unknown: {str(exc).split(':')[0]}"
        cells = {}
        for cid, cell in manifest.cells.items():
            state = "skipped" if cell.skip_reason else cell_records(sweep_dir, cid, cell.world_size, cell_repeats(cell))[0]
            state = state or (SUPERSEDED if superseded(cell, manifest.cells) else None)
            cells[cid] = (state or "pending", "not submitted")
    counts = Counter(state for state, _ in cells.values())
    queued = sum(1 for state, reason in cells.values() if state == "pending" and reason != "not submitted")
    return Completeness(
        sweep_dir, planned=sum(n for state, n in counts.items() if state not in ("skipped", SUPERSEDED)),
        missing=counts["pending"] - queued + counts[MISSING], failed=counts["failed"], running=counts["running"] + queued, note=note,
    )


def foreign_cells(sweep_dir: Path, manifest: Manifest) -> list[str]:
    """Cell folders under cells/ that no command of this sweep planned (copied in from another sweep)."""
    folders = sorted(f.name for f in (sweep_dir / "cells").glob("*") if f.is_dir())
    return [cid for cid in folders if cid not in manifest.cells]


def damaged_responses(sweep_dir: Path, cids: Iterable[str]) -> dict[str, str]:
    """Cell id -> why the responses file of one of its runs (repeat-K/ too) does not match that run's
    rank-0 record's counts."""
    found = {}
    for cid in cids:
        runs = [0, *sorted(int(d.name.removeprefix(REPEAT_PREFIX)) for d in cell_dir(sweep_dir, cid).glob(f"{REPEAT_PREFIX}*")
                           if d.is_dir() and d.name.removeprefix(REPEAT_PREFIX).isdigit())]
        problems = []
        for repeat in runs:
            path = record_path(sweep_dir, cid, 0, repeat)
            if not path.is_file():
                continue
            try:
                record = read_record(path)
            except RecordError:
                continue  # the record's own problem is listed where it is read
            problem = None if misplaced(record, cid, 0, repeat) else responses_problem(sweep_dir, record)
            if problem:
                problems.append(problem if repeat == 0 else f"{REPEAT_PREFIX}{repeat}/{problem}")
        if problems:
            found[cid] = "; ".join(problems)
    return found


def sweep_problems(sweep_dir: Path, manifest: Manifest | None) -> list[str]:
    """One line per cell folder that is not this sweep's (manifest None: there is none to judge by)
    and per damaged responses file: what w2w-status, w2w-reduce and w2w-report list."""
    folders = sorted(f.name for f in (sweep_dir / "cells").glob("*") if f.is_dir())
    lines = [f"cell {cid}: not in this sweep's {MANIFEST} (copied in from another sweep?): its row is not from "
             f"this sweep's plan; move {sweep_dir / 'cells' / cid} out of cells/ to leave it out"
             for cid in (foreign_cells(sweep_dir, manifest) if manifest is not None else [])]
    lines += [f"cell {cid}: responses damaged: {problem}: re-run the cell to write them again "
              f"(move {record_path(sweep_dir, cid, 0).parent} aside first; its records are kept there)"
              for cid, problem in damaged_responses(sweep_dir, folders).items()]
    return lines


def _axes(manifest: Manifest) -> list[str]:
    return cell_axes(c.params for c in manifest.cells.values())


def _cell_line(cid: str, cell: ManifestCell, state: tuple[str, str], axes: list[str]) -> str:
    cell_st, reason = state
    return f"  cell {cid} {cell_st:<8} {describe(cell.params, axes, skip_none=True)}" + (f"  {reason}" if reason else "")


def _submission_label(job_id: str, state: JobState | None) -> str:
    """'4242: FAILED (exit 1:0)' for a job whose state was asked; an older one's bare id."""
    if state is None:
        return job_id
    return f"{job_id}: {state.state}" + (f" ({state.reason})" if state.reason else "")


def render(sweep_dir: Path, status: SweepStatus) -> str:
    """Every cell of the manifest, under the placement that runs it: the summary counts what is listed."""
    manifest = status.manifest
    axes = _axes(manifest)
    lines = [f"sweep {sweep_dir}: {status.summary()}"]
    by_job: dict[str | None, list[str]] = {}
    for cid, cell in manifest.cells.items():
        by_job.setdefault(cell.job if cell.job in manifest.jobs else None, []).append(cid)
    for key, cids in by_job.items():  # in the order they were planned
        order = {cid: i for i, cid in enumerate(manifest.jobs[key].cells)} if key else {}
        cids.sort(key=lambda cid: order.get(cid, len(order)))
    for key, entry in manifest.jobs.items():
        cids = by_job.get(key, [])
        if not cids:
            continue
        subs = ", ".join(_submission_label(s.job_id, status.submissions.get(s.job_id))
                         for s in entry.submissions) or "not submitted"
        lines.append(f"job {key}: {entry.shape}, {len(cids)} cell(s)  [{entry.backend} {subs}]")
        lines += [_cell_line(cid, manifest.cells[cid], status.cells[cid], axes) for cid in cids]
    for cid in by_job.get(None, []):
        lines.append(_cell_line(cid, manifest.cells[cid], status.cells[cid], axes))
    return "\n".join(lines)


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2w-status", description=__doc__)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not (args.sweep_dir / MANIFEST).is_file():
        print(f"w2w-status: error: {args.sweep_dir} has no {MANIFEST}: give the sweep_dir of a w2w-sweep", file=sys.stderr)
        return 2
    try:
        status = sweep_status(args.sweep_dir)
        print(render(args.sweep_dir, status))
        for line in sweep_problems(args.sweep_dir, status.manifest):
            print(line)
    except (ManifestError, StatusError) as exc:
        print(f"w2w-status: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
