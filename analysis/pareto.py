"""Which configuration to run: Pareto frontiers of energy against speed, and the cheapest cell meeting a target."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from w2w.analysis.figures import Rendered, _empty, _error_bars, _new, _title, caption, interval_note
from w2w.analysis.metrics import METRICS
from w2w.analysis.stats import CI95, INTERVAL, MEDIAN, N, compare_rows
from w2w.analysis.tables import interval_text, is_missing, ok, show

from w2w.cell import SHOWN_AXES

# Every axis a sweep may vary; those with more than one value among the ok cells name each point.
AXES = tuple(axis.column for axis in SHOWN_AXES)
SHORT = {axis.column: axis.short for axis in SHOWN_AXES}
UNITS = {m.name: m.unit for m in METRICS}
# Speed: (column, True where larger is better).
SPEEDS = (("tokens_per_s", True), ("seconds_per_response", False))
COSTS = ("energy_per_token_j", "energy_per_correct_j")


def varied_axes(cells: pd.DataFrame) -> list[str]:
    return [a for a in AXES if a in cells and cells[a].dropna().astype(str).nunique() > 1]


def label(row: dict, axes: list[str]) -> str:
    """A cell as the axes it differs in: 'b=8 s=2' ('' where the sweep varied nothing)."""
    parts = []
    for axis in axes:
        value = show(axis, row.get(axis))
        parts.append(f"{SHORT[axis]}={value}" if SHORT[axis] else value)
    return " ".join(parts)


def frontier(cells: pd.DataFrame, cost: str, speed: str, larger_is_faster: bool) -> pd.DataFrame:
    """The cells no other cell beats on both cost (lower) and speed, sorted from slow to fast.

    A cell is dominated when another is at least as cheap and at least as fast, and strictly
    better in one; ties on both keep both cells."""
    usable = cells[cells[cost].notna() & cells[speed].notna()]
    costs = usable[cost].to_numpy(float)
    speeds = usable[speed].to_numpy(float) * (1 if larger_is_faster else -1)
    keep = []
    for i in range(len(usable)):
        no_worse = (costs <= costs[i]) & (speeds >= speeds[i])
        better = (costs < costs[i]) | (speeds > speeds[i])
        keep.append(not (no_worse & better).any())
    front = usable[np.array(keep, dtype=bool)] if len(usable) else usable
    return front.sort_values(speed, ascending=larger_is_faster, kind="stable")


@dataclass
class Target:
    min_tokens_per_s: float | None = None
    max_seconds_per_response: float | None = None

    def text(self) -> str:
        parts = []
        if self.min_tokens_per_s is not None:
            parts.append(f"tokens_per_s >= {self.min_tokens_per_s:g}")
        if self.max_seconds_per_response is not None:
            parts.append(f"seconds_per_response <= {self.max_seconds_per_response:g}")
        return " and ".join(parts) or "no speed target"

    def met(self, cells: pd.DataFrame) -> pd.Series:
        mask = pd.Series(True, index=cells.index)
        if self.min_tokens_per_s is not None:
            mask &= cells["tokens_per_s"].notna() & (cells["tokens_per_s"] >= self.min_tokens_per_s)
        if self.max_seconds_per_response is not None:
            mask &= cells["seconds_per_response"].notna() & (
                cells["seconds_per_response"] <= self.max_seconds_per_response)
        return mask


@dataclass
class Recommendation:
    target: Target
    cost: str
    lines: list[str] = field(default_factory=list)
    best: dict | None = None
    runner_up: dict | None = None


def _numbers(row: dict) -> str:
    shown = [f"{c}={row[c]:.4g}" + (f" {UNITS[c]}" if UNITS[c] != "fraction" else "") for c in
             ("energy_per_token_j", "energy_per_correct_j", "accuracy", "tokens_per_s", "seconds_per_response")
             if c in row and not is_missing(row[c])]
    return ", ".join(shown)


def _setting(row: dict, axes: list[str]) -> str:
    shown = [f"{a}={show(a, row.get(a))}" for a in axes if a in row and not is_missing(row.get(a))]
    return ", ".join(shown) or "the sweep's only setting"


def _common(cells: pd.DataFrame, axes: list[str]) -> str:
    first = cells.iloc[0].to_dict()
    return ", ".join(f"{a}={show(a, first[a])}" for a in AXES if a in cells and a not in axes
                     and not is_missing(first.get(a)))


def recommendation_axes(cells: pd.DataFrame, done: pd.DataFrame) -> list[str]:
    """The axes a recommendation names: AXES and the sweep's other varying axes (seed, temperature, ...,
    the table's attrs["axes"]), so a winner and runner-up never look alike while differing."""
    extra = [a for a in cells.attrs.get("axes", []) if a in done and a not in AXES
             and done[a].dropna().astype(str).nunique() > 1]
    return varied_axes(done) + extra


