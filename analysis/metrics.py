"""The paper's metrics, each defined once, computed from a cell's totals over all of its ranks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class CellTotals:
    """What the ranks of one cell measured together."""

    total_s: float  # wall time of the cell: the slowest rank's window
    responses: int
    output_tokens: int  # returned: after the EOS cut (the paper's tokens)
    output_words: int
    energy_j: float | None  # every GPU of the cell summed; None where any rank had no meter
    idle_energy_j: float | None = None  # sum over GPUs of idle power x that GPU's window; None where any had none
    scored: int = 0  # responses with a reference answer (GSM8K), scored by w2w.scoring
    correct: int = 0  # of those, the ones whose answer matched
    batches: int = 0  # generate() calls; a response waits for its whole batch
    # Rows of every forward call (prompt rows, rows past EOS included); None: not recorded (older records).
    positions: int | None = None
    # Static: each GPU's loaded-and-waiting power x its time; dynamic: the rest (None: not measured).
    static_energy_j: float | None = None
    dynamic_energy_j: float | None = None


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    definition: str
    compute: Callable[[CellTotals], float | None]


def _per_second(count: Callable[[CellTotals], float]) -> Callable[[CellTotals], float | None]:
    return lambda c: count(c) / c.total_s if c.total_s > 0 else None


def _energy_per(count: Callable[[CellTotals], float]) -> Callable[[CellTotals], float | None]:
    return lambda c: c.energy_j / count(c) if c.energy_j is not None and count(c) > 0 else None


METRICS: tuple[Metric, ...] = (
    Metric("words_per_s", "words/s", "output words (split on whitespace) / total run time",
           _per_second(lambda c: c.output_words)),
    Metric("tokens_per_s", "tokens/s", "output tokens / total run time", _per_second(lambda c: c.output_tokens)),
    Metric("responses_per_s", "responses/s", "responses / total run time", _per_second(lambda c: c.responses)),
    Metric("energy_per_s_w", "W", "energy of all GPUs / total run time",
           lambda c: c.energy_j / c.total_s if c.energy_j is not None and c.total_s > 0 else None),
    Metric("energy_per_token_j", "J/token", "energy of all GPUs / returned tokens (after the EOS cut; the paper's)",
           _energy_per(lambda c: c.output_tokens)),
    Metric("energy_per_position_j", "J/position", "energy of all GPUs / positions computed (every row of every "
           "forward call: prompt rows and rows past EOS included)",
           _energy_per(lambda c: c.positions or 0)),  # unknown positions (older records): no figure
    Metric("energy_per_response_j", "J/response", "energy of all GPUs / responses", _energy_per(lambda c: c.responses)),
    Metric("energy_j_above_idle", "J", "energy of all GPUs - each GPU's idle power x its run time",
           lambda c: c.energy_j - c.idle_energy_j if c.energy_j is not None and c.idle_energy_j is not None else None),
    Metric("static_energy_per_token_j", "J/token", "static energy (each GPU's power loaded and waiting, "
           "measured per cell after its warm-up, x its time) / returned tokens",
           lambda c: c.static_energy_j / c.output_tokens if c.static_energy_j is not None and c.output_tokens else None),
    Metric("dynamic_energy_per_token_j", "J/token", "energy of all GPUs - their static energy, / returned tokens",
           lambda c: c.dynamic_energy_j / c.output_tokens
           if c.dynamic_energy_j is not None and c.output_tokens else None),
    Metric("seconds_per_response", "s/response", "total run time / batches: how long a response waits for "
           "its batch (prefill and decode)", lambda c: c.total_s / c.batches if c.batches > 0 else None),
    Metric("accuracy", "fraction", "correct answers / scored responses (GSM8K: w2w.scoring)",
           lambda c: c.correct / c.scored if c.scored > 0 else None),
    Metric("energy_per_correct_j", "J/correct answer", "energy of all GPUs / correct answers",
           lambda c: c.energy_j / c.correct if c.energy_j is not None and c.scored > 0 and c.correct > 0 else None),
)
METRIC_NAMES = tuple(m.name for m in METRICS)


def compute(totals: CellTotals) -> dict[str, float | None]:
    return {m.name: m.compute(totals) for m in METRICS}
