"""w2w-reduce: join the rank records of each cell into the cells table (CSV, Parquet, Markdown)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from w2w.analysis.metrics import METRIC_NAMES, CellTotals, compute
from w2w.analysis.stats import COMPARED, INTERVAL, RUNS, is_number, summarize, summary_columns
from w2w.launch.axes import cell_parameters, label, varying_axes
from w2w.launch.status import completeness, sweep_problems
from w2w.launch.submit import load_manifest

from w2w.cell import SHOWN_AXES
from w2w.engines import RENAMED_TO
from w2w.exits import quiet_on_broken_pipe
from w2w.files import writable_problem, write_atomic
from w2w.manifest import MANIFEST, Manifest, ManifestError
from w2w.records import (
    REPEAT_PREFIX,
    STATUS_OK,
    Energy,
    RankRecord,
    read_record,
    sampling_restarts,
    with_batch_totals,
)
from w2w.schema import RecordError
from w2w.stopping import Stop, read_stop

if TYPE_CHECKING:
    import pandas as pd

# pandas, pyarrow and the modules built on them (ladder, tables) are imported in the functions that use
# them: w2w-reduce checks its arguments and the folder first, and --help does not wait for them.

# The axes that are columns of every cells table, whether they vary or not.
PARAM_COLUMNS = tuple(axis.column for axis in SHOWN_AXES)
# Measured beside the metrics: GPU energy summed over the cell's GPUs, CPU energy over its nodes.
ENERGY_COLUMNS = (
    "energy_source", "idle_power_w", "prefill_energy_j", "decode_energy_j", "cpu_energy_j",
    "power_cap_enforced_w", "sm_util_avg_pct", "mem_util_max_pct", "mem_used_max_pct", "cpu_note",
)


class ReduceError(ValueError):
    """A request the sweep directory cannot answer (e.g. no timeline for a cell)."""


@dataclass
class CellRecords:
    cell_id: str
    records: dict[int, RankRecord] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    timeline_samples: int = 0  # rows read from the ranks' timeline files
    runs: dict[int, CellRecords] = field(default_factory=dict)  # repeat K >= 1 -> that run's records (cells/<id>/repeat-K/)
    repeats: int = 1  # runs planned for the cell (its config's repeats)
    stop: Stop | None = None  # repeats=auto: how many runs it took and why it stopped


# The timeline columns the reducer decodes: a file that does not yield them does not parse.
TIMELINE_CHECK_COLUMNS = ("t_s", "power_w")


def _record_problem(path: Path, record: RankRecord, cid: str | None = None, repeat: int = 0) -> str | None:
    """Why a parsed record cannot be used (a hand edit, a copy into the wrong folder), or None."""
    rank, world = record.rank, record.world_size
    if not 0 <= rank < world:
        return f"{path}: rank {rank!r} of world_size {world!r} is not a rank"
    if (path.name != f"rank-{rank:05d}.json" or record.cell_id != (cid or path.parent.name)
            or record.repeat != repeat):
        return f"{path}: holds cell {record.cell_id!r} rank {rank} repeat {record.repeat}, not what its path says"
    return None


def read_timeline_rows(path: Path) -> tuple[int, str | None]:
    """Decode one rank's timeline: its row count, or why it does not parse (torn, hand-edited)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=list(TIMELINE_CHECK_COLUMNS)).num_rows, None
    except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
        return 0, f"{path}: unreadable timeline ({type(exc).__name__}: {exc})"


def _load_cell(folder: Path, cid: str | None = None, repeat: int = 0) -> CellRecords:
    """One run's records: the cell's folder (run 0), or its repeat-K subfolder with the cell id given."""
    cell = CellRecords(cid or folder.name)
    for path in sorted(folder.glob("rank-*.json")):
        try:
            record = read_record(path)
        except RecordError as exc:
            cell.problems.append(str(exc))
            continue
        problem = _record_problem(path, record, cid, repeat)
        if problem:
            cell.problems.append(problem)
            continue
        cell.records[record.rank] = record
        if record.timeline is not None:  # the file name the runner wrote beside the record
            rows, problem = read_timeline_rows(folder / record.timeline)
            cell.timeline_samples += rows
            if problem:
                cell.problems.append(problem)
    return cell