def recommend(cells: pd.DataFrame, target: Target, cost: str = "energy_per_token_j") -> Recommendation:
    """The cheapest ok cell (by `cost`) that meets the target, and the next cheapest that does."""
    rec = Recommendation(target, cost)
    done = ok(cells)
    priced = done[done[cost].notna()] if cost in done else done.iloc[0:0]
    if priced.empty:
        notes = sorted({n for n in done.get("note", pd.Series(dtype=object)).dropna() if n})
        rec.lines.append(f"No recommendation: no ok cell has {cost} ({'; '.join(notes) or 'no energy reading'}).")
        return rec
    axes = recommendation_axes(cells, done)
    meeting = priced[target.met(priced)].sort_values([cost, "tokens_per_s"], ascending=[True, False], kind="stable")
    if meeting.empty:
        fastest = priced.sort_values("tokens_per_s", ascending=False, kind="stable").iloc[0].to_dict()
        rec.lines.append(f"No cell meets {target.text()}. The fastest is {_setting(fastest, axes)}: "
                         f"{_numbers(fastest)} (cell {fastest['cell_id']}).")
        return rec
    rows = meeting.to_dict("records")
    rec.best = rows[0]
    rec.lines.append(f"Cheapest configuration meeting {target.text()} (by {cost}, {len(rows)} of "
                     f"{len(priced)} priced cells meet it):")
    rec.lines.append(f"- **{_setting(rows[0], axes)}**: {_numbers(rows[0])} (cell {rows[0]['cell_id']})")
    if len(rows) > 1:
        rec.runner_up = rows[1]
        extra = rows[1][cost] / rows[0][cost] - 1 if rows[0][cost] else math.nan
        rec.lines.append(f"- runner-up: {_setting(rows[1], axes)}: {_numbers(rows[1])} (cell {rows[1]['cell_id']}; "
                         f"{extra:+.1%} {cost})")
        rec.lines += distinguishable(rows[0], rows[1], cost)
    else:
        rec.lines.append("- runner-up: none (no other cell meets the target)")
    rec.lines.append(f"- every cell has {_common(done, axes)}")
    return rec


def distinguishable(best: dict, other: dict, cost: str) -> list[str]:
    """The recommendation's line on whether the winner is told apart from the runner-up: by a test
    on their runs (Welch's t where both cells' runs passed the normality check, else Mann-Whitney U),
    with its numbers, or why that cannot be said."""
    said = compare_rows(best, other, cost, UNITS.get(cost, ""))
    if said is None:
        return [f"- {cost} has fewer than 2 runs in one of the cells: run with repeats=3 or more to tell "
                "whether the difference is real"]
    shown = f"{interval_text(best, cost)} vs {interval_text(other, cost)} {UNITS.get(cost, '')}".rstrip()
    verdict, _, detail = said.partition(" (")
    if verdict == "not distinguishable":
        return [f"- **not distinguishable** in {cost} ({shown}): {detail.removesuffix(')')}"]
    return [f"- distinguishable in {cost} ({shown}): {detail.removesuffix(')')}"]


def _next_neighbour(front: list[dict], cost: str, speed: str) -> list[str]:
    """For each frontier point (ordered by speed), whether it differs from the next one in cost and in
    speed: the test's verdict and numbers, or "" where a point has no runs to test."""
    texts = []
    for row, following in zip(front, [*front[1:], None]):  # noqa: B905 (the last point has no next)
        if following is None:
            texts.append("")
            continue
        said = [f"{column}: {verdict}" for column in (cost, speed)
                if (verdict := compare_rows(row, following, column, UNITS.get(column, ""))) is not None]
        texts.append(f"vs {following['cell_id']}: " + "; ".join(said) if said else "")
    return texts


def frontier_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Every frontier point: which pair of objectives it is optimal for, its setting and numbers."""
    done = ok(cells)
    axes = varied_axes(done)
    rows = []
    for cost in COSTS:
        if cost not in done or done[cost].isna().all():
            continue
        for speed, larger in SPEEDS:
            front = frontier(done, cost, speed, larger).sort_values(speed, kind="stable").to_dict("records")
            for row, same in zip(front, _next_neighbour(front, cost, speed), strict=True):
                rows.append({"setting": label(row, axes) or "(the only setting)", "cost": cost,
                             "cost_value": row[cost], "cost_unit": UNITS[cost], "speed": speed,
                             "speed_value": row[speed], "speed_unit": UNITS[speed], "cell_id": row["cell_id"]}
                            | _interval_columns(row, cost, speed) | ({"next": same} if has_intervals(done) else {}))
    return pd.DataFrame(rows)


def has_intervals(cells: pd.DataFrame) -> bool:
    """Whether any cell ran repeats (a cost or speed column has a 95% interval)."""
    return any(c + CI95 in cells and cells[c + CI95].notna().any() for c in (*COSTS, *(s for s, _ in SPEEDS)))


def _interval_columns(row: dict, cost: str, speed: str) -> dict:
    """The frontier point's 95% intervals (the kind that fits) and n over repeats (only where it has some)."""
    if not any(not is_missing(row.get(c + CI95)) for c in (cost, speed)):
        return {}
    return {"cost_95": interval_text(row, cost), "cost_interval": row.get(cost + INTERVAL),
            "speed_95": interval_text(row, speed), "speed_interval": row.get(speed + INTERVAL), "n": row.get(cost + N)}


