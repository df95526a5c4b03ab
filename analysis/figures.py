"""The paper's figures (Figs 2-9) and per-cell power timelines as PNGs, drawn with matplotlib's Agg backend."""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
from w2w.analysis import paper
from w2w.analysis.metrics import METRICS
from w2w.analysis.stats import INTERVAL, MEDIAN, T, chosen
from w2w.analysis.tables import (
    Choice,
    choose,
    gpu_order,
    is_missing,
    mean_of,
    model_order,
    ok,
    repeats_note,
    show,
)

from w2w.files import write_atomic
from w2w.records import RankRecord

UNITS = {m.name: m.unit for m in METRICS}
NAMES = {
    "words_per_s": "words per second", "tokens_per_s": "tokens per second",
    "responses_per_s": "responses per second", "energy_per_s_w": "energy per second",
    "energy_per_token_j": "energy per returned token", "energy_per_response_j": "energy per response",
}
FIG2_METRICS = ("words_per_s", "tokens_per_s", "responses_per_s")
FIG3_METRICS = ("energy_per_s_w",)
# Figs 4-9: (metric, max length); the paper's batch list is not recoverable, ours is the sweep's.
FIGS_4_9 = {
    "fig4": ("energy_per_s_w", 512), "fig5": ("energy_per_s_w", 1024),
    "fig6": ("energy_per_token_j", 512), "fig7": ("energy_per_token_j", 1024),
    "fig8": ("energy_per_response_j", 512), "fig9": ("energy_per_response_j", 1024),
}
FIGS_4_9_LENGTHS = (512, 1024)
FIG2_PREFER = {"batch_size": 64, "max_gen_len": 256, "power_cap_w": paper.DEFAULT_CAP_W} | paper.SCHEDULE
FIGS_4_9_PREFER = {"model": "llama_65b", "gpu": "v100", "power_cap_w": paper.DEFAULT_CAP_W} | paper.SCHEDULE


@dataclass
class Rendered:
    name: str
    title: str
    figure: Figure
    notes: list[str] = field(default_factory=list)


def axis_label(metric: str) -> str:
    return f"{NAMES[metric]} ({UNITS[metric]})"


def _new(rows: int, cols: int, width: float = 4.2, height: float = 3.0) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * cols + 1.4, height * rows + 0.9), layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg: no pyplot, no display, the same output anywhere
    return fig, np.atleast_2d(fig.subplots(rows, cols, squeeze=False))


def _title(fig: Figure, text: str) -> None:
    width = int(fig.get_figwidth() * 11)  # characters that fit at 9 pt beside a legend
    fig.suptitle("\n".join(textwrap.wrap(text, width)), fontsize=9)


def _empty(ax, text: str) -> None:
    """A panel with nothing measured says why, and shows no scale that could be read as a value."""
    for artist in list(ax.texts):
        artist.remove()
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 48)), ha="center", va="center", fontsize=8, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def interval_of(cells: pd.DataFrame, metric: str) -> tuple[float, tuple[float, float]] | None:
    """(center, (below, above)) of the one cell a bar or point shows: the center and the bar lengths of
    the 95% interval that fits its runs (mean and t, or median and order statistics); None for a mean
    of several cells or a cell run once."""
    if len(cells) != 1:
        return None
    center, low, high, kind = chosen(cells.iloc[0].to_dict(), metric)
    if kind is None or is_missing(low) or is_missing(high) or is_missing(center):
        return None
    return float(center), (float(center) - float(low), float(high) - float(center))


def _bar_value(cells: pd.DataFrame, metric: str) -> tuple[float | None, tuple[float, float] | None]:
    """A bar's height and error: the center of the cell's fitting interval, else the mean over the cells."""
    found = interval_of(cells, metric)
    return (found[0], found[1]) if found else (mean_of(cells, metric), None)