def load_cells(sweep_dir: Path, manifest: Manifest | None = None) -> dict[str, CellRecords]:
    """Every cell folder's rank records; unreadable files become problems of their cell. The runs a cell
    planned are its records' repeats, or the manifest's where a later w2w-sweep raised them (the runs
    still to do are then named in its repeat_note); manifest: the sweep's, where the caller read it already."""
    folders = [f for f in sorted((sweep_dir / "cells").glob("*")) if f.is_dir()]
    cells = {folder.name: _with_runs(_load_cell(folder), folder) for folder in folders}
    for cid, repeats in _planned_repeats(sweep_dir, manifest).items():
        if cid in cells:
            cells[cid].repeats = max(cells[cid].repeats, repeats)
    return cells


def _planned_repeats(sweep_dir: Path, manifest: Manifest | None) -> dict[str, int]:
    """Cell id -> the repeats its latest plan asked for (the manifest's); none without a readable manifest."""
    if manifest is None and (sweep_dir / MANIFEST).is_file():
        try:
            manifest = load_manifest(sweep_dir)
        except (ManifestError, OSError):
            return {}  # the manifest's own problem is reported where it is read
    cells = manifest.cells if manifest is not None else {}
    return {cid: r for cid, cell in cells.items() if isinstance(r := cell.params.get("repeats"), int) and r >= 1}


def _with_runs(cell: CellRecords, folder: Path) -> CellRecords:
    """The cell with the records of its repeats (runs 1..K in repeat-K/) and the runs it planned."""
    for sub in sorted(folder.glob(f"{REPEAT_PREFIX}*")):
        number = sub.name.removeprefix(REPEAT_PREFIX)
        if sub.is_dir() and number.isdigit() and int(number) >= 1:
            cell.runs[int(number)] = _load_cell(sub, cell.cell_id, int(number))
    configs = [r.config for run in (cell, *cell.runs.values()) for r in run.records.values()]
    planned = [c.get("repeats") for c in configs if isinstance(c, dict) and isinstance(c.get("repeats"), int)]
    cell.repeats = max([*planned, 1])
    cell.stop = read_stop(folder.parent.parent, cell.cell_id)
    return cell


def _energy(records: list[RankRecord]) -> tuple[float | None, str | None]:
    values = [r.energy.gpu_j for r in records]
    if any(v is None for v in values):
        reasons = {r.energy.reason or "no energy reading" for r in records}
        return None, "; ".join(sorted(reasons))
    return float(sum(values)), None


def _paper_energy(records: list[RankRecord]) -> float | None:
    """The paper's convention: the rank-0 node's energy times the number of nodes."""
    first_node = next(r.node for r in records if r.rank == 0)
    nodes = {r.node for r in records}
    on_first = [r.energy.gpu_j for r in records if r.node == first_node]
    if any(v is None for v in on_first):
        return None
    return float(sum(on_first)) * len(nodes)


def _energy_sum(records: list[RankRecord], key: str) -> float | None:
    """An energy field summed over ranks; None where any rank has none (no partial sums)."""
    values = [getattr(r.energy, key) for r in records]
    return None if any(v is None for v in values) else float(math.fsum(values))


def _idle_energy(records: list[RankRecord]) -> float:
    """What each GPU would have drawn at rest over its own window of the cell (of each segment's batches,
    at that segment's baseline, where the cell ran in several)."""
    return float(math.fsum(r.energy.idle_gpu_j if r.energy.idle_gpu_j is not None
                           else r.energy.idle_power_w * r.times.total_s for r in records))


def _energy_source(records: list[RankRecord]) -> str:
    sources = sorted({r.energy.source or "none" for r in records})
    return sources[0] if len(sources) == 1 else "mixed: " + ", ".join(sources)


def _cpu_energy(records: list[RankRecord]) -> tuple[float | None, str | None]:
    """RAPL energy over every node of the cell: each node's local rank 0 read it once."""
    readers = {r.node: r for r in records if r.local_rank == 0}
    nodes = sorted({r.node for r in records})
    energy = {n: readers[n].energy if n in readers else Energy() for n in nodes}
    values = [energy[n].cpu_j for n in nodes]
    if all(v is not None for v in values):
        return float(math.fsum(values)), None
    reasons = {energy[n].cpu_reason if n in readers else None for n in nodes}
    return None, "; ".join(sorted(r or "no local rank 0 record" for r in reasons))


