"""The callable each SLURM (or local) task runs: the runner over one placement's cells, requeued on timeout."""

from __future__ import annotations

import sys

import submitit

from w2w.cell import Cell


class CellsJob(submitit.helpers.Checkpointable):
    """Checkpointable: on preemption or timeout submitit requeues the same cells, and the
    runner skips those whose records are complete, so the job resumes at the first unfinished cell."""

    def __init__(self, cells: list[Cell]):
        self.cells = cells

    def __call__(self) -> list[str]:
        from w2w import signals
        from w2w.runner import run_cells, setup_logging

        setup_logging()
        # submitit ignores SIGTERM (scancel's, the local executor's): here it stops the task after its batch,
        # with the cap restored and the progress kept, and exits with the signal's status (143).
        with signals.on_signals():
            try:
                return run_cells(self.cells)
            except signals.Stopped as stop:
                print(signals.stopped_line("w2w job", stop), file=sys.stderr)
                raise SystemExit(stop.exit_status) from None
