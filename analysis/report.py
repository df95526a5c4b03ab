"""w2w-report: the paper's tables, figures and a comparison with its published numbers, from a finished sweep."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from w2w.analysis import figures, ladder, paper, pareto, repeats, tables
from w2w.analysis.reduce import CellRecords, load_cells, reduce_cells, summary_notes
from w2w.launch.status import completeness, sweep_problems

from w2w.engines import ENGINES
from w2w.exits import quiet_on_broken_pipe
from w2w.files import writable_problem, write_atomic
from w2w.manifest import MANIFEST, Manifest, ManifestError, read_manifest
from w2w.schema import RecordError

# ours/paper needs a point on both sides; a range is compared by where ours falls in it.
Span = tuple[float, float]


@dataclass
class SweepFacts:
    """What the cells table does not hold: the hardware each cell ran on, and its run settings."""

    hardware: dict[str, str] = field(default_factory=dict)  # cell id -> "4 x NVIDIA A100-SXM4-80GB on 1 node"
    params: dict[str, dict] = field(default_factory=dict)  # cell id -> a record's params


def read_facts(cells: Path | dict[str, CellRecords]) -> SweepFacts:
    """Facts from the records load_cells parsed (unreadable ones are the reducer's to report);
    given a sweep directory, its records are loaded first."""
    if isinstance(cells, Path):
        cells = load_cells(cells)
    facts = SweepFacts()
    for cid, cell in cells.items():
        records = [cell.records[rank] for rank in sorted(cell.records)]
        if not records:
            continue
        names = {str(r.gpu.get("gpu_name") or r.device or "unknown device") for r in records}
        nodes = {str(r.node) for r in records}
        facts.params[cid] = records[0].params
        facts.hardware[cid] = f"{len(records)} x {' + '.join(sorted(names))} on {len(nodes)} node(s)"
    return facts


def read_skipped(manifest: Manifest | Path) -> pd.DataFrame:
    """Cells the planner skipped (fit estimate) as rows with status 'skipped', from the sweep manifest
    (given, or read from a sweep directory: ManifestError if it does not parse or is newer)."""
    if isinstance(manifest, Path):
        manifest = read_manifest(manifest / MANIFEST)
    rows = []
    for cid, entry in manifest.cells.items():
        if entry.skip_reason:
            p = entry.params
            rows.append({"cell_id": cid, "model": p.get("model.name"), "gpu": p.get("gpu.name"),
                         "dataset": p.get("dataset.name"), "shards": p.get("shards"), "precision": p.get("precision"),
                         "engine": p.get("engine"),
                         "batch_size": p.get("batch_size"), "max_gen_len": p.get("max_gen_len"),
                         "power_cap_w": p.get("power_cap_w"), "status": "skipped", "note": entry.skip_reason})
    return pd.DataFrame(rows)


# -- comparison with the published numbers -------------------------------------------------------


@dataclass
class Comparison:
    artifact: str
    quantity: str
    setting: str
    paper: str
    paper_hardware: str
    ours: str
    our_hardware: str
    ratio: str  # ours / paper where both are points
    note: str = ""


def _num(value: float) -> str:
    return f"{value:.4g}"


def _span_text(span: Span | None) -> str:
    if span is None:
        return ""
    return _num(span[0]) if span[0] == span[1] else f"{_num(span[0])} to {_num(span[1])}"


def _span(values: list[float | None]) -> Span | None:
    found = [v for v in values if not tables.is_missing(v)]
    return (min(found), max(found)) if found else None


def compare(artifact: str, quantity: str, setting: str, published: Span, paper_hw: str,
            ours: Span | None, our_hw: str, note: str = "") -> Comparison:
    ratio, check = "", ""
    if ours is not None and published[0] == published[1] and ours[0] == ours[1] and published[0] != 0:
        ratio = f"{ours[0] / published[0]:.3g}"
    elif ours is not None and published[0] != published[1]:
        inside = published[0] <= ours[0] and ours[1] <= published[1]
        overlaps = ours[0] <= published[1] and published[0] <= ours[1]
        where = "inside" if inside else "overlaps" if overlaps else "outside"
        check = f"{where} the paper's range"
    if ours is None:
        note = "; ".join(n for n in ("not measured in this sweep", note) if n)
    return Comparison(artifact, quantity, setting, _span_text(published), paper_hw, _span_text(ours), our_hw, ratio,
                      "; ".join(n for n in (check, note) if n))


# Settings a comparison may differ in, with a note: a site that forbids setting power limits runs
# at the GPU's own limit, and its numbers are still the closest to the paper's there are.
SOFT_KEYS = ("power_cap_w",)


def _hardware(cells: pd.DataFrame, facts: SweepFacts) -> str:
    return "; ".join(sorted({facts.hardware.get(c, "") for c in cells["cell_id"]} - {""}))


def _cap_note(cells: pd.DataFrame) -> str:
    caps = sorted({tables.show("power_cap_w", c) for c in cells.get("power_cap_w", pd.Series(dtype=float))})
    paper_cap = tables.show("power_cap_w", paper.DEFAULT_CAP_W)
    return f"ours at power cap {', '.join(caps)} (the paper's: {paper_cap})" if caps and caps != [paper_cap] else ""


def _exact(choice: tables.Choice) -> pd.DataFrame:
    """Only the paper's own configuration is compared (but for SOFT_KEYS, which _cap_note reports):
    a stand-in model, GPU, batch or length is shown in the figures, never here."""
    hard = [k for k in choice.substituted if k not in SOFT_KEYS]
    return choice.cells if not hard else choice.cells.iloc[0:0]


def settings_rows(facts: SweepFacts) -> list[Comparison]:
    rows = []
    for s in paper.SETTINGS:
        values = sorted({p.get(s.param) for p in facts.params.values() if p.get(s.param) is not None})
        ours = (float(values[0]), float(values[0])) if len(values) == 1 else None
        note = f"this sweep mixes {values}" if len(values) > 1 else ""
        rows.append(compare("Setup", s.name, "every cell", (s.value, s.value), "", ours, "", note))
    return rows


def table2_rows(cells: pd.DataFrame, skipped: pd.DataFrame, facts: SweepFacts) -> list[Comparison]:
    found, _ = tables.table2_found(cells[cells["model"].notna()], skipped)
    exact = not tables.choose(cells, {"max_gen_len": paper.TABLE2_MAX_GEN_LEN}).notes
    rows = []
    for ref in paper.TABLE2:
        hit = next((f for f in found if f.model == ref.model and f.gpu == ref.gpu), None) if exact else None
        at = (cells["model"] == ref.model) & (cells["gpu"] == ref.gpu) & (cells["shards"] == (hit.gpus if hit else -1))
        mine = cells[at]
        hw = _hardware(tables.ok(mine), facts)
        setting = f"{tables.show('model', ref.model)}, max length {paper.TABLE2_MAX_GEN_LEN}"
        for quantity, published, ours in (("minimum GPUs", ref.gpus, hit.gpus if hit else None),
                                           ("max batch", ref.max_batch, hit.max_batch if hit else None)):
            rows.append(compare("Table II", f"{ref.gpu.upper()} {quantity}", setting, (published, published),
                                paper.HARDWARE[ref.gpu], None if ours is None else (ours, ours), hw, ref.note))
    return rows


def table3_rows(cells: pd.DataFrame, facts: SweepFacts) -> list[Comparison]:
    t3 = tables.table3_values(cells)
    exact = not t3.choice.notes
    rows = []
    for length, published in paper.TABLE3.items():
        at = t3.choice.cells[t3.choice.cells["max_gen_len"] == length] if exact else t3.choice.cells.iloc[0:0]
        for (quantity, cap), value in published.items():
            ours = t3.values.get(length, {}).get((quantity, cap)) if exact else None
            rows.append(compare("Table III", f"{tables.TABLE3_LABELS[quantity]} change @{cap:g} W (%)",
                                f"65B, 4 A100, GSM8K, batch 64, max length {length}", (value, value),
                                "4 x " + paper.HARDWARE["a100"], _span([ours]), _hardware(at, facts)))
    return rows


def utilization_rows(cells: pd.DataFrame, facts: SweepFacts) -> list[Comparison]:
    rows = []
    for artifact, prefer, axis, published, gpu in (
        ("Table IV", paper.TABLE4_SETUP, "max_gen_len", paper.TABLE4, "a100"),
        ("Table V", paper.TABLE5_SETUP, "shards", paper.TABLE5, "v100"),
    ):
        _, choice, _ = tables.utilization(cells, prefer, axis)
        chosen = _exact(choice)
        for key, (mem, sm) in published.items():
            at = chosen[chosen[axis] == key]
            where = f"max length {key}" if axis == "max_gen_len" else f"{key} GPUs"
            for quantity, column, value in (("max GPU memory util (%)", "mem_util_max_pct", mem),
                                            ("avg SM util (%)", "sm_util_avg_pct", sm)):
                ours = tables.mean_of(at, column) if not at.empty else None
                rows.append(compare(artifact, quantity, f"65B, batch 64, {where}", (value, value),
                                    paper.HARDWARE[gpu], _span([ours]), _hardware(at, facts), _cap_note(at)))
    return rows


def _fig2_cells(cells: pd.DataFrame) -> pd.DataFrame:
    return figures.min_gpus(_exact(tables.choose(tables.ok(cells), figures.FIG2_PREFER)))


def _speedup(cells: pd.DataFrame, model: str) -> tuple[Span | None, pd.DataFrame]:
    mine = _fig2_cells(cells)
    mine = mine[mine["model"] == model]
    a100, v100 = (tables.mean_of(mine[mine["gpu"] == g], "tokens_per_s") for g in ("a100", "v100"))
    ratio = a100 / v100 if a100 is not None and v100 else None
    return _span([ratio]), mine


def _figs_4_9_cells(cells: pd.DataFrame, length: int) -> pd.DataFrame:
    prefer = figures.FIGS_4_9_PREFER | {"max_gen_len": length}
    return _exact(tables.choose(tables.ok(cells), prefer))


def _watts_8_to_32(cells: pd.DataFrame) -> tuple[Span | None, pd.DataFrame]:
    diffs, used = [], []
    for length in figures.FIGS_4_9_LENGTHS:
        mine = _figs_4_9_cells(cells, length)
        for _, group in mine.groupby(["dataset", "batch_size"]):
            low, high = (tables.mean_of(group[group["shards"] == s], "energy_per_s_w") for s in (8, 32))
            if low is not None and high is not None:
                diffs.append(high - low)
                used.append(group[group["shards"].isin([8, 32])])
    return _span(diffs), pd.concat(used) if used else cells.iloc[0:0]


def _mean_cap(t3: tables.Table3, quantity: str, cap: float) -> float | None:
    values = [row.get((quantity, cap)) for row in t3.values.values()]
    return math.fsum(values) / len(values) if values and all(v is not None for v in values) else None


def finding_rows(cells: pd.DataFrame, facts: SweepFacts) -> list[Comparison]:
    t3 = tables.table3_values(cells)
    t3_exact = not t3.choice.notes
    t3_cells = t3.choice.cells if t3_exact else cells.iloc[0:0]
    util = pd.concat([_exact(tables.utilization(cells, p, a)[1]) for p, a in
                      ((paper.TABLE4_SETUP, "max_gen_len"), (paper.TABLE5_SETUP, "shards"))])
    len512 = _figs_4_9_cells(cells, 512)
    ours: dict[str, tuple[Span | None, pd.DataFrame]] = {
        "a100_speedup_7b": _speedup(cells, "llama_7b"),
        "a100_speedup_13b": _speedup(cells, "llama_13b"),
        "watts_8_to_32": _watts_8_to_32(cells),
        "j_per_token_65b_512": (_span(list(len512["energy_per_token_j"])), len512),
        "cap175_time": (_span([_mean_cap(t3, "time", 175.0)]) if t3_exact else None, t3_cells),
        "cap175_energy": (_span([_mean_cap(t3, "energy", 175.0)]) if t3_exact else None, t3_cells),
        "cap150_time": (_span([_mean_cap(t3, "time", 150.0)]) if t3_exact else None, t3_cells),
        "memory_util": (_span(list(util["mem_util_max_pct"])), util),
    }
    rows = []
    for f in paper.FINDINGS:
        span, used = ours[f.key]
        note = "" if f.key.startswith("cap") else _cap_note(used)  # the cap findings are about caps
        rows.append(compare("Finding", f"{f.claim} ({f.unit})", "as the paper states it", (f.low, f.high),
                            f.hardware, span, _hardware(used, facts), note))
    for cap, changes in paper.RELATED_CAPS.items():
        for quantity, value in changes.items():
            mine = _mean_cap(t3, quantity, cap) if t3_exact and cap in t3.caps else None
            note = "" if mine is not None else f"no {cap:g} W cells in our Table III"
            rows.append(compare(paper.RELATED_SOURCE, f"{quantity} change @{cap:g} W vs 250 W (%)",
                                "their setup; ours: Table III mean over lengths", (value, value),
                                paper.RELATED_HARDWARE, _span([mine]), _hardware(t3_cells, facts), note))
    return rows


def comparison(cells: pd.DataFrame, skipped: pd.DataFrame, facts: SweepFacts) -> pd.DataFrame:
    rows = [*settings_rows(facts), *table2_rows(cells, skipped, facts), *table3_rows(cells, facts),
            *utilization_rows(cells, facts), *finding_rows(cells, facts)]
    return pd.DataFrame([asdict(r) for r in rows])


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
ENGINE_SETTING = ("model", "gpu", "dataset", "shards", "precision", "batch_size", "max_gen_len", "power_cap_w")


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
    out: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    incomplete: str | None = None  # how many planned cells have no result, from the manifest
    recommendation: list[str] = field(default_factory=list)


def _write(report: Report, path: Path, text: str) -> None:
    write_atomic(path, text.encode())
    report.files.append(path)


def _timelines(sweep: Path, cells: pd.DataFrame, out: Path, limit: int | None, report: Report) -> list[Path]:
    written = []
    done = tables.ok(cells)
    for row in done.to_dict("records"):
        paths = sorted((sweep / "cells" / row["cell_id"]).glob("rank-*.timeline.parquet"))
        if not paths:
            continue
        if limit is not None and len(written) >= limit:
            report.notes.append(f"power timelines: only the first {limit} cells drawn (--max-timelines)")
            break
        caption = ", ".join(f"{k}={tables.show(k, row[k])}" for k in
                            ("model", "gpu", "shards", "dataset", "batch_size", "max_gen_len", "power_cap_w"))
        rendered = figures.timeline_figure(row["cell_id"], figures.timeline_frames(paths), caption)
        written.append(figures.save(rendered, out))
    if not written:
        report.notes.append("power timelines: no ok cell has timeline files (no GPU meter, or energy.sampler=false)")
    return written


def pareto_section(cells: pd.DataFrame, out: Path, target: pareto.Target, report: Report) -> list[str]:
    """The page's 'Which configuration to run' section; writes its figure and frontier table."""
    lines = ["## Which configuration to run", "",
             "Pareto frontier: the cells no other cell beats on both energy (lower) and speed. Energy per "
             "correct answer is drawn where responses were scored (GSM8K).", ""]
    reason = pareto.missing_reason(cells)
    rendered = pareto.pareto_figure(cells)
    path = figures.save(rendered, out / "figures")
    report.files.append(path)
    lines += [f"![{rendered.name}]({path.relative_to(out).as_posix()})", ""]
    lines += [f"- {n}" for n in rendered.notes] + [""]
    if reason is None:
        front = pareto.frontier_table(cells)
        _write(report, out / "pareto.csv", front.to_csv(index=False))
        lines += [frame_markdown(front)]
    rec = pareto.recommend(cells, target)
    report.recommendation = rec.lines
    lines += ["### Recommendation", "", *rec.lines, ""]
    return lines


def render(sweep: Path, out: Path, max_timelines: int | None = None, target: pareto.Target | None = None) -> Report:
    """Every table, figure and comparison of the paper from the sweep's records, under `out`."""
    report = Report(out)
    manifest = read_manifest(sweep / MANIFEST)  # parsed once, for the completeness and the skipped cells
    complete = completeness(sweep, manifest)
    report.incomplete = None if complete is None or complete.complete else complete.warning()
    loaded = load_cells(sweep)  # every rank file parsed once, for the table and the facts
    cells = reduce_cells(loaded)
    check_some_ok(sweep, cells)
    skipped = read_skipped(manifest)
    facts = read_facts(loaded)
    report.notes += summary_notes(cells)
    report.notes += sweep_problems(sweep, manifest if (sweep / MANIFEST).is_file() else None)
    rendered_tables = tables.all_tables(cells[cells["model"].notna()], skipped)
    for table in rendered_tables:
        report.files += tables.write_table(table, out / "tables")
    rendered_figures = figures.all_figures(cells)
    figure_files = [figures.save(r, out / "figures") for r in rendered_figures]
    report.files += figure_files
    timelines = _timelines(sweep, cells, out / "figures" / "timelines", max_timelines, report)
    report.files += timelines
    compared = comparison(cells, skipped, facts)
    _write(report, out / "comparison.csv", compared.to_csv(index=False))
    _write(report, out / "comparison.md", frame_markdown(compared))
    energy = energy_conventions(cells)
    _write(report, out / "energy_conventions.csv", energy.to_csv(index=False))
    _write(report, out / "energy_conventions.md", frame_markdown(energy))
    costs = implementation_costs(cells)
    _write(report, out / "implementation_costs.csv", costs.to_csv(index=False))
    _write(report, out / "implementation_costs.md", frame_markdown(costs) if not costs.empty else "")
    page = _page(sweep, cells, rendered_tables, rendered_figures, figure_files, timelines, compared, energy, report)
    page += _costs_section(costs)
    spread = repeats.spread_table(cells)
    _write(report, out / "repeats.csv", spread.to_csv(index=False))
    page += "\n" + "\n".join(repeats.repeats_lines(cells, frame_markdown(spread) if not spread.empty else ""))
    _write(report, out / "energy_boundaries.csv", ladder.boundaries_frame(cells).to_csv(index=False))
    page += ladder.report_sections(cells)
    page += "\n" + "\n".join(pareto_section(cells, out, target or pareto.Target(), report)) + "\n"
    _write(report, out / "report.md", page)
    return report


def _page(sweep: Path, cells: pd.DataFrame, rendered_tables: list[tables.Table],
          rendered_figures: list[figures.Rendered], figure_files: list[Path], timelines: list[Path],
          compared: pd.DataFrame, energy: pd.DataFrame, report: Report) -> str:
    counts = cells["status"].value_counts()
    status = ", ".join(f"{int(n)} {s}" for s, n in counts.items()) or "none"
    lines = [f"# The paper's tables and figures from `{sweep}`", "",
             f"Reproducing {paper.CITATION}. Cells: {len(cells)} ({status}). Empty entries were not measured "
             "in this sweep: nothing here is estimated or copied from the paper except in the 'paper' columns.", ""]
    if report.incomplete:
        lines[1:1] = ["", f"**Warning: {report.incomplete}.** The tables and figures below hold only the cells "
                      "that finished."]
    if report.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in report.notes], ""]
    lines += ["## Comparison with the published numbers", "",
              "ours / paper where both are single numbers; a range is compared by where ours falls. "
              "Only cells in the paper's own configuration are compared.", "", frame_markdown(compared)]
    lines += ["## Energy: the paper's convention beside every GPU summed", "",
              "The paper measured the rank-0 node (DCGM) and multiplied by the number of nodes; we measure every "
              "GPU. Figures and tables use every GPU summed.", ""]
    lines += [frame_markdown(energy) if not energy.empty else "No ok cells.\n"]
    if not energy.empty and energy["energy, all GPUs (J)"].isna().all():
        lines += ["No cell has an energy reading: the Notes above say why.", ""]
    lines += ["## Tables", "", "Energy per token, in the figures and the findings, is energy_per_token_j: per returned "
              "token (after the EOS cut), as the paper counts; Tables III-V give energy per cell (energy_j) and "
              "tokens/s of returned tokens. Energy per computed position (energy_per_position_j) is in the "
              "implementation costs below.", ""]
    for table in rendered_tables:
        lines += [tables.to_markdown(table), f"Files: `tables/{table.name}.md`, `.csv`, `.tex`", ""]
    lines += ["## Figures", ""]
    for rendered, path in zip(rendered_figures, figure_files, strict=True):
        lines += [f"### {rendered.title}", "", f"![{rendered.name}]({path.relative_to(report.out).as_posix()})", ""]
        lines += [f"- {n}" for n in rendered.notes] + ([""] if rendered.notes else [])
    lines += ["## Power timelines (one per cell)", ""]
    lines += [f"- [{p.stem}]({p.relative_to(report.out).as_posix()})" for p in timelines] or ["None."]
    return "\n".join(lines) + "\n"


