"""The paper's tables (II, III, IV, V) from the cells table, in its layout, as Markdown, CSV and LaTeX."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from w2w.analysis import paper
from w2w.analysis.stats import MEDIAN, chosen, compare_rows

from w2w.files import write_atomic
from w2w.records import STATUS_OK

STATUS_OOM = "oom"  # the runner's status for torch.OutOfMemoryError

# The cells-table column behind each of Table III's quantities.
TABLE3_COLUMNS = {"time": "total_s", "energy": "energy_j", "token_rate": "tokens_per_s"}
TABLE3_LABELS = {"time": "time", "energy": "energy", "token_rate": "token rate"}
# Tables IV/V: the paper's two columns, then the share of memory capacity used (theirs is ambiguous).
UTILIZATION_COLUMNS = {
    "mem_util_max_pct": "max GPU memory util (%)",
    "sm_util_avg_pct": "avg SM util (%)",
    "mem_used_max_pct": "max memory used (% of capacity)",
}
GPU_ORDER = ("v100", "a100", "h100")


@dataclass
class Table:
    """One rendered table: values as numbers (None: missing), and what a reader must know."""

    name: str  # file stem
    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    fmt: str = "{:.4g}"  # how floats print


@dataclass
class Choice:
    """The cells an artifact uses, narrowed to one value of each of the paper's fixed settings."""

    cells: pd.DataFrame
    values: dict[str, Any]
    notes: list[str]
    substituted: tuple[str, ...] = ()  # the keys whose paper value this sweep lacks


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _norm(value: Any) -> Any:
    """NaN and None alike; 250.0 and 250 alike (power caps come back as floats)."""
    if is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _order(value: Any) -> tuple:
    return (value is not None, value if isinstance(value, (int, float)) else 0, str(value))


def show(key: str, value: Any) -> str:
    """A setting as a reader reads it."""
    value = _norm(value)
    if key == "power_cap_w":
        return "the GPU's own limit" if value is None else f"{value:g} W"
    if key == "model":
        return paper.MODEL_LABELS.get(value, value)
    return str(value)


def choose(cells: pd.DataFrame, prefer: dict[str, Any], ranks: dict[str, tuple] | None = None) -> Choice:
    """Narrow cells to the paper's value of each key, in order; a sweep without it gets the closest
    stand-in (the same rank among the paper's siblings in `ranks`, else the most common value) and a note."""
    ranks = ranks or {}
    values: dict[str, Any] = {}
    notes: list[str] = []
    substituted: list[str] = []
    for key, wanted in prefer.items():
        if cells.empty:
            break
        present = cells[key].map(_norm)
        available = sorted(set(present), key=_order)
        value = _norm(wanted)
        if value not in available:
            closest = [v for v in paper.STAND_INS.get(key, ()) if v in available]
            value = closest[0] if closest else _stand_in(present, available, value, ranks.get(key))
            notes.append(f"{key} = {show(key, value)}: the paper's {show(key, _norm(wanted))} is not in this sweep")
            substituted.append(key)
        values[key] = value
        cells = cells[present == value] if value is not None else cells[present.isna()]
    return Choice(cells, values, notes, tuple(substituted))


def _stand_in(present: pd.Series, available: list, wanted: Any, siblings: tuple | None) -> Any:
    if siblings and wanted in siblings:
        top = [v for v in available if v is not None][-len(siblings):] or available
        return top[min(siblings.index(wanted), len(top) - 1)]
    counts = present.value_counts(dropna=False)
    return max(available, key=lambda v: (int(counts.get(v, 0)) if v is not None else int(present.isna().sum()),
                                         _order(v)))


def repeats_note(cells: pd.DataFrame, keys: list[str], what: str) -> list[str]:
    """Cells that share every setting shown are repeats: averaged, and said so."""
    if cells.empty:
        return []
    sizes = cells.groupby(keys, dropna=False).size()
    notes = []
    for index, n in sizes[sizes > 1].items():
        values = index if isinstance(index, tuple) else (index,)
        setting = ", ".join(f"{k}={show(k, v)}" for k, v in zip(keys, values, strict=True))
        notes.append(f"{what}: {int(n)} cells with the same settings ({setting}) averaged")
    return notes


def mean_of(cells: pd.DataFrame, column: str) -> float | None:
    """The mean over cells, or None unless every cell has the value: never a mean of a subset."""
    values = [v for v in cells[column] if not is_missing(v)] if column in cells else []
    return math.fsum(values) / len(values) if values and len(values) == len(cells) else None


def ok(cells: pd.DataFrame) -> pd.DataFrame:
    return cells[cells["status"] == STATUS_OK]


def gpu_order(gpus: Iterable[str]) -> list[str]:
    return sorted(set(gpus), key=lambda g: (GPU_ORDER.index(g) if g in GPU_ORDER else len(GPU_ORDER), g))


