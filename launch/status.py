"""w2w-status: per job and per cell, pending / running / done / failed (with the reason)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from w2w.launch.submit import MANIFEST, load_manifest

from w2w.records import Manifest, ManifestCell, ManifestJob, RecordError, read_record, record_path

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}


@dataclass(frozen=True)
class JobState:
    state: str  # SLURM's words: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... or NOT_SUBMITTED
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _slurm_state(job_id: str) -> JobState:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode,Reason"],
                         capture_output=True, text=True, check=False).stdout.strip().splitlines()
    if out:
        state, exit_code, reason = [*out[-1].split("|"), "", ""][:3]
        state = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
        detail = f"exit {exit_code}" if exit_code not in ("", "0:0") else ""
        return JobState(state, ", ".join(x for x in (detail, reason if reason != "None" else "") if x))
    queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                            check=False).stdout.strip()
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


def job_state(entry: ManifestJob) -> JobState:
    if not entry.submissions:
        return JobState("NOT_SUBMITTED")
    last = entry.submissions[-1]
    if entry.backend == "slurm":
        state = _slurm_state(last.job_id)
    else:
        state = _local_state(last.job_id, last.folder, entry.nodes * entry.tasks_per_node)
    if not state.active:
        error = _job_error(last.folder, last.job_id, state.state)
        if error:
            state = JobState("FAILED" if state.state in ("COMPLETED", "FINISHED") else state.state,
                             ", ".join(x for x in (state.reason, error) if x))
    return state


def cell_state(sweep_dir: Path, cid: str, cell: ManifestCell, job: JobState | None) -> tuple[str, str]:
    """(state, reason) of one cell, from its records first, then from its job."""
    if cell.skip_reason:
        return "skipped", cell.skip_reason
    records, problems = [], []
    for rank in range(cell.world_size):
        path = record_path(sweep_dir, cid, rank)
        if path.is_file():
            try:
                records.append(read_record(path))
            except RecordError as exc:
                problems.append(str(exc))
    failed = [r for r in records if not r.ok]
    if failed:
        return "failed", "; ".join(f"rank {r.rank}: {r.status}: {r.error or ''}" for r in failed)
    if len(records) == cell.world_size:
        return "done", "on " + ",".join(sorted({str(r.node) for r in records}))
    if job is None or job.state == "NOT_SUBMITTED":
        return "pending", "not submitted"
    if job.active:
        return ("running" if job.state == "RUNNING" else "pending"), f"{len(records)}/{cell.world_size} ranks written"
    reason = f"job ended {job.state}" + (f": {job.reason}" if job.reason else "")
    return "failed", "; ".join([reason, *problems])


@dataclass
class SweepStatus:
    manifest: Manifest
    jobs: dict[str, JobState]
    cells: dict[str, tuple[str, str]]

    def counts(self) -> Counter:
        return Counter(state for state, _ in self.cells.values())

    def summary(self) -> str:
        counts = self.counts()
        order = ("done", "failed", "running", "pending", "skipped")
        return f"{len(self.cells)} cells: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in order)


def sweep_status(sweep_dir: Path) -> SweepStatus:
    manifest = load_manifest(sweep_dir)
    jobs = {key: job_state(entry) for key, entry in manifest.jobs.items()}
    cells = {cid: cell_state(sweep_dir, cid, cell, jobs.get(cell.job)) for cid, cell in manifest.cells.items()}
    return SweepStatus(manifest, jobs, cells)


def _params(cell: ManifestCell) -> str:
    p = cell.params
    return " ".join(f"{k.split('.')[0]}={p[k]}" for k in ("dataset.name", "batch_size", "max_gen_len", "power_cap_w")
                    if p.get(k) is not None)


def render(sweep_dir: Path, status: SweepStatus) -> str:
    manifest = status.manifest
    lines = [f"sweep {sweep_dir}: {status.summary()}"]
    for key, entry in manifest.jobs.items():
        state = status.jobs[key]
        ids = ",".join(s.job_id for s in entry.submissions) or "-"
        lines.append(f"{entry.describe}  [{entry.backend} {ids}: {state.state}"
                     + (f" ({state.reason})" if state.reason else "") + "]")
        for cid in entry.cells:
            cell_st, reason = status.cells[cid]
            lines.append(f"  cell {cid} {cell_st:<8} {_params(manifest.cells[cid])}" + (f"  {reason}" if reason else ""))
    skipped = [cid for cid, c in manifest.cells.items() if c.job is None]
    for cid in skipped:
        lines.append(f"  cell {cid} skipped  {_params(manifest.cells[cid])}  {status.cells[cid][1]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2w-status", description=__doc__)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not (args.sweep_dir / MANIFEST).is_file():
        print(f"w2w-status: error: {args.sweep_dir} has no {MANIFEST}: give the sweep_dir of a w2w-sweep", file=sys.stderr)
        return 2
    try:
        status = sweep_status(args.sweep_dir)
    except RecordError as exc:
        print(f"w2w-status: error: {exc}", file=sys.stderr)
        return 2
    print(render(args.sweep_dir, status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
