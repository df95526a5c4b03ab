"""A serving cell's figures from its requests' timestamps: energy per request, latency percentiles, steady state."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

PERCENTILES = (50, 90, 99)
# Overload: the later requests wait this many service times longer than the first ones.
OVERLOAD_SERVICE_TIMES = 2.0


@dataclass(frozen=True)
class StepShare:
    """One forward pass as the energy rule sees it: when it ended (s from the serve loop's start)
    and the positions each request computed in it."""

    end_s: float
    positions: dict[int, int]


def step_weights(steps: list[StepShare]) -> list[float]:
    """Each step's share of the cell's energy: its duration (from the previous step's end; the first
    from the loop's start) over the sum of them. The cell's window is longer than the loop by its
    edges; its energy is spread over the steps in the same proportion, so the shares sum to 1."""
    spans = [max(s.end_s - (steps[k - 1].end_s if k else 0.0), 0.0) for k, s in enumerate(steps)]
    total = sum(spans)
    if total <= 0:
        return [1.0 / len(steps)] * len(steps) if steps else []
    return [span / total for span in spans]


def request_energy(steps: list[StepShare], cell_j: float) -> dict[int, float]:
    """Each request's energy (J): of every step it took part in, the step's energy (step_weights x
    cell_j) times the positions the request computed over those all its requests computed (idle
    slots' positions are shared out so). The requests' energies sum to cell_j."""
    out: dict[int, float] = {}
    for step, weight in zip(steps, step_weights(steps), strict=True):
        work = sum(step.positions.values())
        for index, positions in step.positions.items():
            out[index] = out.get(index, 0.0) + cell_j * weight * positions / work
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    data = sorted(values)
    rank = (len(data) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return data[low] + (data[high] - data[low]) * (rank - low)


def itls_s(token_s: list[float]) -> list[float]:
    """Inter-token latencies: the gaps between a request's successive output tokens."""
    return [b - a for a, b in itertools.pairwise(token_s)]


def steady_window(requests: list[dict], max_slots: int, warmup: int) -> tuple[float, float, str]:
    """(start_s, end_s, basis): from the first moment every slot is busy to the last arrival
    ("all slots busy"); where the slots never all fill (light load), from the first arrival after
    the warm-up requests to the last arrival ("arrivals after warm-up")."""
    last_arrival = max(r["arrival_s"] for r in requests)
    events = sorted([(r["admit_s"], 1) for r in requests] + [(r["finish_s"], -1) for r in requests],
                    key=lambda e: (e[0], e[1]))
    busy = 0
    for t, change in events:
        busy += change
        if busy >= max_slots and t <= last_arrival:
            return t, last_arrival, "all slots busy"
    arrivals = sorted(r["arrival_s"] for r in requests)
    return arrivals[min(warmup, len(arrivals) - 1)], last_arrival, "arrivals after warm-up"


def overloaded(requests: list[dict]) -> bool:
    """Whether the queue grew without bound: the last third of the requests (by arrival) waited
    for a slot OVERLOAD_SERVICE_TIMES median service times longer than the first third did."""
    order = sorted(requests, key=lambda r: r["arrival_s"])
    third = max(len(order) // 3, 1)
    if len(order) < 3:
        return False
    waits = [r["admit_s"] - r["arrival_s"] for r in order]
    service = percentile([r["finish_s"] - r["admit_s"] for r in order], 50) or 0.0
    first, last = percentile(waits[:third], 50), percentile(waits[-third:], 50)
    return last - first > OVERLOAD_SERVICE_TIMES * max(service, 1e-9)


def figures(requests: list[dict], span_s: float, energy_j: float | None, tokens: int, completed: int,
            slo: dict[str, float | None], queue_bound: bool) -> dict[str, Any]:
    """The figures of one window: rates, latency percentiles (ms), J per request and token, mean W,
    and the share of requests within each target. queue_bound: TTFT only measures the queue (None)."""
    ttft_ms = [1e3 * (r["first_token_s"] - r["arrival_s"]) for r in requests]
    itl_ms = [1e3 * gap for r in requests for gap in itls_s(r["token_s"])]
    out: dict[str, Any] = {
        "span_s": span_s, "requests": len(requests), "completed": completed, "output_tokens": tokens,
        "requests_per_s": completed / span_s if span_s > 0 else None,
        "tokens_per_s": tokens / span_s if span_s > 0 else None,
        "energy_j": energy_j,
        "j_per_request": energy_j / completed if energy_j is not None and completed else None,
        "j_per_output_token": energy_j / tokens if energy_j is not None and tokens else None,
        "mean_w": energy_j / span_s if energy_j is not None and span_s > 0 else None,
    }
    for q in PERCENTILES:
        out[f"ttft_p{q}_ms"] = None if queue_bound else percentile(ttft_ms, q)
        out[f"itl_p{q}_ms"] = percentile(itl_ms, q)
    if slo.get("ttft_slo_ms") is not None:
        within = sum(t <= slo["ttft_slo_ms"] for t in ttft_ms)
        out["within_ttft_slo"] = None if queue_bound or not requests else within / len(requests)
    if slo.get("itl_slo_ms") is not None:
        p90s = [percentile([1e3 * g for g in itls_s(r["token_s"])], 90) for r in requests]
        within = sum(p is None or p <= slo["itl_slo_ms"] for p in p90s)
        out["within_itl_slo"] = within / len(requests) if requests else None
    return out


def summarize(requests: list[dict], steps: list[StepShare], *, max_slots: int, warmup: int, cell_j: float | None,
              slo: dict[str, float | None], min_steady_s: float | None) -> dict[str, Any]:
    """The cell's serving block: the whole run and the steady-state window side by side, and flags.

    requests: the per-request lines (arrival_s, admit_s, first_token_s, finish_s, token_s,
    energy_j; s from the loop's start). Warm-up requests count in the energy and the rates, not in
    the latency figures. min_steady_s: the energy meter's shortest trustworthy window."""
    measured = [r for r in requests if not r.get("warmup")]
    queue_bound = overloaded(requests)
    end_s = max(r["finish_s"] for r in requests)
    whole = figures(measured, end_s, cell_j, sum(len(r["token_s"]) for r in requests), len(requests), slo, queue_bound)
    start, stop, basis = steady_window(requests, max_slots, warmup)
    inside = [r for r in measured if start <= r["arrival_s"] <= stop]
    tokens = sum(start <= t <= stop for r in requests for t in r["token_s"])
    done = sum(start <= r["finish_s"] <= stop for r in requests)
    steady = figures(inside, stop - start, window_energy(steps, cell_j, start, stop), tokens, done, slo, queue_bound)
    flags = []
    if queue_bound:
        flags.append("queue grew without bound: the rate is above capacity; TTFT only measures the queue "
                     "(left out), the throughput is the capacity")
    if min_steady_s is not None and stop - start < min_steady_s:
        flags.append(f"steady state {stop - start:.3g} s is shorter than the energy meter allows "
                     f"({min_steady_s:.3g} s: energy.min_window_periods update periods)")
    return {"steady_basis": basis, "steady_start_s": start, "steady_end_s": stop,
            "whole": whole, "steady": steady, "flags": flags, "overloaded": queue_bound}


def window_energy(steps: list[StepShare], cell_j: float | None, start_s: float, stop_s: float) -> float | None:
    """The energy of the steps that ended inside [start_s, stop_s] (the steady window's J)."""
    if cell_j is None:
        return None
    return sum(cell_j * w for s, w in zip(steps, step_weights(steps), strict=True) if start_s <= s.end_s <= stop_s)