def power_of_two_axis(ax, values: list[float]) -> None:
    """A log2 axis labelled in plain numbers at the values drawn (1, 2, 4 ..., not 2^0, 2^1)."""
    ax.set_xscale("log", base=2)
    ticks = sorted({float(v) for v in values if not is_missing(v) and v > 0})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def caption(fig: Figure, notes: list[str]) -> None:
    """The figure's caption at its foot, on the PNG itself: n and the interval used, among its notes."""
    width = int(fig.get_figwidth() * 15)
    fig.supxlabel("\n".join(line for note in notes for line in textwrap.wrap(note, width)), fontsize=6,
                  ha="left", x=0.01)


def _bars(ax, groups: list[str], series: list[str], values: dict[tuple[str, str], float | None],
          labels: dict[tuple[str, str], str] | None = None,
          errors: dict[tuple[str, str], tuple[float, float] | None] | None = None) -> bool:
    """Grouped bars, each with its error bar (95% interval over repeats) where `errors` has one; a
    missing value is no bar (and 'n/a' where it would stand). True if any bar."""
    width = 0.8 / max(len(series), 1)
    drawn = False
    for i, name in enumerate(series):
        labelled = False
        for j, group in enumerate(groups):
            x = j - 0.4 + width * (i + 0.5)
            value = values.get((group, name))
            if value is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
                continue
            error = (errors or {}).get((group, name))
            ax.bar(x, value, width, color=f"C{i}", label=None if labelled else name,
                   yerr=None if error is None else [[error[0]], [error[1]]], capsize=2 if error is not None else 0)
            if labels and (group, name) in labels:
                ax.text(x, value, labels[(group, name)], ha="center", va="bottom", fontsize=6)
            drawn = labelled = True
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)
    return drawn


def _legend(fig: Figure, ax_grid: np.ndarray, title: str) -> None:
    handles, names = [], []
    for ax in ax_grid.flat:
        for h, n in zip(*ax.get_legend_handles_labels(), strict=True):
            if n not in names:
                handles.append(h)
                names.append(n)
    if handles:
        fig.legend(handles, names, title=title, loc="outside right upper", fontsize=7, title_fontsize=7)


def _setup(choice: Choice) -> str:
    return ", ".join(f"{k}={show(k, v)}" for k, v in choice.values.items())


def _no_data_reason(cells: pd.DataFrame, metric: str) -> str:
    """Why a panel is empty: the reducer's note where energy is missing."""
    if cells.empty:
        return "no cell of this sweep matches"
    notes = {n for n in cells.get("note", pd.Series(dtype=object)).dropna() if n}
    return f"no {NAMES[metric]}: " + ("; ".join(sorted(notes))[:160] if notes else "not measured")


def min_gpus(cells: pd.DataFrame) -> pd.DataFrame:
    """Figs 2-3 use Table II's hardware: the fewest GPUs each model x GPU kind ran on."""
    if cells.empty:
        return cells
    fewest = cells.groupby(["model", "gpu"])["shards"].transform("min")
    return cells[cells["shards"] == fewest]


def throughput_figure(cells: pd.DataFrame, name: str, metrics: tuple[str, ...], what: str) -> Rendered:
    """Figs 2-3: a metric per model, one bar per GPU kind; a row per dataset, a column per metric."""
    choice = choose(ok(cells), FIG2_PREFER)
    chosen = min_gpus(choice.cells)
    datasets = sorted(set(chosen["dataset"])) or ["(none)"]
    models = model_order(chosen["model"]) if not chosen.empty else []
    gpus = gpu_order(chosen["gpu"]) if not chosen.empty else []
    panels = [(d, m) for d in datasets for m in metrics]
    shape = (len(datasets), len(metrics)) if len(metrics) > 1 else (1, len(datasets))
    fig, axes = _new(*shape)
    for ax, (dataset, metric) in zip(axes.flat, panels, strict=True):
        here = chosen[chosen["dataset"] == dataset]
        values, labels, errors = {}, {}, {}
        for (model, gpu), group in here.groupby(["model", "gpu"]):
            key = (show("model", model), gpu.upper())
            values[key], errors[key] = _bar_value(group, metric)
            labels[key] = f"{int(group['shards'].iloc[0])} GPU"
        if not _bars(ax, [show("model", m) for m in models], [g.upper() for g in gpus], values, labels, errors):
            _empty(ax, _no_data_reason(here, metric))
        ax.set_ylabel(axis_label(metric), fontsize=8)
        ax.set_xlabel("model (bar label: GPUs used)", fontsize=8)
        ax.set_title(dataset, fontsize=9)
    title = f"{name.replace('fig', 'Fig. ')}: {what} ({_setup(choice)})"
    _title(fig, title)
    _legend(fig, axes, "GPU")
    notes = choice.notes + repeats_note(chosen, ["model", "gpu", "dataset"], name) + interval_note(chosen, metrics)
    caption(fig, interval_note(chosen, metrics))
    return Rendered(name, title, fig, notes)


