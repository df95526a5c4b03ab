"""The report's page: each section a function that returns its lines; render writes every file."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from w2w.analysis import figures, ladder, paper, pareto, repeats, roof, selfcheck, serving, tables
from w2w.analysis.compare import comparison, read_facts
from w2w.analysis.reduce import load_cells, reduce_cells, summary_notes
from w2w.launch.status import completeness, sweep_problems

from w2w.cell import SHOWN_AXES
from w2w.engines import ENGINES
from w2w.files import write_atomic
from w2w.manifest import MANIFEST, Manifest, read_manifest
from w2w.records import RankRecord, read_record
from w2w.schema import RecordError


def read_skipped(manifest: Manifest | Path) -> pd.DataFrame:
    """Cells the planner skipped (fit estimate) as rows with status 'skipped', from the sweep manifest
    (given, or read from a sweep directory: ManifestError if it does not parse or is newer)."""
    if isinstance(manifest, Path):
        manifest = read_manifest(manifest / MANIFEST)
    rows = []
    for cid, entry in manifest.cells.items():
        if entry.skip_reason:
            setting = {axis.column: entry.params.get(axis.key) for axis in SHOWN_AXES}
            rows.append({"cell_id": cid, **setting, "status": "skipped", "note": entry.skip_reason})
    return pd.DataFrame(rows)


def energy_conventions(cells: pd.DataFrame) -> pd.DataFrame:
    """Per ok cell: every GPU summed beside the paper's rank-0 node x nodes, and their ratio."""
    done = tables.ok(cells)
    frame = done[["cell_id", "model", "gpu", "gpus", "nodes", "dataset", "batch_size", "max_gen_len", "power_cap_w",
                  "energy_j", "energy_j_paper"]].copy()
    frame["model"] = frame["model"].map(lambda m: tables.show("model", m))
    frame["paper / all GPUs"] = [b / a if not (tables.is_missing(a) or tables.is_missing(b)) and a else None
                                 for a, b in zip(frame["energy_j"], frame["energy_j_paper"], strict=True)]
    names = {"energy_j": "energy, all GPUs (J)", "energy_j_paper": "energy, rank-0 node x nodes (J)"}
    return frame.rename(columns=names)


# Every setting of a cell but its engine; cells that differ only in engine measure what it costs.
ENGINE_SETTING = tuple(axis.column for axis in SHOWN_AXES if axis.column != "engine")


# The quantities of the costs table: (column suffix, metric); per returned token (the paper's) and per
# computed position (the work, whatever EOS said).
COST_QUANTITIES = (("tokens/s", "tokens_per_s"), ("J/token", "energy_per_token_j"),
                   ("J/position", "energy_per_position_j"))


def _engine_means(by_engine: dict[str, pd.DataFrame], engine: str) -> dict[str, float | None]:
    """One engine's mean of each cost quantity in a setting; None where it was not measured."""
    group = by_engine.get(engine)
    out = {}
    for quantity, column in COST_QUANTITIES:
        mean = group[column].astype(float).mean() if group is not None and column in group else None
        out[f"{engine} {quantity}"] = None if mean is None or pd.isna(mean) else mean
    return out


def implementation_costs(cells: pd.DataFrame) -> pd.DataFrame:
    """tokens/s, J per returned token and J per computed position of every engine of the registry, for
    each setting measured (ok) under two engines or more; empty where an engine did not run it."""
    done = tables.ok(cells)
    if done.empty or "engine" not in done:
        return pd.DataFrame()
    rows = []
    for setting, group in done.groupby(list(ENGINE_SETTING), dropna=False, sort=True):
        by_engine = {e: g for e, g in group.groupby("engine") if e in ENGINES}
        if len(by_engine) < 2:  # one engine: nothing to compare
            continue
        row = {k: tables.show(k, v) for k, v in zip(ENGINE_SETTING, setting, strict=True)}
        for engine in ENGINES:
            row |= _engine_means(by_engine, engine)
        rows.append(row)
    return pd.DataFrame(rows)


# -- the page -------------------------------------------------------------------------------------


def frame_markdown(frame: pd.DataFrame) -> str:
    return tables.markdown(frame) + "\n"


class NoOkCellError(Exception):
    """The sweep has no ok cell yet: there is nothing to report (unfinished work, not bad input)."""


def check_some_ok(sweep: Path, cells: pd.DataFrame) -> None:
    """NoOkCellError naming the cells' states and where to see why, where no cell has finished ok."""
    if not tables.ok(cells).empty:
        return
    states = ", ".join(f"{int(n)} {s}" for s, n in cells["status"].value_counts().items()) if len(cells) else "none"
    # w2w-status names each planned cell's state and its job's failure; without a manifest, w2w-reduce lists the records.
    follow = "w2w-status" if (sweep / MANIFEST).is_file() else "w2w-reduce"
    raise NoOkCellError(
        f"{sweep} has no ok cell yet (cell records: {states}): a report needs at least one finished cell; "
        f"see why with: {shlex.join([follow, str(sweep)])}, and run w2w-report again once a cell is done"
    )

