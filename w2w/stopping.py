"""repeats=auto: whether a cell has run often enough, judged on its runs' J per token, and the file that says why it stopped."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from w2w.cell import Cell
from w2w.files import write_json
from w2w.records import read_record, record_path, run_dir, with_batch_totals
from w2w.schema import RecordError
from w2w.stats import CONFIDENCE, summarize

STOP_FILE = "repeats.json"  # in the cell's folder, beside run 0's records
TIGHT, MAXIMUM = "tight", "maximum"
METRIC = "energy_per_token_j"  # what repeats_target_pct is judged on


@dataclass(frozen=True)
class Stop:
    """Why a repeats=auto cell ran no more: its interval was tight, or it reached repeats_max."""

    runs: int  # runs made: repeat 0 .. runs - 1
    ok_runs: int  # of those, the ones with a J per token
    stopped: str  # TIGHT or MAXIMUM
    target_pct: float
    interval_pct: float | None  # the interval's larger side as a share of its center, at the stop
    interval: str | None  # which interval: "t" or "median" (w2w.stats)
    metric: str = METRIC


def stop_path(sweep_dir: str | Path, cid: str) -> Path:
    return run_dir(sweep_dir, cid) / STOP_FILE


def read_stop(sweep_dir: str | Path, cid: str) -> Stop | None:
    """The cell's stop file, or None where it has none (not repeats=auto, or still running) or it does not read."""
    try:
        return Stop(**json.loads(stop_path(sweep_dir, cid).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def runs_planned(sweep_dir: str | Path, cid: str, repeats: int) -> int:
    """The runs a cell needs: where it stopped (repeats=auto), else repeats."""
    stop = read_stop(sweep_dir, cid)
    return stop.runs if stop is not None else repeats


def energy_per_token(sweep_dir: str | Path, cid: str, world_size: int, repeat: int) -> float | None:
    """One run's GPU energy summed over its ranks per returned token; None unless every rank's record is ok
    and has energy."""
    energy_j = 0.0
    tokens = 0
    for rank in range(world_size):
        try:
            record = with_batch_totals(read_record(record_path(sweep_dir, cid, rank, repeat)))
        except RecordError:
            return None
        if not record.ok or record.energy.gpu_j is None:
            return None
        energy_j += record.energy.gpu_j
        tokens = record.counts.output_tokens if rank == 0 else tokens
    return energy_j / tokens if tokens else None


def decide(cell: Cell, world_size: int, runs: int) -> Stop | None:
    """After `runs` runs of a repeats=auto cell: a Stop where its J per token is tight (at least
    repeats_min runs, a 95% interval that covers 95%, within ±repeats_target_pct of its center) or it
    has run repeats_max times; else None: run it again."""
    values = [v for k in range(runs) if (v := energy_per_token(cell.sweep_dir, cell.id, world_size, k)) is not None]
    summary = summarize(values)
    width = summary.half_width_pct
    covers = summary.cover_pct is not None and summary.cover_pct >= 100 * CONFIDENCE - 1e-9
    tight = len(values) >= cell.repeats_min and covers and width is not None and width <= cell.repeats_target_pct
    if not tight and runs < cell.repeats:
        return None
    return Stop(runs, len(values), TIGHT if tight else MAXIMUM, cell.repeats_target_pct, width, summary.interval)


def write_stop(cell: Cell, stop: Stop) -> Path:
    path = stop_path(cell.sweep_dir, cell.id)
    write_json(path, asdict(stop))
    return path