def missing_reason(cells: pd.DataFrame) -> str | None:
    """Why no frontier can be drawn, or None."""
    done = ok(cells)
    if done.empty:
        return "no ok cells"
    if done["energy_per_token_j"].isna().all():
        return "no ok cell has an energy reading (energy_per_token_j is empty: see the notes)"
    return None


# The roof beside the joule (analysis/roof.py): each cell's marker says what bounds its decode steps.
ROOF_MARKERS = {"memory-bound": "s", "compute-bound": "^", "launch-bound": "v"}


def _scatter_by_roof(ax, usable: pd.DataFrame, speed: str, cost: str) -> None:
    bound = usable["bound_by"] if "bound_by" in usable else pd.Series(None, index=usable.index, dtype=object)
    known = bound.isin(list(ROOF_MARKERS))
    ax.scatter(usable.loc[~known, speed], usable.loc[~known, cost], s=22, color="0.6", label="cell", zorder=2)
    for name, marker in ROOF_MARKERS.items():
        group = usable[bound == name]
        if not group.empty:
            ax.scatter(group[speed], group[cost], s=30, marker=marker, color="0.4", label=f"cell, {name}", zorder=2)


def pareto_figure(cells: pd.DataFrame) -> Rendered:
    """One panel per (cost, speed): every ok cell, its frontier drawn and labelled by the varied axes."""
    done = ok(cells)
    axes = varied_axes(done)
    costs = [c for c in COSTS if c in done and done[c].notna().any()] or [COSTS[0]]
    fig, grid = _new(len(costs), len(SPEEDS), width=5.2, height=4.0)
    notes = [f"points named by the axes this sweep varied: {', '.join(axes) or 'none'}"]
    for r, cost in enumerate(costs):
        for c, (speed, larger) in enumerate(SPEEDS):
            ax = grid[r, c]
            usable = done[done[cost].notna() & done[speed].notna()]
            _scatter_by_roof(ax, usable, speed, cost)
            if has_intervals(usable):  # the interval that fits each cell's runs, drawn around its center
                (xs, xerr), (ys, yerr) = _error_bars(usable, speed), _error_bars(usable, cost)
                ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor="0.5", elinewidth=0.8, capsize=2,
                            zorder=1)
                median = ((usable[speed + INTERVAL] == MEDIAN) | (usable[cost + INTERVAL] == MEDIAN)).to_numpy()
                if median.any():  # the cross's center is a median there, not the mean the point shows
                    ax.scatter(xs[median], ys[median], marker="D", s=18, facecolors="none", edgecolors="0.3",
                               label="median (runs not normal)", zorder=2)
            front = frontier(done, cost, speed, larger)
            for row in usable[~usable["cell_id"].isin(front["cell_id"])].to_dict("records"):
                ax.annotate(label(row, axes), (row[speed], row[cost]), textcoords="offset points",
                            xytext=(4, -9), fontsize=6, color="0.45")
            ax.plot(front[speed], front[cost], "-o", color="tab:red", markersize=6, label="Pareto frontier", zorder=3)
            points: dict[tuple[float, float], list[str]] = {}  # cells tied on both share one label
            for row in front.to_dict("records"):
                points.setdefault((row[speed], row[cost]), []).append(label(row, axes))
            for (x, y), names in points.items():
                ax.annotate("\n".join(names), (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color="tab:red")
            better = "right" if larger else "left"
            ax.set_xlabel(f"{speed} ({UNITS[speed]}); better: {better}")
            ax.set_ylabel(f"{cost} ({UNITS[cost]}); better: lower")
            ax.grid(alpha=0.3)
            ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
            ax.legend(loc="best", fontsize="x-small")
    shown = interval_note(done, (*costs, *(s for s, _ in SPEEDS)))
    notes += [*shown, "points: the means (the frontier is drawn through them); where the median's interval "
              "fits, the error bars cross at the median (hollow diamond)"] if has_intervals(done) else shown
    caption(fig, shown)
    reason = missing_reason(cells)
    if reason:
        for ax in grid.flat:
            _empty(ax, f"no frontier: {reason}")
        notes.append(f"no frontier: {reason}")
    _title(fig, "Which configuration to run: energy against speed (Pareto frontier in red)")
    return Rendered("pareto", "Pareto frontier: energy against throughput and time per response", fig, notes)