def model_order(models: Iterable[str]) -> list[str]:
    known = list(paper.MODEL_LABELS)
    return sorted(set(models), key=lambda m: (known.index(m) if m in known else len(known), m))


# -- Table II -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """Table II for one model x GPU: the fewest GPUs that ran, the largest batch that ran on them."""

    model: str
    gpu: str
    gpus: int | None
    max_batch: int | None
    notes: tuple[str, ...]


def table2_found(cells: pd.DataFrame, skipped: pd.DataFrame | None = None) -> tuple[list[Found], list[str]]:
    """A batch ran on a shard count when a cell of it is ok and none ran out of memory (a cell failing
    for another reason, such as a refused power cap, says nothing about fit)."""
    tried = pd.concat([cells, skipped], ignore_index=True) if skipped is not None and not skipped.empty else cells
    if tried.empty:
        return [], ["no cells in this sweep"]
    choice = choose(tried, {"max_gen_len": paper.TABLE2_MAX_GEN_LEN} | paper.SCHEDULE)
    chosen = choice.cells
    pairs = [(m, g) for m in model_order(chosen["model"]) for g in gpu_order(chosen.loc[chosen["model"] == m, "gpu"])]
    found = [_found(chosen, model, gpu) for model, gpu in pairs]
    return found, choice.notes


def _found(cells: pd.DataFrame, model: str, gpu: str) -> Found:
    mine = cells[(cells["model"] == model) & (cells["gpu"] == gpu)]
    ran = mine.groupby(["shards", "batch_size"])["status"].agg(
        lambda s: bool((s == STATUS_OK).any() and not (s == STATUS_OOM).any()))
    ran_shards = sorted({int(s) for (s, _), good in ran.items() if good})
    label = f"{show('model', model)} on {gpu}"
    if not ran_shards:
        return Found(model, gpu, None, None, (f"{label}: no cell ran ({_statuses(mine)})",))
    gpus = ran_shards[0]
    batches = sorted(int(b) for (s, b), good in ran.items() if s == gpus and good)
    max_batch = batches[-1]
    notes = []
    fewer = mine[mine["shards"] < gpus]
    if not fewer.empty:
        notes.append(f"{label}: fewer GPUs did not run ({_statuses(fewer)})")
    larger = mine[(mine["shards"] == gpus) & (mine["batch_size"] > max_batch)]
    if larger.empty:
        notes.append(f"{label}: {max_batch} is the largest batch tried on {gpus} GPU(s); a larger one may fit")
    else:
        notes.append(f"{label}: larger batches on {gpus} GPU(s) did not run ({_statuses(larger)})")
    return Found(model, gpu, gpus, max_batch, tuple(notes))


def _statuses(cells: pd.DataFrame) -> str:
    parts = []
    for (shards, batch), group in cells.groupby(["shards", "batch_size"]):
        states = ", ".join(sorted(set(group["status"])))
        parts.append(f"{int(shards)} GPU(s) batch {int(batch)}: {states}")
    return "; ".join(parts)


def table2(cells: pd.DataFrame, skipped: pd.DataFrame | None = None) -> Table:
    found, notes = table2_found(cells, skipped)
    gpus = gpu_order(f.gpu for f in found)
    rows = []
    for model in model_order(f.model for f in found):
        row: dict[str, Any] = {"model": show("model", model)}
        for gpu in gpus:
            hit = next((f for f in found if f.model == model and f.gpu == gpu), None)
            row[f"{gpu.upper()} GPUs"] = hit.gpus if hit else None
            row[f"{gpu.upper()} max batch"] = hit.max_batch if hit else None
        rows.append(row)
    title = (f"Table II: minimum GPUs and the largest batch that ran, max length {paper.TABLE2_MAX_GEN_LEN} "
             "(skipped: rejected by the planner's memory-fit estimate, never run)")
    notes = notes + [n for f in found for n in f.notes]
    columns = ["model"] + [f"{g.upper()} {c}" for g in gpus for c in ("GPUs", "max batch")]
    return Table("table2", title, pd.DataFrame(rows, columns=columns), notes, fmt="{:g}")


# -- Table III ------------------------------------------------------------------------------------


def percent_change(value: float | None, base: float | None) -> float | None:
    """100 (value / base - 1): the paper's % change relative to the 250 W cap."""
    if is_missing(value) or is_missing(base) or base == 0:
        return None
    return 100.0 * (value / base - 1.0)


@dataclass
class Table3:
    values: dict[int, dict[tuple[str, float], float | None]]  # by max length, (quantity, cap W)
    caps: tuple[float, ...]
    choice: Choice
    notes: list[str]