def _telemetry(records: list[RankRecord]) -> dict:
    """Tables IV/V: SM utilization averaged over the cell's GPUs, memory peaks over them."""
    def values(key: str) -> list | None:
        found = [getattr(r.telemetry, key) if r.telemetry is not None else None for r in records]
        return None if any(v is None for v in found) else found

    sm, mem, used = values("sm_util_avg_pct"), values("mem_util_max_pct"), values("mem_used_max_pct")
    caps = [r.power_cap.get("enforced_w") for r in records]
    return {
        "sm_util_avg_pct": math.fsum(sm) / len(sm) if sm else None,
        "mem_util_max_pct": max(mem) if mem else None,
        "mem_used_max_pct": max(used) if used else None,
        "power_cap_enforced_w": None if any(c is None for c in caps) else max(caps),
    }


def _energy_columns(records: list[RankRecord], energy_j: float | None) -> dict:
    cpu_j, cpu_reason = _cpu_energy(records)
    return {
        "energy_source": _energy_source(records),
        "prefill_energy_j": _energy_sum(records, "prefill_gpu_j") if energy_j is not None else None,
        "decode_energy_j": _energy_sum(records, "decode_gpu_j") if energy_j is not None else None,
        "cpu_energy_j": cpu_j,
        "cpu_note": f"no CPU energy: {cpu_reason}" if cpu_reason else "",
        **_telemetry(records),
    }


def _answer_columns(first: RankRecord, totals: CellTotals) -> dict:
    """Scored/correct counts, whether responses were saved, and why accuracy is empty if it is."""
    block = first.responses or {}
    if totals.scored == 0:
        note = "accuracy, energy_per_correct_j empty: " + (block.get("score_reason") or "no scored responses")
    elif totals.correct == 0:
        note = "energy_per_correct_j empty: no correct answer in the cell"
    else:
        note = ""
    counts = first.counts
    if counts.unscorable:  # neither right nor wrong: out of accuracy's denominator, and said
        note = "; ".join(filter(None, [note, f"{counts.unscorable} response(s) unscorable: their reference "
                                             "answer has no '#### N' (not counted as wrong)"]))
    return {"scored": totals.scored, "correct": totals.correct, "unscorable": counts.unscorable,
            # how the cell's responses ended (None: a record from before they were counted)
            "ended_eos": counts.ended_eos, "ended_max_gen_len": counts.ended_max_gen_len,
            "ended_max_seq_len": counts.ended_max_seq_len,
            "responses_saved": bool(block.get("saved")), "score_note": note}


