"""Submit planned jobs with submitit (SLURM or local) and keep the sweep manifest.

manifest.json (w2w.records.Manifest, its JSON form documented there), one per sweep_dir, only ever
grows: every command, every cell ever planned per placement, and every submission with its own
cells: a cell's state comes from the latest submission that holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import submitit
from w2w.launch.axes import cell_parameters
from w2w.launch.job import CellsJob
from w2w.launch.plan import Job, Plan, PlannedCell
from w2w.launch.process import start_stamp

from w2w.files import write_json
from w2w.manifest import (
    MANIFEST,
    Command,
    Manifest,
    ManifestCell,
    ManifestJob,
    Submission,
    read_manifest,
)

LOCK = ".manifest.lock"


class SubmissionError(RuntimeError):
    """sbatch (or the local executor) refused a job; the message names the placement."""


def slurm_parameters(job: Job) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one placement (one task per GPU)."""
    c = job.cell.cluster
    uses_gpu = job.cell.gpu.device == "cuda"
    params: dict[str, Any] = {
        "job_name": f"w2w-{job.cell.model.name}-{job.cell.gpu.name}-x{job.cell.shards}",
        "nodes": job.nodes,
        "ntasks_per_node": job.tasks_per_node,
        "cpus_per_task": c.cpus_per_task,
        "time": c.timeout_min,
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "constraint": c.constraint,
        "gres": c.gres if c.gres else (f"gpu:{job.tasks_per_node}" if uses_gpu else None),
        "mem": f"{c.mem_gb:g}GB" if c.mem_gb else None,
        "setup": list(c.setup),
        "additional_parameters": dict(c.additional_parameters),
        "array_parallelism": c.array_parallelism,
        "signal_delay_s": 120,  # time to finish the current batch and requeue before the kill
    }
    return {k: v for k, v in params.items() if v not in (None, [], {})}


def local_parameters(job: Job) -> dict[str, Any]:
    """submitit LocalExecutor parameters: it hides every GPU it is not given (CUDA_VISIBLE_DEVICES)."""
    gpus = job.tasks_per_node if job.cell.gpu.device == "cuda" else 0
    return {"tasks_per_node": job.tasks_per_node, "nodes": 1, "timeout_min": job.cell.cluster.timeout_min,
            "gpus_per_node": gpus}


def make_executor(job: Job, folder: Path) -> submitit.Executor:
    c = job.cell.cluster
    if c.backend == "local":
        executor = submitit.LocalExecutor(folder=folder, python=c.python)
        executor.update_parameters(**local_parameters(job))
        return executor
    executor = submitit.SlurmExecutor(folder=folder, python=c.python, max_num_timeout=3)
    executor.update_parameters(**slurm_parameters(job))
    return executor


def _executor_key(job: Job) -> str:
    params = slurm_parameters(job) if job.cell.cluster.backend == "slurm" else {"tasks": job.tasks_per_node}
    return json.dumps([job.cell.cluster.backend, params], sort_keys=True, default=str)


def _submission_message(exc: Exception) -> str:
    """sbatch's own words: the last line that says 'error', else the last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [type(exc).__name__])[-1]


def submit_jobs(jobs_and_cells: list[tuple[Job, list[PlannedCell]]], sweep_dir: Path,
                on_submitted: Callable[[list[tuple[Job, list[PlannedCell], submitit.Job]]], None]) -> list[SubmissionError]:
    """Submit each job with its pending cells; jobs with identical SLURM parameters form one array.
    on_submitted sees each array as soon as it is queued (to record it before the next sbatch);
    a refused array is returned as an error naming its placements, and the others still go."""
    folder = sweep_dir / "submitit" / "%j"
    groups: dict[str, list[tuple[Job, list[PlannedCell]]]] = {}
    for item in jobs_and_cells:
        groups.setdefault(_executor_key(item[0]), []).append(item)
    errors = []
    for group in groups.values():
        executor = make_executor(group[0][0], folder)
        chatter = io.StringIO()  # submitit echoes sbatch's stderr; the error line below says it once
        try:
            local = group[0][0].cell.cluster.backend == "local"
            quiet = _controller_stdio(sweep_dir / "submitit" / CONTROLLER_LOG) if local else contextlib.nullcontext()
            obeying = _children_obey_sigint() if local else contextlib.nullcontext()
            with contextlib.redirect_stderr(chatter), quiet, obeying, executor.batch():
                handles = [executor.submit(CellsJob([c.cell for c in cells])) for _, cells in group]
        except Exception as exc:  # sbatch's refusal, whatever submitit wraps it in
            names = "; ".join(job.describe() for job, _ in group)
            errors.append(SubmissionError(f"submitting {names} failed: {_submission_message(exc)}"))
            continue
        on_submitted([(job, cells, handle) for (job, cells), handle in zip(group, handles, strict=True)])
    return errors


@contextlib.contextmanager
def _children_obey_sigint() -> Iterator[None]:
    """Local jobs started here obey SIGINT, which w2w-sweep sends them to stop them (and submitit's cancel
    sends their controller), even when w2w-sweep itself runs with SIGINT ignored, as a background job of a
    script or `nohup ... &` does. An ignored signal stays ignored across exec, a handled one is reset to its
    default: while the jobs start, this process handles SIGINT by doing nothing, so it stays immune itself."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# Where the local executor's controller processes write their output (submitit's own traceback on Ctrl-C).