@dataclass
class Report:
    """What render wrote, and what w2w-report prints."""

    files: list[Path]
    notes: list[str]
    incomplete: str | None  # how many planned cells have no result, from the manifest
    recommendation: list[str]


def _write(path: Path, text: str) -> Path:
    write_atomic(path, text.encode())
    return path


def _timelines(sweep: Path, cells: pd.DataFrame, out: Path, limit: int | None) -> tuple[list[Path], list[str]]:
    """Each ok cell's power timeline figure (at most `limit`), and the notes on those not drawn."""
    written: list[Path] = []
    notes = []
    for row in tables.ok(cells).to_dict("records"):
        paths = sorted((sweep / "cells" / row["cell_id"]).glob("rank-*.timeline.parquet"))
        if not paths:
            continue
        if limit is not None and len(written) >= limit:
            notes.append(f"power timelines: only the first {limit} cells drawn (--max-timelines)")
            break
        caption = ", ".join(f"{k}={tables.show(k, row[k])}" for k in
                            ("model", "gpu", "shards", "dataset", "batch_size", "max_gen_len", "power_cap_w"))
        rendered = figures.timeline_figure(row["cell_id"], figures.timeline_frames(paths), caption,
                                           _rank0(sweep / "cells" / row["cell_id"]))
        written.append(figures.save(rendered, out))
    if not written:
        notes.append("power timelines: no ok cell has timeline files (no GPU meter, or energy.sampler=false)")
    return written, notes


def _rank0(folder: Path) -> RankRecord | None:
    """Rank 0's record of a cell's first run, for the phases of its timeline; None where unreadable."""
    try:
        return read_record(folder / "rank-00000.json")
    except (OSError, RecordError):
        return None


@dataclass
class ParetoResult:
    """What the 'Which configuration to run' section shows: its figure, frontier and recommendation."""

    figure: figures.Rendered
    figure_path: Path
    frontier: pd.DataFrame | None  # None: no frontier (pareto.missing_reason)
    recommendation: pareto.Recommendation


def render(sweep: Path, out: Path, max_timelines: int | None = None, target: pareto.Target | None = None) -> Report:
    """Every table, figure and comparison of the paper from the sweep's records, under `out`."""
    manifest = read_manifest(sweep / MANIFEST)  # parsed once, for the completeness and the skipped cells
    complete = completeness(sweep, manifest)
    incomplete = None if complete is None or complete.complete else complete.warning()
    loaded = load_cells(sweep, manifest)  # every rank file parsed once, for the table and the facts
    cells = reduce_cells(loaded)
    check_some_ok(sweep, cells)
    skipped = read_skipped(manifest)
    notes = [*summary_notes(cells), *sweep_problems(sweep, manifest if (sweep / MANIFEST).is_file() else None)]
    rendered_tables = tables.all_tables(cells[cells["model"].notna()], skipped)
    files = [path for table in rendered_tables for path in tables.write_table(table, out / "tables")]
    rendered_figures = figures.all_figures(cells)
    figure_files = [figures.save(r, out / "figures") for r in rendered_figures]
    timelines, timeline_notes = _timelines(sweep, cells, out / "figures" / "timelines", max_timelines)
    notes += timeline_notes
    compared = comparison(cells, skipped, read_facts(loaded))
    energy = energy_conventions(cells)
    costs = implementation_costs(cells)
    spread = repeats.spread_table(cells)
    data = {"comparison.csv": compared.to_csv(index=False), "comparison.md": frame_markdown(compared),
            "energy_conventions.csv": energy.to_csv(index=False), "energy_conventions.md": frame_markdown(energy),
            "implementation_costs.csv": costs.to_csv(index=False),
            "implementation_costs.md": frame_markdown(costs) if not costs.empty else "",
            "repeats.csv": spread.to_csv(index=False),
            "energy_boundaries.csv": ladder.boundaries_frame(cells).to_csv(index=False)}
    files += [*figure_files, *timelines, *(_write(out / name, text) for name, text in data.items())]
    chosen = _pareto(cells, out, target or pareto.Target())
    files += [chosen.figure_path]
    if chosen.frontier is not None:
        files.append(_write(out / "pareto.csv", chosen.frontier.to_csv(index=False)))
    sections = [
        header_section(sweep, cells, incomplete),
        notes_section(notes),
        comparison_section(compared),
        energy_section(energy),
        tables_section(rendered_tables),
        figures_section(rendered_figures, figure_files, out),
        timelines_section(timelines, out),
        costs_section(costs),
        repeats.repeats_lines(cells, frame_markdown(spread) if not spread.empty else ""),
        ladder.report_sections(cells),
        selfcheck.report_section(cells),
        roof.dvfs_section(cells),
        pareto_section(chosen, out),
        serving.report_lines(sweep, out),  # scenario=serving cells: the time-energy frontier (none: no lines)
    ]
    files.append(_write(out / "report.md", "".join(line + "\n" for section in sections for line in section)))
    return Report(files, notes, incomplete, chosen.recommendation.lines)


