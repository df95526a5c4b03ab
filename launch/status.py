"""w2w-status: per job and per cell, pending / running / done / failed (with the reason)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from w2w.launch.axes import cell_axes, describe
from w2w.launch.submit import load_manifest

from w2w.records import (
    MANIFEST,
    Manifest,
    ManifestCell,
    ManifestError,
    ManifestJob,
    RecordError,
    Submission,
    read_record,
    record_path,
)

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


def _local_state(job_id: str, folder: str, tasks: int) -> JobState:
    """submitit's local controller: finished once every task left its result pickle or the pid is gone."""
    if all((Path(folder) / f"{job_id}_{task}_result.pkl").is_file() for task in range(tasks)):
        return JobState("FINISHED")
    try:
        stat = Path(f"/proc/{int(job_id)}/stat").read_text()
    except (OSError, ValueError):
        return JobState("FINISHED")
    return JobState("FINISHED" if stat.rsplit(")", 1)[1].split()[0] == "Z" else "RUNNING")


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
    elif state in ("FAILED", "NODE_FAIL", "FINISHED"):
        text = log.read_text(errors="replace") if log.is_file() else ""
    else:
        text = ""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def submission_state(entry: ManifestJob, submission: Submission) -> JobState:
    """The state of one submission of a placement (entry), with the reason a finished one failed."""
    if entry.backend == "slurm":
        state = _slurm_state(submission.job_id)
    else:
        state = _local_state(submission.job_id, submission.folder, entry.nodes * entry.tasks_per_node)
    if not state.active:
        error = _job_error(submission.folder, submission.job_id, state.state)
        if error:
            state = JobState("FAILED" if state.state in ("COMPLETED", "FINISHED") else state.state,
                             ", ".join(x for x in (state.reason, error) if x))
    return state


def cell_records(sweep_dir: Path, cid: str, world_size: int, repeats: int = 1) -> tuple[str | None, str]:
    """(state, reason) that the cell's records alone decide: failed when a run failed, done when all
    its runs (repeats) are; else (None, progress)."""
    if repeats == 1:
        return run_records(sweep_dir, cid, world_size)
    runs = [run_records(sweep_dir, cid, world_size, k) for k in range(repeats)]
    failed = [f"repeat {k}: {reason}" for k, (state, reason) in enumerate(runs) if state == "failed"]
    if failed:
        return "failed", "; ".join(failed)
    done = sum(state == "done" for state, _ in runs)
    if done == repeats:
        return "done", f"{repeats} repeats, " + runs[0][1]
    return None, "; ".join([f"{done}/{repeats} repeats done", *[r for s, r in runs if s is None and "; " in r]])


def run_records(sweep_dir: Path, cid: str, world_size: int, repeat: int = 0) -> tuple[str | None, str]:
    """(state, reason) of one run of the cell from its records (done or failed), else (None, progress)."""
    records, problems = [], []
    for rank in range(world_size):
        path = record_path(sweep_dir, cid, rank, repeat)
        if path.is_file():
            try:
                records.append(read_record(path))
            except RecordError as exc:
                problems.append(str(exc))
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        return "failed", "; ".join(f"rank {r['rank']}: {r['status']}: {r.get('error', '')}" for r in failed)
    if len(records) == world_size:
        return "done", "on " + ",".join(sorted({str(r.get("node")) for r in records}))
    return None, "; ".join([f"{len(records)}/{world_size} ranks written", *problems])


def cell_repeats(cell: ManifestCell) -> int:
    """The runs planned for the cell (manifests from before repeats: one)."""
    repeats = cell.params.get("repeats", 1)
    return repeats if isinstance(repeats, int) and repeats >= 1 else 1


def cell_state(sweep_dir: Path, cid: str, cell: ManifestCell, job: JobState | None) -> tuple[str, str]:
    """(state, reason) of one cell, from its records first, then from the job that last held it."""
    if cell.skip_reason:
        return "skipped", cell.skip_reason
    state, progress = cell_records(sweep_dir, cid, cell.world_size, cell_repeats(cell))
    if state:
        return state, progress
    if job is None or job.state == "NOT_SUBMITTED":
        return "pending", "not submitted"
    if job.active:
        return ("running" if job.state == "RUNNING" else "pending"), progress
    reason = f"job ended {job.state}" + (f": {job.reason}" if job.reason else "")
    problems = progress.split("; ")[1:]
    return "failed", "; ".join([reason, *problems])


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
        order = ("done", "failed", "running", "pending", "skipped")
        return f"{len(ids)} cells: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in order)

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
        job = None
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
        status.cells[cid] = cell_state(sweep_dir, cid, cell, job)
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
    missing: int  # not submitted (or, without job states, no records yet)
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
                + (f" ({self.note})" if self.note else "") + f"; see w2w-status {self.sweep_dir}")


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
            cells[cid] = (state or "pending", "not submitted")
    counts = Counter(state for state, _ in cells.values())
    queued = sum(1 for state, reason in cells.values() if state == "pending" and reason != "not submitted")
    return Completeness(
        sweep_dir, planned=sum(n for state, n in counts.items() if state != "skipped"),
        missing=counts["pending"] - queued, failed=counts["failed"], running=counts["running"] + queued, note=note,
    )


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2w-status", description=__doc__)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not (args.sweep_dir / MANIFEST).is_file():
        print(f"w2w-status: error: {args.sweep_dir} has no {MANIFEST}: give the sweep_dir of a w2w-sweep", file=sys.stderr)
        return 2
    try:
        print(render(args.sweep_dir, sweep_status(args.sweep_dir)))
    except (ManifestError, StatusError) as exc:
        print(f"w2w-status: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
