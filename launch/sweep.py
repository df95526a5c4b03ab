"""w2w-sweep: plan a grid, submit the placements with unfinished cells, and return (or --wait)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from w2w.launch.plan import Plan, make_plan, pending_cells
from w2w.launch.status import job_state, render, sweep_status
from w2w.launch.submit import load_manifest, save_manifest, submit_jobs, update_manifest

from w2w.config import ConfigError
from w2w.records import RecordError

USAGE = """w2w-sweep [--plan] [--wait] [key=value ...]

Overrides use Hydra's grammar; comma lists make the grid, e.g.
  w2w-sweep model=llama_65b gpu=v100 shards=8,16,32 batch_size=64,128 max_gen_len=512,1024 \\
            dataset=alpaca,gsm8k cluster=supercloud sweep_dir=runs/fig4
Re-running the same command submits only the placements with missing or failed cells."""


def print_plan(plan: Plan) -> None:
    gpus = sum(job.gpus for job in plan.jobs)
    print(f"{len(plan.jobs)} job(s), {len(plan.cells)} cell(s), {gpus} GPU(s) across jobs")
    for job in plan.jobs:
        print(job.describe())
        for cell in job.cells:
            c = cell.cfg
            print(f"  cell {cell.id} dataset={c.dataset.name} batch_size={c.batch_size} "
                  f"max_gen_len={c.max_gen_len} power_cap_w={c.power_cap_w}"
                  + (f" est. {cell.memory.total_gib:.1f} GiB/GPU" if c.gpu.device == "cuda" else ""))
    for cell in plan.skipped:
        print(f"  skipped {cell.id} dataset={cell.cfg.dataset.name}: {cell.skip_reason}")


def _sweep_dir(plan: Plan) -> Path:
    dirs = {cell.cfg.sweep_dir for cell in plan.cells + plan.skipped}
    if len(dirs) != 1:
        raise ConfigError(f"sweep_dir must be one folder for the whole sweep, got {sorted(dirs)}")
    return Path(dirs.pop())


def submit(plan: Plan, sweep_dir: Path, argv: list[str]) -> int:
    manifest = load_manifest(sweep_dir)
    todo = []
    for job in plan.jobs:
        pending = pending_cells(job)
        entry = manifest.jobs.get(job.key)
        if not pending:
            print(f"{job.describe()}: all cells done")
        elif entry and job_state(entry).active:
            print(f"{job.describe()}: already queued or running ({entry.submissions[-1].job_id})")
        else:
            todo.append((job, pending))
    submitted = submit_jobs(todo, sweep_dir) if todo else []
    save_manifest(update_manifest(manifest, plan, submitted, argv), sweep_dir)
    for (job, handle), (_, pending) in zip(submitted, todo, strict=True):
        print(f"{job.describe()}: submitted {handle.job_id} ({len(pending)} cell(s) to run)")
    print(f"sweep manifest: {sweep_dir / 'manifest.json'}; follow with: w2w-status {sweep_dir}")
    return len(submitted)


def wait(sweep_dir: Path, poll_s: float) -> int:
    """Follow the sweep until no job is active; exit 0 only if every planned cell is done or skipped."""
    last = ""
    while True:
        status = sweep_status(sweep_dir)
        line = status.summary()
        if line != last:
            print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        if not any(state.active for state in status.jobs.values()):
            break
        time.sleep(poll_s)
    print(render(sweep_dir, status))
    counts = status.counts()
    return 0 if counts.get("failed", 0) == 0 and counts.get("pending", 0) == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2w-sweep", usage=USAGE, description=__doc__)
    parser.add_argument("--plan", action="store_true", help="print the jobs and cells; submit nothing")
    parser.add_argument("--wait", action="store_true", help="follow progress until every job has ended")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between progress checks with --wait")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; a,b lists make a grid")
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args.overrides)
        sweep_dir = _sweep_dir(plan)
    except ConfigError as exc:
        print(f"w2w-sweep: error: {exc}", file=sys.stderr)
        return 2
    print_plan(plan)
    if args.plan:
        return 0
    try:
        submit(plan, sweep_dir, args.overrides)
    except RecordError as exc:  # a manifest this w2w cannot read: nothing was submitted
        print(f"w2w-sweep: error: {exc}", file=sys.stderr)
        return 2
    return wait(sweep_dir, args.poll) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
