"""Our numbers beside the paper's published ones: one row per quantity, with where ours ran."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from w2w.analysis import figures, paper, stats, tables
from w2w.analysis.reduce import CellRecords, load_cells

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


def tested(a: pd.DataFrame, b: pd.DataFrame, column: str, what: str) -> str:
    """Whether two neighbouring configurations of a comparison differ in `column`, by a test on their runs
    (Welch t or Mann-Whitney U: analysis.stats.difference); "" unless each is one cell with repeats."""
    if len(a) != 1 or len(b) != 1:
        return ""
    said = stats.compare_rows(a.iloc[0].to_dict(), b.iloc[0].to_dict(), column, figures.UNITS.get(column, ""))
    return f"{what}: {said}" if said else ""


def _speedup(cells: pd.DataFrame, model: str) -> tuple[Span | None, pd.DataFrame, str]:
    mine = _fig2_cells(cells)
    mine = mine[mine["model"] == model]
    a100, v100 = (tables.mean_of(mine[mine["gpu"] == g], "tokens_per_s") for g in ("a100", "v100"))
    ratio = a100 / v100 if a100 is not None and v100 else None
    note = tested(mine[mine["gpu"] == "a100"], mine[mine["gpu"] == "v100"], "tokens_per_s", "A100 vs V100")
    return _span([ratio]), mine, note


def _figs_4_9_cells(cells: pd.DataFrame, length: int) -> pd.DataFrame:
    prefer = figures.FIGS_4_9_PREFER | {"max_gen_len": length}
    return _exact(tables.choose(tables.ok(cells), prefer))


def _watts_8_to_32(cells: pd.DataFrame) -> tuple[Span | None, pd.DataFrame, str]:
    diffs, used, notes = [], [], []
    for length in figures.FIGS_4_9_LENGTHS:
        mine = _figs_4_9_cells(cells, length)
        for (dataset, batch), group in mine.groupby(["dataset", "batch_size"]):
            low, high = (tables.mean_of(group[group["shards"] == s], "energy_per_s_w") for s in (8, 32))
            if low is not None and high is not None:
                diffs.append(high - low)
                used.append(group[group["shards"].isin([8, 32])])
                notes.append(tested(group[group["shards"] == 32], group[group["shards"] == 8], "energy_per_s_w",
                                    f"32 vs 8 GPUs, max length {length}, {dataset}, batch {int(batch)}"))
    return _span(diffs), pd.concat(used) if used else cells.iloc[0:0], "; ".join(n for n in notes if n)


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
    ours: dict[str, tuple[Span | None, pd.DataFrame] | tuple[Span | None, pd.DataFrame, str]] = {
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
        span, used, *tests = ours[f.key]  # the speed-up and watts findings add their test of the two sides
        note = "; ".join(n for n in ("" if f.key.startswith("cap") else _cap_note(used), *tests) if n)
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