def reduce_cell(cell: CellRecords) -> dict:
    """One row of the cells table."""
    records = [with_batch_totals(cell.records[r]) for r in sorted(cell.records)]
    row: dict = {"cell_id": cell.cell_id}
    if not records:
        return row | {"status": "incomplete", "note": "; ".join(cell.problems) or "no records"}
    first = records[0]
    row |= {k: first.params.get(k) for k in PARAM_COLUMNS}
    world = first.world_size
    problems = list(cell.problems)
    missing = sorted(set(range(world)) - set(cell.records))
    if missing:
        problems.append(f"missing rank(s) {missing} of {world}")
    failed = [r for r in records if not r.ok]
    if failed:
        row["status"] = failed[0].status
        row["note"] = "; ".join(f"rank {r.rank}: {r.error or r.status}" for r in failed)
        return row
    if problems:
        return row | {"status": "incomplete", "note": "; ".join(problems)}
    energy_j, reason = _energy(records)
    idle_power_w = _energy_sum(records, "idle_power_w")
    totals = CellTotals(
        total_s=max(r.times.total_s for r in records),
        responses=first.counts.responses,
        output_tokens=first.counts.output_tokens,
        output_words=first.counts.output_words,
        energy_j=energy_j,
        idle_energy_j=_idle_energy(records) if idle_power_w is not None else None,
        scored=first.counts.scored,
        correct=first.counts.correct,
        batches=first.counts.batches,
        positions=first.counts.positions,
        static_energy_j=_energy_sum(records, "static_gpu_j") if energy_j is not None else None,
        dynamic_energy_j=_energy_sum(records, "dynamic_gpu_j") if energy_j is not None else None,
    )
    row |= {"status": STATUS_OK, **compute(totals), "idle_power_w": idle_power_w, **_energy_columns(records, energy_j)}
    restarts = sampling_restarts(first.segments)
    row["sampling_note"] = (f"sampling restarted at batch(es) {restarts} (no stream state saved there): its sampled "
                            "tokens are not an uninterrupted run's") if restarts else ""
    row |= {
        "energy_j": energy_j,
        "energy_j_paper": _paper_energy(records) if energy_j is not None else None,
        "gpus": world,
        "nodes": len({r.node for r in records}),
        "segments": max(len(r.segments or [None]) for r in records),  # job attempts that ran it
        "total_s": totals.total_s,
        "output_tokens": totals.output_tokens,
        "positions": totals.positions,
        "responses": totals.responses,
        "truncated_prompts": first.counts.truncated_prompts,  # cut to dataset.max_prompt_tokens
        "note": f"no energy: {reason}" if reason else "",
        **_answer_columns(first, totals),
    }
    from w2w.analysis import ladder, roof

    return row | ladder.cell_columns(records) | roof.roof_columns(records) | {
        "static_energy_j": totals.static_energy_j, "dynamic_energy_j": totals.dynamic_energy_j}


def _reduce_or_report(cell: CellRecords) -> dict:
    """reduce_cell, or an incomplete row naming what broke: one odd cell never sinks the table."""
    try:
        return reduce_cell(cell)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        note = "; ".join([*cell.problems, f"cannot reduce: {type(exc).__name__}: {exc}"])
        return {"cell_id": cell.cell_id, "status": "incomplete", "note": note}


def _cell_parameters(cell: CellRecords) -> dict | None:
    """Every leaf of the cell's config, from the first of its records that has one."""
    for rank in sorted(cell.records):
        config = cell.records[rank].config
        if isinstance(config, dict):
            return cell_parameters(config)
    return None


def axis_columns(cells: dict[str, CellRecords]) -> dict[str, str]:
    """Column -> dotted key, for each axis that varies across the sweep's cells and that
    PARAM_COLUMNS lacks (num_prompts, seed, temperature, engine, ...): rows never differ in metrics only."""
    params = {cid: p for cid, cell in cells.items() if (p := _cell_parameters(cell)) is not None}
    known = {axis.key for axis in SHOWN_AXES}
    return {label(key): key for key in varying_axes(params.values()) if key not in known and key not in NOT_AXES}


# How many runs a cell has, and which run a record is: not a setting of the result.
NOT_AXES = ("repeats", "repeat", "repeats_auto", "repeats_target_pct", "repeats_min", "repeats_max")
# Numbers of a run's row that describe the cell rather than measure it: no statistics over repeats.
NOT_MEASURED = frozenset({*PARAM_COLUMNS, "gpus", "nodes", "segments", "responses_saved", "repeats_runs",
                          "repeats_target_pct", "repeats_interval_pct"})


def measured_columns(rows: list[dict]) -> list[str]:
    """The columns of the runs' rows that hold a measured number in some run (any metric, present or added later)."""
    columns: dict[str, None] = {}
    for row in rows:
        columns |= {k: None for k, v in row.items() if k not in NOT_MEASURED and is_number(v)}
    return list(columns)


