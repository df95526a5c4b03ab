"""The serving report: the time-energy frontier (J per output token vs p90 ITL) and the cheapest configuration per latency target."""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path

from w2w.analysis.stats import MEDIAN, Summary, summarize

from w2w.exits import quiet_on_broken_pipe
from w2w.files import write_atomic
from w2w.records import RecordError, read_record

# ML.ENERGY Benchmark v3's inter-token-latency targets (ms); a sweep's own serving.itl_slo_ms are added.
ITL_TARGETS_MS = (50.0, 100.0, 250.0)
FIGURE = "serving_frontier.png"


@dataclass(frozen=True)
class Point:
    """One serving cell over its runs (repeats): its configuration and its figures' mean and 95% interval."""

    cell_id: str
    rate: float
    max_slots: int
    shards: int
    power_cap_w: float | None
    engine: str
    window: str  # steady (the steady-state window) | whole (the whole run: no steady state to speak of)
    j_per_output_token: Summary
    itl_p90_ms: Summary
    ttft_p90_ms: Summary
    j_per_request: Summary
    tokens_per_s: Summary
    j_per_correct: Summary
    overloaded: bool
    flags: tuple[str, ...]
    itl_slo_ms: float | None

    @property
    def label(self) -> str:
        cap = "" if self.power_cap_w is None else f" cap={self.power_cap_w:g}"
        return f"r={self.rate:g} slots={self.max_slots} s={self.shards}{cap}"


def _runs(sweep: Path) -> dict[str, list]:
    """Rank 0's ok records of the serving cells, by cell id (one per run: repeats included)."""
    out: dict[str, list] = {}
    for path in sorted((sweep / "cells").glob("*/rank-00000.json")) + sorted(
            (sweep / "cells").glob("*/repeat-*/rank-00000.json")):
        try:
            record = read_record(path)
        except (RecordError, OSError, ValueError):  # the report names damaged files elsewhere; skip them here
            continue
        if record.ok and record.serving:
            out.setdefault(record.cell_id, []).append(record)
    return out


def _window(serving: dict) -> str:
    steady, whole = serving["steady"], serving["whole"]
    if steady.get("itl_p90_ms") is None or not steady.get("output_tokens"):
        return "whole"
    return "steady" if steady.get("energy_j") is not None or whole.get("energy_j") is None else "whole"


def _point(cell_id: str, records: list) -> Point:
    first = records[0]
    config, serving = first.config or {}, first.serving
    window = _window(serving)
    figures = [r.serving[window] for r in records]

    def j_per_correct(r) -> float | None:
        s = r.serving
        return s["energy_j_ranks"] / s["correct"] if s.get("correct") and s.get("energy_j_ranks") is not None else None

    return Point(
        cell_id=cell_id, rate=float(serving["rate"]), max_slots=int(serving["max_slots"]),
        shards=int(config.get("shards", 1)), power_cap_w=config.get("power_cap_w"), engine=config.get("engine", "fast"),
        window=window,
        j_per_output_token=summarize(f["j_per_output_token"] for f in figures),
        itl_p90_ms=summarize(f["itl_p90_ms"] for f in figures),
        ttft_p90_ms=summarize(f["ttft_p90_ms"] for f in figures),
        j_per_request=summarize(f["j_per_request"] for f in figures),
        tokens_per_s=summarize(f["tokens_per_s"] for f in figures),
        j_per_correct=summarize(j_per_correct(r) for r in records),
        overloaded=any(r.serving["overloaded"] for r in records),
        flags=tuple(dict.fromkeys(flag for r in records for flag in r.serving["flags"])),
        itl_slo_ms=(config.get("serving") or {}).get("itl_slo_ms"),
    )


def load_points(sweep: Path) -> list[Point]:
    """Every serving cell of the sweep, ordered by shards, power cap, slots and rate."""
    points = [_point(cid, records) for cid, records in _runs(sweep).items()]
    return sorted(points, key=lambda p: (p.shards, p.power_cap_w or 0.0, p.max_slots, p.rate))