def shards_figure(cells: pd.DataFrame, name: str) -> Rendered:
    """Figs 4-9: 65B on V100s, a metric by shard count, one bar per batch size, one column per dataset."""
    metric, length = FIGS_4_9[name]
    choice = choose(ok(cells), FIGS_4_9_PREFER | {"max_gen_len": length}, {"max_gen_len": FIGS_4_9_LENGTHS})
    chosen = choice.cells
    datasets = sorted(set(chosen["dataset"])) or ["(none)"]
    shards = sorted({int(s) for s in chosen["shards"]})
    batches = sorted({int(b) for b in chosen["batch_size"]})
    fig, axes = _new(1, len(datasets))
    for c, dataset in enumerate(datasets):
        ax = axes[0, c]
        here = chosen[chosen["dataset"] == dataset]
        by_bar = here.groupby(["shards", "batch_size"])
        bars = {(str(int(s)), str(int(b))): _bar_value(g, metric) for (s, b), g in by_bar}
        values = {key: value for key, (value, _) in bars.items()}
        errors = {key: error for key, (_, error) in bars.items()}
        if not _bars(ax, [str(s) for s in shards], [str(b) for b in batches], values, errors=errors):
            _empty(ax, _no_data_reason(here, metric))
        ax.set_ylabel(axis_label(metric), fontsize=8)
        ax.set_xlabel("GPUs (shards)", fontsize=8)
        ax.set_title(dataset, fontsize=9)
    title = f"{name.replace('fig', 'Fig. ')}: {NAMES[metric]} by shard count and batch size ({_setup(choice)})"
    _title(fig, title)
    _legend(fig, axes, "batch size")
    notes = choice.notes + repeats_note(chosen, ["shards", "batch_size", "dataset"], name) + interval_note(chosen, (metric,))
    caption(fig, interval_note(chosen, (metric,)))
    return Rendered(name, title, fig, notes)


def overview_figure(cells: pd.DataFrame) -> Rendered:
    """Any sweep at a glance: each of the six metrics against batch size, a line per other setting."""
    done = ok(cells)
    fig, axes = _new(2, 3, width=3.6, height=2.6)
    keys = [k for k in ("model", "gpu", "dataset", "shards", "max_gen_len", "power_cap_w") if done[k].nunique() > 1]
    for ax, metric in zip(axes.flat, NAMES, strict=True):
        drawn = False
        for label, group in (done.groupby(keys, dropna=False) if keys else [((), done)]):
            points = group.dropna(subset=[metric]).sort_values("batch_size")
            if points.empty:
                continue
            values = label if isinstance(label, tuple) else (label,)
            name = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)) or "all cells"
            centers, errors = _error_bars(points, metric)  # the interval that fits each cell's runs
            ax.errorbar(points["batch_size"], centers, yerr=errors, marker="o", capsize=2, label=name)
            drawn = True
        if drawn:
            power_of_two_axis(ax, list(done["batch_size"]))
            ax.set_xlabel("batch size", fontsize=8)
            ax.set_ylabel(axis_label(metric), fontsize=8)
            ax.grid(alpha=0.3)
        else:
            _empty(ax, _no_data_reason(done, metric))
        ax.set_title(NAMES[metric], fontsize=9)
    title = f"{len(done)} ok cell(s): the six metrics by batch size"
    _title(fig, title)
    _legend(fig, axes, "cells")
    notes = interval_note(done, tuple(NAMES))
    caption(fig, notes)
    return Rendered("metrics", title, fig, notes)