CONTROLLER_LOG = "local-controllers.log"


@contextlib.contextmanager
def _controller_stdio(log: Path) -> Iterator[None]:
    """Point file descriptors 1 and 2 at `log`, and 0 at /dev/null, while local jobs start. Their controller
    inherits them: holding w2w-sweep's stdout, it kept a pipe (`w2w-sweep ... | tee log`) open until the job
    ended, and a Ctrl-C traceback of its own followed w2w-sweep's message. The tasks' output goes to their
    own files anyway."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if sys.stdout is not None:  # None: w2w-sweep started with stdout closed
        sys.stdout.flush()
    sys.stderr.flush()
    saved = [_dup_or_none(fd) for fd in (0, 1, 2)]
    try:
        with open(log, "a") as handle, open(os.devnull) as nothing:
            os.dup2(nothing.fileno(), 0)
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
        yield
    finally:
        for fd, copy in enumerate(saved):
            if copy is None:  # closed before (`>&-`): closed again
                os.close(fd)
            else:
                os.dup2(copy, fd)
                os.close(copy)


def _dup_or_none(fd: int) -> int | None:
    try:
        return os.dup(fd)
    except OSError:  # a closed descriptor (`w2w-sweep >&-`)
        return None


def load_manifest(sweep_dir: Path) -> Manifest:
    """The sweep's manifest (an empty one where none is yet); ManifestError if it does not parse."""
    return read_manifest(sweep_dir / MANIFEST)


@contextlib.contextmanager
def locked(sweep_dir: Path) -> Iterator[None]:
    """One w2w-sweep at a time reads, submits into and writes a sweep's manifest (fcntl lock)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cell_entry(cell: PlannedCell, job: Job | None) -> ManifestCell:
    return ManifestCell(job=None if job is None else job.key, params=cell_parameters(cell.cell),
                        skip_reason=cell.skip_reason, world_size=cell.cell.shards)


def record_plan(manifest: Manifest, plan: Plan, argv: list[str]) -> Manifest:
    """Add the plan's jobs and cells (and the command) to the manifest; nothing planned before is dropped."""
    now = time.time()
    manifest.commands.append(Command(argv=["w2w-sweep", *argv], unix_s=now))
    manifest.updated_unix_s = now
    for job in plan.jobs:
        entry = manifest.jobs.setdefault(job.key, ManifestJob(job.cell.cluster.backend, job.nodes, job.tasks_per_node))
        entry.backend, entry.nodes, entry.tasks_per_node = job.cell.cluster.backend, job.nodes, job.tasks_per_node
        entry.shape = job.shape()
        known = set(entry.cells)
        entry.cells += [c.id for c in job.cells if c.id not in known]
        for cell in job.cells:
            manifest.cells[cell.id] = _cell_entry(cell, job)
    for cell in plan.skipped:
        manifest.cells.setdefault(cell.id, _cell_entry(cell, None))
    return manifest


def record_submission(manifest: Manifest, job: Job, cells: list[PlannedCell], handle: submitit.Job,
                      argv: list[str]) -> None:
    local = job.cell.cluster.backend == "local"
    manifest.jobs[job.key].submissions.append(Submission(
        job_id=str(handle.job_id), folder=str(handle.paths.folder), submitted_unix_s=time.time(),
        cells=[c.id for c in cells], command=["w2w-sweep", *argv],
        process_start=start_stamp(int(handle.job_id)) if local else None,
    ))


def save_manifest(manifest: Manifest, sweep_dir: Path) -> None:
    write_json(sweep_dir / MANIFEST, manifest)