def _costs_section(costs: pd.DataFrame) -> str:
    engines = ", ".join(f"`{name}` ({text})" for name, text in ENGINES.items())
    lines = ["", "## What the implementation costs", "",
             f"The same cell setting under each generation engine: {engines}. The difference is the "
             "implementation's, not the model's. J/token is per returned token (after the EOS cut, the paper's "
             "energy_per_token_j); J/position is per computed position (every row of every forward call, prompt "
             "rows and rows past EOS included: energy_per_position_j), empty for records without positions.", ""]
    if costs.empty:
        lines += [f"No setting was measured under two engines or more: sweep with `engine={','.join(ENGINES)}`.", ""]
    else:
        lines += [frame_markdown(costs)]
    return "\n".join(lines)


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2w-report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a finished sweep directory (holds cells/)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: SWEEP/results/paper)")
    parser.add_argument("--max-timelines", type=int, default=None, help="draw at most this many cell timelines")
    parser.add_argument("--min-tokens-per-s", type=float, default=None, metavar="X",
                        help="name the cheapest configuration (energy per token) with at least X tokens/s")
    parser.add_argument("--max-seconds-per-response", type=float, default=None, metavar="Y",
                        help="... and at most Y seconds per response (the wait for its batch)")
    args = parser.parse_args(argv)
    for option, value in (("--min-tokens-per-s", args.min_tokens_per_s),
                          ("--max-seconds-per-response", args.max_seconds_per_response)):
        if value is not None and not value > 0:
            print(f"w2w-report: error: {option}={value}: must be > 0", file=sys.stderr)
            return 2
    if not (args.sweep_dir / "cells").is_dir() and not (args.sweep_dir / MANIFEST).is_file():
        # A planned sweep whose jobs wrote no cell yet has its manifest: that one is a run, without results.
        print(f"w2w-report: error: {args.sweep_dir} has no cells/ folder: give the sweep_dir of a run",
              file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir / "results" / "paper"
    problem = writable_problem(out)
    if problem:
        print(f"w2w-report: error: cannot write the report to {out}: {problem}: give --out a folder you can write",
              file=sys.stderr)
        return 2
    target = pareto.Target(args.min_tokens_per_s, args.max_seconds_per_response)
    try:
        report = render(args.sweep_dir, out, args.max_timelines, target)
    except (ManifestError, RecordError) as exc:
        print(f"w2w-report: error: {exc}", file=sys.stderr)
        return 2
    except NoOkCellError as exc:
        print(f"w2w-report: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a read-only sweep_dir or --out, a file where a folder must go
        print(f"w2w-report: error: cannot write the report to {out}: {exc.strerror or exc} "
              f"({exc.filename or out}): give --out a folder you can write", file=sys.stderr)
        return 2
    if report.incomplete:
        print(f"w2w-report: warning: {report.incomplete}", file=sys.stderr)
    for note in report.notes:
        print(note)
    print("\n".join(report.recommendation))
    print(f"{len(report.files)} files under {out}/; start with {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