def combine_runs(rows: dict[int, dict], planned: int = 1) -> dict:
    """One row of the cells table from its runs' rows (repeat -> row): each measured column becomes the
    mean over the ok runs, beside its standard deviation (_std), n (_n), Student t half-width (_ci95), median
    and its order-statistics interval, Shapiro-Wilk p, and the interval that fits (_interval, _low, _high:
    analysis.stats.summary_columns).
    `repeats` counts the ok runs; repeat_note names the runs that failed or are missing."""
    good = {k: r for k, r in sorted(rows.items()) if r.get("status") == STATUS_OK}
    missing = sorted(set(range(planned)) - set(rows))
    notes = [f"repeat {k}: {r.get('status')}: {r.get('note')}" for k, r in sorted(rows.items()) if k not in good]
    if missing:
        notes.append(f"repeat(s) {missing} of {planned} not run")
    if not good:
        first = rows[min(rows)]
        return first | {"repeats": 0, "repeat_note": "; ".join(notes) if len(rows) > 1 or missing else ""}
    row = dict(next(iter(good.values())))
    for column in measured_columns(list(good.values())):
        values = [r.get(column) for r in good.values()]
        row |= summary_columns(column, summarize(values))
        if column in COMPARED:  # the runs themselves, for the tests between cells (analysis.stats.difference)
            row[column + RUNS] = json.dumps([v for v in values if is_number(v)])
    return row | {"repeats": len(good), "repeat_note": "; ".join(notes)}


def reduce_repeats(cell: CellRecords) -> dict:
    """The cell's row: each of its runs reduced as a cell of its own, then combined (combine_runs)."""
    runs = {0: cell, **cell.runs} if cell.records or cell.problems or not cell.runs else dict(cell.runs)
    stop = cell.stop
    row = combine_runs({k: _reduce_or_report(run) for k, run in runs.items()}, stop.runs if stop else cell.repeats)
    if stop is None:
        return row
    return row | {"repeats_stopped": stop.stopped, "repeats_runs": stop.runs, "repeats_target_pct": stop.target_pct,
                  "repeats_interval_pct": stop.interval_pct}


def reduce_sweep(sweep_dir: Path) -> pd.DataFrame:
    return reduce_cells(load_cells(sweep_dir))


def reduce_cells(cells: dict[str, CellRecords]) -> pd.DataFrame:
    """The cells table from records load_cells already parsed; table.attrs["axes"] names the extra
    columns of the axes that vary."""
    import pandas as pd
    from w2w.analysis import ladder, selfcheck

    extra = axis_columns(cells)
    rows = []
    for cell in cells.values():
        row = reduce_repeats(cell)
        params = _cell_parameters(cell) or {}
        rows.append(row | {column: params.get(key) for column, key in extra.items()})
    table = pd.DataFrame(rows)
    table = ladder.add_node_columns(table, {cid: {0: list(cell.records.values()),
                                                  **{k: list(run.records.values()) for k, run in cell.runs.items()}}
                                            for cid, cell in cells.items()})
    table = selfcheck.add_flags(table, {cid: list(cell.records.values()) for cid, cell in cells.items()})
    if "engine" in table:  # records of sweeps before the rename: engine=reference was Llama 2's program
        table["engine"] = table["engine"].replace(RENAMED_TO)
    for column in ("cell_id", *PARAM_COLUMNS, *extra, "status", *METRIC_NAMES, "energy_j", *ENERGY_COLUMNS, "gpus",
                   "nodes", "segments", "truncated_prompts", "note",
                   "score_note", "sampling_note", "repeats", "repeat_note"):
        if column not in table:
            table[column] = None
    sort_keys = [c for c in (*(axis.column for axis in SHOWN_AXES if axis.sort), *extra) if table[c].notna().any()]
    table = table.sort_values(sort_keys, kind="stable").reset_index(drop=True) if sort_keys else table
    table.attrs["axes"] = list(extra)
    return table


# The printed table's columns after its axes, the status and n.
TABLE_COLUMNS = [*METRIC_NAMES, "energy_j", "gpus"]


def table_columns(table: pd.DataFrame) -> list[str]:
    """The shown axes (those without Axis.table only where they vary), the sweep's other varying axes,
    the status (and n, where a cell ran repeats), then TABLE_COLUMNS."""
    from w2w.analysis import ladder

    axes = [axis.column for axis in SHOWN_AXES if axis.table or _varies(table, axis.column)]
    cut = [] if _cut_prompts(table).empty else ["truncated_prompts"]  # shown where a prompt was cut
    repeats = ["repeats"] if "repeats" in table and (table["repeats"].fillna(0) > 1).any() else []
    return [*axes, *table.attrs.get("axes", []), "status", *repeats, *TABLE_COLUMNS, *cut, *ladder.TABLE_FLAGS]