def table3_values(cells: pd.DataFrame) -> Table3:
    """Each quantity at each cap vs the same cell at the 250 W base cap, per max length."""
    capped = ok(cells)
    capped = capped[capped["power_cap_w"].notna()]
    choice = choose(capped, paper.TABLE3_SETUP | paper.SCHEDULE)
    found = {_norm(c) for c in choice.cells["power_cap_w"]}
    base = _norm(paper.TABLE3_BASE_W)
    # The paper's caps lay the table out where the sweep has none.
    caps = tuple(float(c) for c in sorted(found - {base}, reverse=True)) or paper.TABLE3_CAPS_W
    notes = list(choice.notes)
    if choice.cells.empty:
        notes.append("no power-capped cell ran in this sweep (run the paper_table3 preset)")
    elif base not in found:
        notes.append(f"no cell at the {paper.TABLE3_BASE_W:g} W base cap: no % change can be computed")
    notes += repeats_note(choice.cells, ["max_gen_len", "power_cap_w"], "Table III")
    values: dict[int, dict[tuple[str, float], float | None]] = {}
    for length, group in choice.cells.groupby("max_gen_len"):
        at = {_norm(c): sub for c, sub in group.groupby("power_cap_w")}
        row = {}
        for quantity, column in TABLE3_COLUMNS.items():
            reference = mean_of(at[base], column) if base in at else None
            for cap in caps:
                capped_value = mean_of(at[_norm(cap)], column) if _norm(cap) in at else None
                row[(quantity, cap)] = percent_change(capped_value, reference)
        values[int(length)] = row
        if base in at and any(v is None for v in row.values()):
            notes.append(f"max length {int(length)}: some caps lack a cell or an energy reading: left empty")
        notes += _cap_tests(at, base, caps, int(length))
    return Table3(values, caps, choice, notes)


def _cap_tests(at: dict[float, pd.DataFrame], base: float, caps: tuple[float, ...], length: int) -> list[str]:
    """Whether each capped cell differs from the base-cap cell, per quantity, by a test on their runs
    (where both are one cell with repeats): the Table's % change may be noise."""
    notes = []
    for cap in caps:
        pair = at.get(_norm(cap)), at.get(base)
        if any(p is None or len(p) != 1 for p in pair):
            continue
        capped, reference = (p.iloc[0].to_dict() for p in pair)
        for quantity, column in TABLE3_COLUMNS.items():
            said = compare_rows(capped, reference, column)
            if said is not None:
                notes.append(f"max length {length}, {TABLE3_LABELS[quantity]} @{cap:g} W vs "
                             f"{paper.TABLE3_BASE_W:g} W ({column}): {said}")
    return notes


def table3(cells: pd.DataFrame) -> Table:
    t3 = table3_values(cells)
    keys = [(q, cap) for q in paper.TABLE3_QUANTITIES for cap in t3.caps]
    columns = [f"{TABLE3_LABELS[q]} @{cap:g}W" for q, cap in keys]
    rows = [{"max len": length} | {c: row[k] for c, k in zip(columns, keys, strict=True)}
            for length, row in sorted(t3.values.items())]
    setup = ", ".join(f"{k}={show(k, v)}" for k, v in t3.choice.values.items()) or "no capped cells"
    title = f"Table III: % change relative to the {paper.TABLE3_BASE_W:g} W cap ({setup}; energy: all GPUs summed)"
    return Table("table3", title, pd.DataFrame(rows, columns=["max len", *columns]), t3.notes, fmt="{:+.2f}")


# -- Tables IV and V ------------------------------------------------------------------------------


def utilization(cells: pd.DataFrame, prefer: dict[str, Any], axis: str) -> tuple[pd.DataFrame, Choice, list[str]]:
    """Per value of `axis`: the utilization columns, averaged over repeats."""
    choice = choose(ok(cells), prefer | {"dataset": "gsm8k", "power_cap_w": paper.DEFAULT_CAP_W} | paper.SCHEDULE)
    notes = list(choice.notes) + repeats_note(choice.cells, [axis], "utilization")
    rows = []
    for value, group in choice.cells.groupby(axis):
        measured = {label: mean_of(group, column) for column, label in UTILIZATION_COLUMNS.items()}
        rows.append({axis: int(value)} | measured)
    frame = pd.DataFrame(rows, columns=[axis, *UTILIZATION_COLUMNS.values()])
    if choice.cells.empty:
        notes.append("no cell of this sweep matches")
    elif frame[list(UTILIZATION_COLUMNS.values())].isna().all().all():
        notes.append("no utilization telemetry in these cells (no GPU meter, or energy.sampler=false)")
    return frame, choice, notes


def table4(cells: pd.DataFrame) -> Table:
    frame, choice, notes = utilization(cells, paper.TABLE4_SETUP, "max_gen_len")
    setup = ", ".join(f"{k}={show(k, v)}" for k, v in choice.values.items())
    return Table("table4", f"Table IV: utilization by max length ({setup})",
                 frame.rename(columns={"max_gen_len": "max len"}), notes, fmt="{:.2f}")