def interval_note(cells: pd.DataFrame, metrics: tuple[str, ...]) -> list[str]:
    """The figure's caption on n and its error bars: which interval each cell drawn got (t or median)."""
    if cells.empty:
        return []
    runs = pd.to_numeric(cells.get("repeats", pd.Series(1, index=cells.index)), errors="coerce").fillna(1)
    n = f"n = {int(runs.min())}" + (f" to {int(runs.max())}" if runs.max() > runs.min() else "") + " run(s) per cell"
    kinds = pd.concat([cells[m + INTERVAL] for m in metrics if m + INTERVAL in cells] or [pd.Series(dtype=object)])
    t, median = int((kinds == T).sum()), int((kinds == MEDIAN).sum())
    if not t and not median:
        return [f"{n}: no error bars (a cell run once has no interval)"]
    covers = [float(c) for m in metrics if m + "_median_cover_pct" in cells
              for c, k in zip(cells[m + "_median_cover_pct"], cells.get(m + INTERVAL), strict=True)
              if k == MEDIAN and not is_missing(c)]
    cover = f"; with fewer than 6 runs it covers only {min(covers):.2f}%" if covers and min(covers) < 95 else ""
    return [f"{n}; error bars: the 95% interval that fits each cell's runs: mean ± Student t where the runs "
            f"passed Shapiro-Wilk ({t} cell-metric(s)), else the median with its order-statistics interval "
            f"({median} cell-metric(s){cover}); each bar spans that interval"]