def _varies(table: pd.DataFrame, column: str) -> bool:
    """Whether the cells that have settings (records) differ in the column; no setting (None) is a value."""
    if column not in table or "model" not in table:
        return False
    values = table.loc[table["model"].notna(), column]
    return values.dropna().astype(str).nunique() + bool(values.isna().any()) > 1


def _cut_prompts(table: pd.DataFrame) -> pd.DataFrame:
    """The ok cells whose prompts were cut to dataset.max_prompt_tokens."""
    if "truncated_prompts" not in table:
        return table.iloc[0:0]
    import pandas as pd

    counts = pd.to_numeric(table["truncated_prompts"], errors="coerce").fillna(0)
    return table[(table["status"] == STATUS_OK) & (counts > 0)]


def truncation_notes(table: pd.DataFrame) -> list[str]:
    """One note per cell whose prompts were cut: a result measured on shortened prompts says so."""
    return [f"cell {row['cell_id']}: {int(row['truncated_prompts'])} of {int(row['responses'])} prompts cut to "
            "dataset.max_prompt_tokens (BOS and the last N-1 tokens kept): its numbers are for the cut prompts"
            for row in _cut_prompts(table).to_dict("records")]


def write_results(table: pd.DataFrame, sweep_dir: Path) -> Path:
    from w2w.analysis.tables import interval_markdown

    out = sweep_dir / "results"
    write_atomic(out / "cells.csv", table.to_csv(index=False).encode())
    legend = "".join(f"\n{line}\n" for line in interval_legend(table))
    write_atomic(out / "cells.md", (interval_markdown(table, table_columns(table)) + "\n" + legend).encode())
    text = {c: "string" for c in ("note", "energy_source", "cpu_note", "score_note", "repeat_note",
                                  *(c for c in table if c.endswith((INTERVAL, RUNS)) or c == "repeats_stopped"))}
    write_atomic(out / "cells.parquet", table.astype(text).to_parquet(index=False))
    return out


def stop_note(row: dict) -> str:
    """How many runs a repeats=auto cell took, and why it stopped."""
    width = row.get("repeats_interval_pct")
    shown = "none" if not is_number(width) else f"±{width:.2f}%"
    why = "tight" if row["repeats_stopped"] == "tight" else "at the maximum (repeats_max), not tight"
    return (f"cell {row['cell_id']}: repeats=auto took {int(row['repeats_runs'])} runs and stopped {why} "
            f"(energy_per_token_j 95% interval {shown}, target ±{row['repeats_target_pct']:g}%)")


def interval_legend(table: pd.DataFrame) -> list[str]:
    """What the table's intervals are, where a cell ran repeats."""
    from w2w.analysis.tables import INTERVAL_LEGEND

    kinds = [c for c in table if c.endswith(INTERVAL)]
    return [INTERVAL_LEGEND] if any(table[c].notna().any() for c in kinds) else []


def summary_notes(table: pd.DataFrame) -> list[str]:
    from w2w.analysis import ladder

    notes = []
    for _, row in table.iterrows():
        if row["status"] != STATUS_OK:
            notes.append(f"cell {row['cell_id']}: {row['status']}: {row['note']}")
    energy_reasons = {row["note"] for _, row in table.iterrows() if row["status"] == STATUS_OK and row["note"]}
    notes.extend(f"energy columns empty: {reason.removeprefix('no energy: ')}" for reason in sorted(energy_reasons))
    cpu_reasons = {row["cpu_note"] for _, row in table.iterrows() if row["status"] == STATUS_OK and row["cpu_note"]}
    notes.extend(f"cpu_energy_j empty: {reason.removeprefix('no CPU energy: ')}" for reason in sorted(cpu_reasons))
    notes.extend(f"cell {row['cell_id']}: {row['repeat_note']}" for _, row in table.iterrows()
                 if row["status"] == STATUS_OK and isinstance(row.get("repeat_note"), str) and row["repeat_note"])
    notes.extend(stop_note(row) for row in table.to_dict("records") if isinstance(row.get("repeats_stopped"), str))
    score_reasons = {row["score_note"] for _, row in table.iterrows() if row["status"] == STATUS_OK and row["score_note"]}
    notes.extend(f"answers: {reason}" for reason in sorted(score_reasons))
    notes.extend(f"cell {row['cell_id']}: {row['sampling_note']}" for _, row in table.iterrows()
                 if isinstance(row.get("sampling_note"), str) and row["sampling_note"])
    notes.extend(ladder.notes(table))
    return notes + truncation_notes(table)