def table5(cells: pd.DataFrame) -> Table:
    frame, choice, notes = utilization(cells, paper.TABLE5_SETUP, "shards")
    setup = ", ".join(f"{k}={show(k, v)}" for k, v in choice.values.items())
    return Table("table5", f"Table V: utilization by shard count ({setup})",
                 frame.rename(columns={"shards": "GPUs"}), notes, fmt="{:.2f}")


# -- rendering ------------------------------------------------------------------------------------


def cell_text(value: Any, fmt: str) -> str:
    if is_missing(value):
        return ""
    if isinstance(value, float):
        return fmt.format(value)
    return str(value)


def _texts(table: Table) -> list[list[str]]:
    fmt_int = "{:g}"
    return [[cell_text(v, fmt_int if col in ("max len", "GPUs", "max_gen_len", "shards") else table.fmt)
             for col, v in row.items()] for row in table.frame.to_dict("records")]


def markdown(frame: pd.DataFrame, columns: list[str] | None = None, fmt: str = "{:.4g}",
             texts: list[list[str]] | None = None) -> str:
    """The one Markdown table writer: `columns` of `frame`, each value through cell_text (or `texts`)."""
    columns = list(frame.columns) if columns is None else columns
    if texts is None:
        texts = [[cell_text(row[c], fmt) for c in columns] for row in frame.to_dict("records")]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(text.replace("|", "/") for text in row) + " |" for row in texts]
    return "\n".join(lines)


def interval_text(row: dict, column: str, fmt: str = "{:.4g}") -> str:
    """A cells-table value with the 95% interval that fits its repeats: "12.3 ± 0.4" (mean, Student t)
    or "med 12.1 [11.8, 13]" (median, order statistics); as is for a cell run once."""
    center, low, high, kind = chosen(row, column)
    if kind is None or is_missing(low) or is_missing(high) or is_missing(center):
        return cell_text(row.get(column), fmt)
    if kind == MEDIAN:
        return f"med {cell_text(center, fmt)} [{cell_text(low, fmt)}, {cell_text(high, fmt)}]"
    return f"{cell_text(center, fmt)} ± {half_text(float(high) - float(center))}"


# What interval_text's two forms mean: printed under every table that uses them.
INTERVAL_LEGEND = ("x ± h: the mean and its 95% Student t interval (the runs passed Shapiro-Wilk, p >= 0.05); "
                   "med m [a, b]: the median and its order-statistics interval (runs not normal, too few to "
                   "check, or a t interval reaching below zero; covers 95% from 6 runs, less below: "
                   "<metric>_median_cover_pct)")


def half_text(half: float) -> str:
    """An interval's half-width to two significant digits, without an exponent for large ones (350, not 3.5e+02)."""
    return f"{float(f'{half:.2g}'):g}"


def interval_markdown(frame: pd.DataFrame, columns: list[str], fmt: str = "{:.4g}") -> str:
    """The cells table as Markdown, each measured value with its 95% interval over the cell's repeats."""
    texts = [[interval_text(row, c, fmt) for c in columns] for row in frame.to_dict("records")]
    return markdown(frame, columns, fmt, texts)


def to_markdown(table: Table) -> str:
    columns = list(table.frame.columns)
    lines = [f"**{table.title}**", "", markdown(table.frame, texts=_texts(table))]
    if table.frame.empty:
        lines.append("| " + " | ".join([""] * len(columns)) + " |")
    if table.notes or table.frame.empty or _has_missing(table):
        lines.append("")
        lines += [f"- {note}" for note in table.notes]
        if _has_missing(table):
            lines.append("- empty entries: not measured in this sweep (never estimated)")
    return "\n".join(lines) + "\n"


def _has_missing(table: Table) -> bool:
    return table.frame.empty or bool(table.frame.isna().any().any())


def to_csv(table: Table) -> str:
    return table.frame.to_csv(index=False)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    columns = list(table.frame.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(table.title)}}}",
             rf"\begin{{tabular}}{{l{'r' * (len(columns) - 1)}}}", r"\hline",
             " & ".join(latex_escape(c) for c in columns) + r" \\", r"\hline"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in _texts(table)]
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(table: Table, out: Path) -> list[Path]:
    paths = []
    for suffix, text in ((".md", to_markdown(table)), (".csv", to_csv(table)), (".tex", to_latex(table))):
        path = out / f"{table.name}{suffix}"
        write_atomic(path, text.encode())
        paths.append(path)
    return paths


def all_tables(cells: pd.DataFrame, skipped: pd.DataFrame | None = None) -> list[Table]:
    return [table2(cells, skipped), table3(cells), table4(cells), table5(cells)]