def _error_bars(points: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Centers and (below, above) bar lengths of the points: the interval that fits; the mean and no bar
    for a cell run once; None where no point has an interval."""
    found = [interval_of(points.iloc[[i]], metric) for i in range(len(points))]
    centers = np.array([f[0] if f else float(v) for f, v in zip(found, points[metric], strict=True)])
    if not any(found):
        return centers, None
    return centers, np.array([[f[1][0] if f else 0.0 for f in found], [f[1][1] if f else 0.0 for f in found]])


def all_figures(cells: pd.DataFrame) -> list[Rendered]:
    return [
        throughput_figure(cells, "fig2", FIG2_METRICS, "throughput"),
        throughput_figure(cells, "fig3", FIG3_METRICS, "energy per second, all GPUs"),
        *(shards_figure(cells, name) for name in FIGS_4_9),
    ]


def timeline_frames(paths: list[Path]) -> list[pd.DataFrame]:
    return [pd.read_parquet(p, columns=["rank", "unix_s", "power_w"]) for p in paths]


# The phases shaded on a power timeline, and their colours.
PHASE_COLORS = {"warm-up": "tab:purple", "prefill": "tab:orange", "decode": "tab:green", "idle": "0.75"}
Span = tuple[str, float, float]  # (phase, start, end) in unix s


def phase_spans(record: RankRecord) -> list[Span]:
    """A rank's warm-ups (one per job attempt), and each batch's prefill then decode, from its record."""
    # A segment's start_unix_s is stamped as its warm-up ends (measure.measure_cell): the warm-up lies before it.
    spans = [("warm-up", s.start_unix_s - s.warmup_s, s.start_unix_s) for s in record.segments
             if s.start_unix_s is not None and s.warmup_s]
    for batch in record.batches:
        t = batch.times
        if t.start_unix_s is None or t.prefill_s is None or t.decode_s is None:
            continue
        spans += [("prefill", t.start_unix_s, t.start_unix_s + t.prefill_s),
                  ("decode", t.start_unix_s + t.prefill_s, t.start_unix_s + t.prefill_s + t.decode_s)]
    return sorted(spans, key=lambda span: span[1])


def _idle_gaps(spans: list[Span], start: float, end: float) -> list[Span]:
    """The stretches of [start, end] that no phase covers: the GPUs waited (host work, I/O, barriers)."""
    gaps, at = [], start
    for _, lo, hi in spans:
        if lo > at:
            gaps.append(("idle", at, min(lo, end)))
        at = max(at, hi)
    return gaps + ([("idle", at, end)] if at < end else [])


def _shade(ax, spans: list[Span], start: float) -> None:
    for phase, lo, hi in spans:
        ax.axvspan(lo - start, hi - start, color=PHASE_COLORS[phase], alpha=0.15, linewidth=0)


def timeline_figure(cell_id: str, frames: list[pd.DataFrame], caption_text: str,
                    record: RankRecord | None = None) -> Rendered:
    """GPU power of every rank over the cell, and their sum (what the cell's energy integrates); the
    phases of rank 0's record (warm-up, prefill, decode, idle between them) shaded behind."""
    fig, axes = _new(2, 1, width=8.0, height=2.6)
    frames = [f.dropna(subset=["unix_s", "power_w"]) for f in frames]  # a failed read is a gap, not a value
    start = min((float(f["unix_s"].iloc[0]) for f in frames if len(f)), default=0.0)
    end = max((float(f["unix_s"].iloc[-1]) for f in frames if len(f)), default=start)
    spans = phase_spans(record) if record is not None else []
    if spans:
        spans += _idle_gaps(spans, min(start, spans[0][1]), end)
        for ax in axes.flat:
            _shade(ax, spans, start)
    for frame in frames:
        if len(frame):
            axes[0, 0].plot(frame["unix_s"] - start, frame["power_w"], linewidth=0.8,
                            label=f"rank {int(frame['rank'].iloc[0])}" if len(frames) <= 8 else None)
    axes[0, 0].set_ylabel("GPU power (W)", fontsize=8)
    axes[0, 0].set_title(f"{len(frames)} rank(s)", fontsize=8)
    if len(frames) <= 8 or spans:
        handles, _ = axes[0, 0].get_legend_handles_labels()
        handles += [Patch(color=PHASE_COLORS[p], alpha=0.3, label=p) for p in dict.fromkeys(p for p, _, _ in spans)]
        axes[0, 0].legend(handles=handles, fontsize=6, loc="lower right", ncols=2)
    grid, total = _summed(frames, start)
    if grid is not None:
        axes[1, 0].plot(grid, total, linewidth=0.9, color="k")
    else:
        _empty(axes[1, 0], "the ranks' timelines do not overlap")
    axes[1, 0].set_ylabel("all GPUs (W)", fontsize=8)
    for ax in axes.flat:
        ax.set_xlabel("time since the cell's timeline started (s)", fontsize=8)
        ax.grid(alpha=0.3)
    title = f"cell {cell_id}: GPU power ({caption_text})"
    _title(fig, title)
    notes = [f"n = 1 run (repeat {record.repeat if record else 0}), {len(frames)} rank(s); no interval: "
             "one run's samples" + ("; shaded: rank 0's phases from its record (warm-up before the "
                                    "timeline starts where it ran first; idle: between them)" if spans else
                                    "; no phases: no record beside the timelines")]
    caption(fig, notes)
    return Rendered(f"timeline_{cell_id}", title, fig, notes)


def _summed(frames: list[pd.DataFrame], start: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Every rank's power interpolated onto one grid where all ranks have samples, then summed."""
    series = [(f["unix_s"].to_numpy() - start, f["power_w"].to_numpy()) for f in frames if len(f)]
    if not series:
        return None, None
    lo, hi = max(t[0] for t, _ in series), min(t[-1] for t, _ in series)
    if hi <= lo:
        return None, None
    step = min(float(np.median(np.diff(t))) if len(t) > 1 else hi - lo for t, _ in series) or hi - lo
    grid = np.arange(lo, hi + step / 2, step)
    return grid, sum(np.interp(grid, t, p) for t, p in series)


def save(rendered: Rendered, out: Path) -> Path:
    buffer = io.BytesIO()
    rendered.figure.savefig(buffer, format="png", dpi=110)
    path = out / f"{rendered.name}.png"
    write_atomic(path, buffer.getvalue())
    return path
