"""w2w-sweep: plan a grid, submit the placements with unfinished cells, and return (or --wait)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from w2w.launch.axes import cell_axes, cell_parameters, describe
from w2w.launch.plan import Job, Plan, PlannedCell, make_plan, pending_cells, with_snapshots
from w2w.launch.status import MISSING, StatusError, render, sweep_status
from w2w.launch.submit import (
    load_manifest,
    locked,
    record_plan,
    record_submission,
    save_manifest,
    submit_jobs,
)

from w2w.errors import ConfigError
from w2w.exits import quiet_on_broken_pipe
from w2w.files import writable_problem
from w2w.manifest import MANIFEST, ManifestError

USAGE = """w2w-sweep [--plan] [--wait] [key=value ...]

Overrides use Hydra's grammar; comma lists make the grid, e.g.
  w2w-sweep model=llama_65b gpu=v100 shards=8,16,32 batch_size=64,128 max_gen_len=512,1024 \\
            dataset=alpaca,gsm8k cluster=supercloud sweep_dir=runs/fig4
Re-running the same command submits only the cells that are missing or failed and not already queued."""


def print_plan(plan: Plan) -> None:
    gpus = sum(job.gpus for job in plan.jobs)
    print(f"{len(plan.jobs)} job(s), {len(plan.cells)} cell(s), {gpus} GPU(s) across jobs")
    params = {cell.id: cell_parameters(cell.cell) for cell in plan.cells + plan.skipped}
    axes = cell_axes(params.values())
    for job in plan.jobs:
        print(job.describe())
        for cell in job.cells:
            print(f"  cell {cell.id} {describe(params[cell.id], axes)}"
                  + (f" est. {cell.memory.total_gib:.1f} GiB/GPU" if cell.cell.gpu.device == "cuda" else ""))
    for cell in plan.skipped:
        print(f"  skipped {cell.id} {describe(params[cell.id], axes)}: {cell.skip_reason}")


def _sweep_dir(plan: Plan) -> Path:
    dirs = {cell.cell.sweep_dir for cell in plan.cells + plan.skipped}
    if len(dirs) != 1:
        raise ConfigError(f"sweep_dir must be one folder for the whole sweep, got {sorted(dirs)}")
    sweep_dir = Path(dirs.pop())
    problem = writable_problem(sweep_dir)
    if problem:
        raise ConfigError(f"sweep_dir={sweep_dir}: {problem}: give sweep_dir= a folder you can write")
    return sweep_dir


def _to_submit(plan: Plan, in_flight: dict[str, str]) -> list[tuple[Job, list[PlannedCell]]]:
    """Per placement, its unfinished cells that no queued or running job holds: those go as a new job."""
    todo = []
    for job in plan.jobs:
        pending = pending_cells(job)
        free = [c for c in pending if c.id not in in_flight]
        held = sorted({in_flight[c.id] for c in pending if c.id in in_flight})
        if not pending:
            print(f"{job.describe()}: all cells done")
        elif not free:
            print(f"{job.describe()}: already queued or running ({', '.join(held)})")
        else:
            if held:
                print(f"{job.describe()}: {len(pending) - len(free)} cell(s) already queued or running "
                      f"({', '.join(held)}); the other {len(free)} go as a job of their own")
            todo.append((job, free))
    return todo


def submit(plan: Plan, sweep_dir: Path, argv: list[str]) -> int:
    """Submit what is unfinished and not in flight, under the sweep's lock; returns the refused submissions.
    Each job is in the manifest as soon as it is queued, so a later refusal leaves none untracked."""
    with locked(sweep_dir):
        manifest = record_plan(load_manifest(sweep_dir), plan, argv)
        save_manifest(manifest, sweep_dir)
        todo = _to_submit(plan, sweep_status(sweep_dir, manifest).in_flight())

        def on_submitted(batch: list) -> None:
            for job, cells, handle in batch:
                record_submission(manifest, job, cells, handle, argv)
            save_manifest(manifest, sweep_dir)
            for job, cells, handle in batch:
                print(f"{job.describe()}: submitted {handle.job_id} ({len(cells)} cell(s) to run)")

        errors = submit_jobs(todo, sweep_dir, on_submitted) if todo else []
    for error in errors:
        print(f"w2w-sweep: error: {error}", file=sys.stderr)
    print(f"sweep manifest: {sweep_dir / MANIFEST}; follow with: {shlex.join(['w2w-status', str(sweep_dir)])}")
    return len(errors)


def wait(sweep_dir: Path, poll_s: float, cells: list[str]) -> int:
    """Follow the sweep until no job is active; exit 0 only if every cell of this command is done or skipped."""
    last = ""
    while True:
        status = sweep_status(sweep_dir)
        line = status.summary(cells)
        if line != last:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        if not status.active:
            break
        time.sleep(poll_s)
    print(render(sweep_dir, status))
    counts = status.counts(cells)
    if len(cells) != len(status.cells):
        print(f"this command's {status.summary(cells)}")
        mine = set(cells)
        others = [cid for cid, (state, _) in status.cells.items() if state in ("failed", MISSING) and cid not in mine]
        if others:
            print(f"{len(others)} other cell(s) of this sweep failed (listed above): they do not change this "
                  "command's exit status; re-run their command to retry them")
    return 0 if counts.get("failed", 0) == counts.get("pending", 0) == counts.get(MISSING, 0) == 0 else 1


def _stop_local_jobs(sweep_dir: Path) -> list[str]:
    """Stop the sweep's running local jobs (as Ctrl-C in the terminal does), whoever got the signal."""
    try:
        status = sweep_status(sweep_dir)
    except (ManifestError, StatusError):
        return []
    local = {s.job_id for entry in status.manifest.jobs.values() if entry.backend == "local"
             for s in entry.submissions}
    stopped = []
    for job_id in sorted(local & set(status.active)):
        # The tasks, not submitit's controller: each stops its cell and logs why in its own log; the
        # controller then ends quietly (interrupted itself, it prints a traceback onto this terminal).
        for pid in _children(int(job_id)) or [int(job_id)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        stopped.append(job_id)
    return stopped


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _interrupted(plan: Plan, sweep_dir: Path, argv: list[str]) -> int:
    """Ctrl-C while following: say what became of the jobs, and how to go on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the message short
    again = shlex.join(["w2w-sweep", "--wait", *argv])
    if any(job.cell.cluster.backend == "local" for job in plan.jobs):
        stopped = _stop_local_jobs(sweep_dir)
        print("\nw2w-sweep: interrupted: local jobs run under this process and stop with it"
              + (f" (stopped {', '.join(stopped)})" if stopped else "")
              + f"; finished cells are kept: resume the rest with: {again}", file=sys.stderr)
    else:
        ids = "<job ids>"
        with contextlib.suppress(ManifestError, StatusError):
            ids = " ".join(sweep_status(sweep_dir).active) or ids
        print(f"\nw2w-sweep: interrupted: the SLURM jobs keep running; follow them with: {shlex.join(['w2w-status', str(sweep_dir)])} "
              f"(or {again}); stop them with: scancel {ids}", file=sys.stderr)
    return 130


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a number of seconds > 0")
    return value


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2w-sweep", usage=USAGE, description=__doc__)
    parser.add_argument("--plan", action="store_true", help="print the jobs and cells; submit nothing")
    parser.add_argument("--wait", action="store_true", help="follow progress until every job has ended")
    parser.add_argument("--poll", type=positive_float, default=5.0,
                        help="seconds between progress checks with --wait (> 0)")
    parser.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                        help="a folder of more presets (cluster/, model/, ...) beside w2w's own; "
                        "repeatable; also W2W_CONFIG_DIR")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; a,b lists make a grid")
    args = parser.parse_intermixed_args(argv)  # overrides before, between and after the flags
    try:
        plan = make_plan(args.overrides, args.config_dir)
        sweep_dir = _sweep_dir(plan)
        plan = with_snapshots(plan, sweep_dir)  # the jobs read the prompts from the sweep alone
    except ConfigError as exc:
        print(f"w2w-sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nw2w-sweep: interrupted while planning: nothing was submitted", file=sys.stderr)
        return 130
    print_plan(plan)
    if args.plan:
        return 0
    try:
        refused = submit(plan, sweep_dir, args.overrides)
        if args.wait:
            return wait(sweep_dir, args.poll, [c.id for c in plan.cells + plan.skipped]) or (1 if refused else 0)
    except (ManifestError, StatusError) as exc:
        print(f"w2w-sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(plan, sweep_dir, args.overrides)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