def on_frontier(points: list[Point]) -> set[str]:
    """The cells no other beats on both p90 ITL and J per output token (means; cells with both figures)."""
    known = [p for p in points if p.itl_p90_ms.mean is not None and p.j_per_output_token.mean is not None]
    return {p.cell_id for p in known if not any(
        q.itl_p90_ms.mean <= p.itl_p90_ms.mean and q.j_per_output_token.mean <= p.j_per_output_token.mean
        and (q.itl_p90_ms.mean, q.j_per_output_token.mean) != (p.itl_p90_ms.mean, p.j_per_output_token.mean)
        for q in known)}


def targets(points: list[Point]) -> list[float]:
    return sorted(set(ITL_TARGETS_MS) | {p.itl_slo_ms for p in points if p.itl_slo_ms is not None})


def cheapest(points: list[Point], target_ms: float, figure: str) -> Point | None:
    """The cell with the least mean `figure` (j_per_request or j_per_correct) whose p90 ITL meets
    target_ms (its upper 95% bound where there are repeats) and whose queue stayed bounded."""
    def meets(p: Point) -> bool:
        itl = p.itl_p90_ms.high if p.itl_p90_ms.high is not None else p.itl_p90_ms.mean
        return not p.overloaded and itl is not None and itl <= target_ms and getattr(p, figure).mean is not None
    fits = [p for p in points if meets(p)]
    return min(fits, key=lambda p: getattr(p, figure).mean) if fits else None


def _fmt(s: Summary, digits: int = 4) -> str:
    """The mean ± its t half-width, or "med m [a, b]" where the median's interval is the one that fits
    (as the cells table writes them: never an interval below zero)."""
    if s.mean is None:
        return "—"
    if s.interval == MEDIAN:
        return f"med {s.median:.{digits}g} [{s.median_low:.{digits}g}, {s.median_high:.{digits}g}]"
    text = f"{s.mean:.{digits}g}"
    return text if s.ci95 is None else f"{text} ± {s.ci95:.2g}"


def table_lines(points: list[Point]) -> list[str]:
    """The frontier table (markdown): one row per serving cell, * on the frontier."""
    best = on_frontier(points)
    lines = ["| cell | config | window | J/output token | p90 ITL (ms) | p90 TTFT (ms) | tokens/s | J/request | "
             "J/correct | frontier | flags |", "|" + "---|" * 11]
    for p in points:
        ttft = "queue (overloaded)" if p.overloaded else _fmt(p.ttft_p90_ms)
        lines.append(f"| {p.cell_id} | {p.label} | {p.window} | {_fmt(p.j_per_output_token)} | {_fmt(p.itl_p90_ms)} | "
                     f"{ttft} | {_fmt(p.tokens_per_s)} | {_fmt(p.j_per_request)} | {_fmt(p.j_per_correct)} | "
                     f"{'*' if p.cell_id in best else ''} | {'; '.join(p.flags)[:80]} |")
    return lines


def cheapest_lines(points: list[Point]) -> list[str]:
    lines = ["| p90 ITL target (ms) | cheapest by J/request | J/request | cheapest by J/correct answer | J/correct |",
             "|---|---|---|---|---|"]
    no_energy = all(p.j_per_request.mean is None for p in points)
    for target in targets(points):
        if no_energy:
            lines.append(f"| {target:g} | no energy figures (no meter) | — | — | — |")
            continue
        by_request, by_correct = cheapest(points, target, "j_per_request"), cheapest(points, target, "j_per_correct")
        lines.append(f"| {target:g} | {by_request.label if by_request else 'none meets it'} | "
                     f"{_fmt(by_request.j_per_request) if by_request else '—'} | "
                     f"{by_correct.label if by_correct else 'none (no energy, or no GSM8K answers)'} | "
                     f"{_fmt(by_correct.j_per_correct) if by_correct else '—'} |")
    return lines