def plot_timeline(sweep_dir: Path, cell: str) -> Path:
    """results/timeline_<cell>.png: the GPU power of every rank of one cell (a unique id prefix will do)."""
    from w2w.analysis.figures import save, timeline_figure, timeline_frames

    folders = [d for d in (sweep_dir / "cells").glob(f"{cell}*") if d.is_dir()]
    if len(folders) != 1:
        found = ", ".join(d.name for d in folders) or "none"
        raise ReduceError(f"--plot-timeline {cell}: {len(folders)} cells match ({found}): give one cell id")
    files = sorted(folders[0].glob("rank-*.timeline.parquet"))
    if not files:
        raise ReduceError(
            f"cell {folders[0].name} has no timeline files: its ranks had no GPU meter or ran with energy.sampler=false"
        )
    first = _load_cell(folders[0]).records.get(0)  # its phases are shaded where rank 0's record reads
    rendered = timeline_figure(folders[0].name, timeline_frames(files), f"{len(files)} rank file(s)", first)
    return save(rendered, sweep_dir / "results")


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2w-reduce", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory (holds cells/)")
    parser.add_argument("--plot-timeline", metavar="CELL_ID", action="append", default=[],
                        help="also write results/timeline_<cell>.png: GPU power of every rank over the cell")
    parser.add_argument("--require-complete", action="store_true",
                        help="exit 1 if a planned cell (manifest.json) is missing, failed or still running")
    args = parser.parse_args(argv)
    if not (args.sweep_dir / "cells").is_dir() and not (args.sweep_dir / MANIFEST).is_file():
        print(f"w2w-reduce: error: {args.sweep_dir} has no cells/ folder: give the sweep_dir of a run", file=sys.stderr)
        return 2
    try:
        complete = completeness(args.sweep_dir)
    except ManifestError as exc:
        print(f"w2w-reduce: error: {exc}", file=sys.stderr)
        return 2
    table = reduce_sweep(args.sweep_dir)
    out = None
    try:
        problem = writable_problem(args.sweep_dir / "results")
        out = write_results(table, args.sweep_dir) if problem is None else None
    except OSError as exc:  # what the probe cannot foresee (a full disk)
        problem = f"{exc.strerror or exc} ({exc.filename or args.sweep_dir})"
    if out is None:
        print(f"w2w-reduce: error: cannot write the results: {problem}: make {args.sweep_dir / 'results'} a "
              "folder you can write, or reduce a copy of the sweep", file=sys.stderr)
        return 2
    from w2w.analysis.tables import interval_markdown

    print(interval_markdown(table, table_columns(table)))
    for line in interval_legend(table):
        print(line)
    for note in summary_notes(table):
        print(note)
    if (table["status"] == STATUS_OK).any():
        from w2w.analysis.figures import overview_figure, save

        print(f"figure: {save(overview_figure(table), out)}")
    print(f"{len(table)} cells ({(table['status'] == STATUS_OK).sum()} ok); results in {out}/")
    for cell in args.plot_timeline:
        try:
            print(f"power timeline: {plot_timeline(args.sweep_dir, cell)}")
        except ReduceError as exc:
            print(f"w2w-reduce: error: {exc}", file=sys.stderr)
            return 2
    if complete is not None and not complete.complete:
        print(f"w2w-reduce: warning: {complete.warning()}", file=sys.stderr)
    manifest = load_manifest(args.sweep_dir) if (args.sweep_dir / MANIFEST).is_file() else None
    for line in sweep_problems(args.sweep_dir, manifest):
        print(f"w2w-reduce: warning: {line}", file=sys.stderr)
    unfinished = not (table["status"] == STATUS_OK).all() if complete is None else not complete.complete
    return 1 if args.require_complete and unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