def _pareto(cells: pd.DataFrame, out: Path, target: pareto.Target) -> ParetoResult:
    """The Pareto figure (saved under out/figures), the frontier where there is one, and the recommendation."""
    rendered = pareto.pareto_figure(cells)
    front = pareto.frontier_table(cells) if pareto.missing_reason(cells) is None else None
    return ParetoResult(rendered, figures.save(rendered, out / "figures"), front, pareto.recommend(cells, target))


def header_section(sweep: Path, cells: pd.DataFrame, incomplete: str | None) -> list[str]:
    """The title, a warning where planned cells have no result, and what the page holds."""
    counts = cells["status"].value_counts()
    status = ", ".join(f"{int(n)} {s}" for s, n in counts.items()) or "none"
    warning = ["", f"**Warning: {incomplete}.** The tables and figures below hold only the cells that finished."]
    return [f"# The paper's tables and figures from `{sweep}`", *(warning if incomplete else []), "",
            f"Reproducing {paper.CITATION}. Cells: {len(cells)} ({status}). Empty entries were not measured "
            "in this sweep: nothing here is estimated or copied from the paper except in the 'paper' columns.", ""]


def notes_section(notes: list[str]) -> list[str]:
    return ["## Notes", "", *[f"- {n}" for n in notes], ""] if notes else []


def comparison_section(compared: pd.DataFrame) -> list[str]:
    return ["## Comparison with the published numbers", "",
            "ours / paper where both are single numbers; a range is compared by where ours falls. "
            "Only cells in the paper's own configuration are compared.", "", frame_markdown(compared)]


def energy_section(energy: pd.DataFrame) -> list[str]:
    lines = ["## Energy: the paper's convention beside every GPU summed", "",
             "The paper measured the rank-0 node (DCGM) and multiplied by the number of nodes; we measure every "
             "GPU. Figures and tables use every GPU summed.", ""]
    lines += [frame_markdown(energy) if not energy.empty else "No ok cells.\n"]
    if not energy.empty and energy["energy, all GPUs (J)"].isna().all():
        lines += ["No cell has an energy reading: the Notes above say why.", ""]
    return lines


def tables_section(rendered_tables: list[tables.Table]) -> list[str]:
    lines = ["## Tables", "", "Energy per token, in the figures and the findings, is energy_per_token_j: per returned "
             "token (after the EOS cut), as the paper counts; Tables III-V give energy per cell (energy_j) and "
             "tokens/s of returned tokens. Energy per computed position (energy_per_position_j) is in the "
             "implementation costs below.", ""]
    for table in rendered_tables:
        lines += [tables.to_markdown(table), f"Files: `tables/{table.name}.md`, `.csv`, `.tex`", ""]
    return lines


def figures_section(rendered_figures: list[figures.Rendered], files: list[Path], out: Path) -> list[str]:
    lines = ["## Figures", ""]
    for rendered, path in zip(rendered_figures, files, strict=True):
        lines += [f"### {rendered.title}", "", f"![{rendered.name}]({path.relative_to(out).as_posix()})", ""]
        lines += [f"- {n}" for n in rendered.notes] + ([""] if rendered.notes else [])
    return lines


def timelines_section(timelines: list[Path], out: Path) -> list[str]:
    links = [f"- [{p.stem}]({p.relative_to(out).as_posix()})" for p in timelines]
    return ["## Power timelines (one per cell)", "", *(links or ["None."])]


def costs_section(costs: pd.DataFrame) -> list[str]:
    engines = ", ".join(f"`{name}` ({text})" for name, text in ENGINES.items())
    lines = ["", "## What the implementation costs", "",
             f"The same cell setting under each generation engine: {engines}. The difference is the "
             "implementation's, not the model's. J/token is per returned token (after the EOS cut, the paper's "
             "energy_per_token_j); J/position is per computed position (every row of every forward call, prompt "
             "rows and rows past EOS included: energy_per_position_j), empty for records without positions.", ""]
    if costs.empty:
        return [*lines, f"No setting was measured under two engines or more: sweep with `engine={','.join(ENGINES)}`.",
                ""]
    return [*lines, frame_markdown(costs)]


def pareto_section(chosen: ParetoResult, out: Path) -> list[str]:
    """The page's 'Which configuration to run' section."""
    lines = ["## Which configuration to run", "",
             "Pareto frontier: the cells no other cell beats on both energy (lower) and speed. Energy per "
             "correct answer is drawn where responses were scored (GSM8K).", ""]
    lines += [f"![{chosen.figure.name}]({chosen.figure_path.relative_to(out).as_posix()})", ""]
    lines += [f"- {n}" for n in chosen.figure.notes] + [""]
    if chosen.frontier is not None:
        lines += [frame_markdown(chosen.frontier)]
    return [*lines, "### Recommendation", "", *chosen.recommendation.lines, ""]
