"""The report's section on repeats: each cell's spread, n, normality check and the 95% interval that fits its runs."""

from __future__ import annotations

import pandas as pd
from w2w.analysis.stats import INTERVAL, NORMAL_P, STD, N, chosen
from w2w.analysis.tables import INTERVAL_LEGEND, interval_text, is_missing, ok

from w2w.cell import SHOWN_AXES

# The figures the section shows for every cell, in this order.
SHOWN = ("energy_per_token_j", "tokens_per_s", "energy_j", "total_s")
# The axes that name a cell in the table where they vary.
AXES = tuple(axis.column for axis in SHOWN_AXES)


def spread_table(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per ok cell: its setting, n, why it stopped (repeats=auto), and for each shown figure the
    interval that fits (mean ± t, or the median's), std, Shapiro-Wilk p and the interval's larger side as
    a share of its center."""
    done = ok(cells)
    axes = [a for a in AXES if a in done and done[a].dropna().astype(str).nunique() > 1]
    rows = []
    for row in done.to_dict("records"):
        out = {a: row.get(a) for a in axes} | {"cell_id": row["cell_id"], "n": row.get("repeats")}
        if isinstance(row.get("repeats_stopped"), str):
            out["stopped"] = row["repeats_stopped"]
        for column in SHOWN:
            center, low, high, _ = chosen(row, column)
            out[f"{column} (95%)"] = interval_text(row, column)
            out[f"{column} interval"] = row.get(column + INTERVAL)
            out[f"{column} std"] = row.get(column + STD)
            out[f"{column} normal p"] = row.get(column + NORMAL_P)
            out[f"{column} ±%"] = (None if is_missing(low) or is_missing(high) or not center
                                   else 100.0 * max(center - low, high - center) / abs(center))
        rows.append(out)
    return pd.DataFrame(rows)


def repeats_lines(cells: pd.DataFrame, table_markdown: str) -> list[str]:
    """The section's Markdown: how the runs were ordered, the table (already rendered), what failed."""
    done = ok(cells)
    runs = done["repeats"] if "repeats" in done else pd.Series(dtype=float)
    lines = ["## Repeats: spread and 95% intervals", ""]
    if done.empty:
        return [*lines, "No ok cells.", ""]
    if not (runs.fillna(0) > 1).any():
        return [*lines, "Each cell ran once (repeats=1): no spread or interval can be given, and a difference "
                "between two cells may be noise. Run with `repeats=3` or more.", ""]
    lines += [f"Each cell ran up to {int(runs.max())} times (n: its ok runs). A job runs its cells' repeats in "
              "cycles, each cycle in an order shuffled by the seed, so drift and heat spread over every cell. "
              "Each cell's runs are checked for normality (Shapiro-Wilk; it needs 3 runs), and each figure "
              f"gets the 95% interval that fits them. {INTERVAL_LEGEND}. ±% is the interval's larger side as "
              "a share of its center; `stopped` (repeats=auto) says whether the cell stopped once its J per "
              "token was tight or at repeats_max. The other tables show the mean. "
              f"Per-metric n, std and both intervals are in the cells table (`<metric>{N}`, `{STD}`, `_ci95`, "
              "`_median_low`, `_median_high`, `_normal_p`, `_interval`). "
              "An empty entry was not measured (the Notes say why).", ""]
    lines += [table_markdown, ""]
    notes = [f"- cell {r['cell_id']}: {r['repeat_note']}" for r in done.to_dict("records")
             if isinstance(r.get("repeat_note"), str) and r["repeat_note"]]
    if notes:
        lines += ["Runs that failed or are missing (the means above leave them out):", "", *notes, ""]
    return lines