def _bars(figures: list[Summary]) -> list[list[float]]:
    """Error bars around each mean from the interval that fits its runs (w2w.stats: the t interval only
    where it stays above zero, else the median's from the runs themselves), so none reaches zero on the
    log axes; where the median's interval leaves out the mean, that side's bar is empty."""
    def side(f: Summary, end: float | None, sign: float) -> float:
        return 0.0 if end is None or f.mean is None else max(0.0, sign * (end - f.mean))
    return [[side(f, f.low, -1.0) for f in figures], [side(f, f.high, 1.0) for f in figures]]


def plot(points: list[Point], path: Path) -> Path | None:
    """J per output token against p90 ITL, 95% intervals as error bars, the frontier joined; None without energy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    known = [p for p in points if p.itl_p90_ms.mean is not None and p.j_per_output_token.mean is not None]
    if not known:
        return None
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for slots in sorted({p.max_slots for p in known}):
        group = [p for p in known if p.max_slots == slots]
        ax.errorbar([p.itl_p90_ms.mean for p in group], [p.j_per_output_token.mean for p in group],
                    xerr=_bars([p.itl_p90_ms for p in group]), yerr=_bars([p.j_per_output_token for p in group]),
                    fmt="o", capsize=3, label=f"max_slots={slots}")
        for p in group:
            ax.annotate(f"r={p.rate:g}" + (" (queue)" if p.overloaded else ""), (p.itl_p90_ms.mean,
                        p.j_per_output_token.mean), fontsize=7, xytext=(4, 3), textcoords="offset points")
    best = sorted((p for p in known if p.cell_id in on_frontier(known)), key=lambda p: p.itl_p90_ms.mean)
    ax.plot([p.itl_p90_ms.mean for p in best], [p.j_per_output_token.mean for p in best], "k--", lw=1, label="frontier")
    # Log axes, limits from the means: an interval from few repeats can be wider than the spread of the cells.
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap on a short log axis
    xs, ys = [p.itl_p90_ms.mean for p in known], [p.j_per_output_token.mean for p in known]
    ax.set_xlim(min(xs) / 2, max(xs) * 2)
    ax.set_ylim(min(ys) / 2, max(ys) * 2)
    for target in ITL_TARGETS_MS:  # ML.ENERGY's ITL targets, where they fall inside the axes
        if min(xs) / 2 <= target <= max(xs) * 2:
            ax.axvline(target, color="grey", lw=0.6, ls=":")
            ax.annotate(f"{target:g} ms", (target, min(ys) / 1.9), fontsize=7, color="grey")
    ax.set_xlabel("p90 inter-token latency (ms)")
    ax.set_ylabel("J per output token")
    ax.set_title("Time-energy frontier (serving cells; bars: the 95% interval that fits the repeats)")
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())
    return path


def report_lines(sweep: Path, out: Path | None = None) -> list[str]:
    """The serving section: the frontier table, the cheapest configuration per target, the figure."""
    points = load_points(sweep)
    if not points:
        return []
    lines = ["## Serving: time-energy frontier", "", *table_lines(points), "",
             "### Cheapest configuration meeting each p90 ITL target", "", *cheapest_lines(points), ""]
    if all(p.j_per_output_token.mean is None for p in points):
        lines.append("No energy figures: these cells ran without an energy meter (energy.source none), so there "
                     "is no frontier to draw; latency and throughput are measured.")
    else:
        png = plot(points, (out or sweep) / FIGURE)
        lines.append(f"![frontier]({png.name})" if png else "")
    return lines


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="w2w-serving", description=__doc__)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="folder for the figure (default: the sweep)")
    args = parser.parse_args(argv)
    if not (args.sweep / "cells").is_dir():
        print(f"w2w-serving: error: {args.sweep} has no cells/ folder: give a sweep_dir that w2w ran", file=sys.stderr)
        return 2
    lines = report_lines(args.sweep, args.out)
    if not lines:
        print(f"w2w-serving: error: {args.sweep} has no finished scenario=serving cell: run some first",
              file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
