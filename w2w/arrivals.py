"""A serving cell's requests: when each arrives (drawn from the cell's seed, or read from a trace) and which prompt it sends."""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from w2w.cell import Cell, ServingConfig
from w2w.errors import ConfigError


@dataclass(frozen=True)
class Arrival:
    """One request: its offset from the cell's start (s) and the dataset row it sends."""

    offset_s: float
    row: int


def read_trace(path: str | Path) -> list[Arrival]:
    """A trace file's arrivals: lines "offset_s,row" or JSON objects {"offset_s": .., "row": ..}; '#' comments.
    Raises ConfigError naming serving.trace_path and the line at fault."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"serving.trace_path={path}: cannot be read ({exc.strerror}): give a file of "
                          f"lines 'offset_s,row'") from exc
    arrivals = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith("{"):
                item = json.loads(line)
                offset, row = float(item["offset_s"]), int(item["row"])
            else:
                first, second = line.split(",")[:2]
                offset, row = float(first), int(second)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"serving.trace_path={path}: line {number} is not 'offset_s,row' ({exc})") from exc
        arrivals.append(Arrival(offset, row))
    return arrivals


def trace_problem(path: str | Path, num_prompts: int) -> str | None:
    """Why a trace cannot be served from num_prompts dataset rows (unsorted, negative, a row the
    dataset lacks, empty), or None."""
    try:
        arrivals = read_trace(path)
    except ConfigError as exc:
        return str(exc)
    if not arrivals:
        return f"serving.trace_path={path}: has no arrivals: give lines 'offset_s,row'"
    for a, b in itertools.pairwise(arrivals):
        if b.offset_s < a.offset_s:
            return f"serving.trace_path={path}: offsets are not sorted ({b.offset_s} after {a.offset_s}): sort the file"
    bad = next((a for a in arrivals if a.offset_s < 0 or not 0 <= a.row < num_prompts), None)
    if bad is not None:
        return (f"serving.trace_path={path}: arrival ({bad.offset_s}, row {bad.row}) is negative or names a row "
                f"the dataset lacks (dataset.num_prompts={num_prompts}): raise dataset.num_prompts or fix the trace")
    return None


def gaps(serving: ServingConfig, count: int, rng: random.Random) -> list[float]:
    """Inter-arrival gaps (s): exponential (poisson) or gamma with shape 1/cv^2, both of mean 1/rate."""
    if math.isinf(serving.rate):
        return [0.0] * count
    if serving.arrival == "gamma":
        shape = 1.0 / serving.cv ** 2
        return [rng.gammavariate(shape, 1.0 / (shape * serving.rate)) for _ in range(count)]
    return [rng.expovariate(serving.rate) for _ in range(count)]


def draw(cell: Cell, num_prompts: int) -> list[Arrival]:
    """The cell's requests in arrival order, the same on every run of the cell (seeded with cell.seed).

    Request i sends row i mod num_prompts; the first arrives at t = 0 (so a cell's clock starts with
    its first request); duration_s drops those arriving later."""
    serving = cell.serving
    if serving.arrival == "trace":
        arrivals = read_trace(serving.trace_path)
    else:
        count = serving.num_requests or num_prompts
        offsets, t = [], 0.0
        for gap in [0.0, *gaps(serving, count - 1, random.Random(f"w2w-arrivals-{cell.seed}"))]:
            t += gap
            offsets.append(t)
        arrivals = [Arrival(t, i % num_prompts) for i, t in enumerate(offsets)]
    if serving.duration_s is not None:
        arrivals = [a for a in arrivals if a.offset_s <= serving.duration_s]
    return arrivals
