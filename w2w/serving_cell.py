"""Measure one scenario=serving cell on this rank: arrivals, the continuous batch in one energy window, per-request lines."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from w2w import distributed
from w2w.arrivals import draw
from w2w.cell import Cell
from w2w.cell_lock import batch_writer
from w2w.cell_record import (
    batch_energy,
    cell_energy,
    gpu_state,
    window_flags,
    window_state,
    write_timeline,
)
from w2w.data import Prompt
from w2w.energy.monitor import EnergyMonitor
from w2w.energy.phases import PhaseEnergy
from w2w.energy.sampler import summarize as summarize_samples
from w2w.engines import SPECS, prompt_room
from w2w.engines.common import ENDINGS, SamplingParams, new_generator
from w2w.engines.serving import DECODE_STEP, PREFILL_STEP, ContinuousBatch, Request, ServeResult
from w2w.measure import WARMUP_TOKENS, CellResult, Loaded
from w2w.progress import CellProgress, CellShape
from w2w.records import Batch, BatchCounts, BatchTimes, Counts, Segment, Telemetry, Times, Totals
from w2w.responses import Responses, responses_path
from w2w.serving_stats import StepShare, request_energy, summarize
from w2w.tokenizer import encode_prompts

log = logging.getLogger("w2w.run")


def _decide() -> Callable[[int], int] | None:
    """Rank 0's admission count seen by every rank (None alone: no broadcast)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return None
    return distributed.broadcast_int


def _serve(cell: Cell, loaded: Loaded, requests: list[Request], cache_len: int, params: SamplingParams,
           generator: torch.Generator) -> ServeResult:
    engine = loaded.engines[cell.engine]
    batch = ContinuousBatch(engine, cell.serving.max_slots, cache_len, params, loaded.tokenizer.eos_id, generator)
    with torch.inference_mode():
        return batch.serve(requests, time.monotonic, time.sleep, _decide())


def _lines(cell: Cell, rows: list[Prompt], arrivals, result: ServeResult, texts: list[str], start_unix_s: float,
           energy_j: dict[int, float] | None, above_j: dict[int, float] | None) -> tuple[list[dict], Responses]:
    """The per-request lines of responses.jsonl (times in s from the serve loop's start; *_unix_s absolute)."""
    responses = Responses(cell.dataset.name, keep=True)
    responses.add([rows[a.row] for a in arrivals], [s.prompt_tokens for s in result.served],
                  [s.tokens for s in result.served], texts, [s.ended_by for s in result.served])
    seen: set[str] = set()
    for k, (line, served) in enumerate(zip(responses.lines, result.served, strict=True)):
        pid = str(line["prompt_id"])
        line["prompt_id"] = pid if pid not in seen else f"{pid}/request-{k}"  # a row sent again: ids stay unique
        seen.add(pid)
        line.update({
            "request": served.index, "warmup": served.index < cell.serving.warmup_requests, "slot": served.slot,
            "arrival_s": served.arrival_s, "admit_s": served.admit_s, "first_token_s": served.first_token_s,
            "finish_s": served.finish_s, "arrival_unix_s": start_unix_s + served.arrival_s,
            "ttft_s": served.first_token_s - served.arrival_s, "token_s": served.token_s,
            "itl_s": [b - a for a, b in zip(served.token_s, served.token_s[1:], strict=False)],
            "ended_by": served.ended_by,
            "energy_j": None if energy_j is None else energy_j.get(served.index, 0.0),
            "energy_above_idle_j": None if above_j is None else above_j.get(served.index, 0.0),
        })
    return responses.lines, responses


def run_serving_cell(
    cell: Cell, rows: list[Prompt], loaded: Loaded, monitor: EnergyMonitor, *, timeline: Path | None = None,
    rank: int = 0, progress: CellProgress | None = None, segment: Segment | None = None,
) -> CellResult:
    """Serve the cell's arrivals once, whole: a serving cell is one time series, so a preempted one
    restarts from its first request (and says so); returns what it measured (one Batch: the serve)."""
    model = loaded.model
    fits = prompt_room(cell.engine, model.args.max_seq_len, cell.max_gen_len)
    cut_to = None if cell.dataset.max_prompt_tokens is None else min(cell.dataset.max_prompt_tokens, fits)
    prompts, truncated = encode_prompts([r.text for r in rows], loaded.tokenizer, cut_to, fits)
    cache_len = SPECS[cell.engine].cache_len(max(len(p) for p in prompts) + cell.max_gen_len, model.args.max_seq_len)
    arrivals = draw(cell, len(rows))
    requests = [Request(i, prompts[a.row], a.offset_s) for i, a in enumerate(arrivals)]
    if progress is None:
        progress = CellProgress(CellShape(cell.id, rank, 1, max(len(rows), 1), 1), None)
    restarts = progress.abandoned  # earlier attempts that began this cell and were cut off mid-serve
    if restarts:
        log.warning("serving cell %s restarts whole: %d earlier job attempt(s) were cut off mid-serve, and a "
                    "serving cell is one time series (their partial serves are discarded)", cell.id, restarts)
    params = SamplingParams.of(cell)
    warmup = None
    if cell.warmup:  # allocation, kernel choice and the graph capture of this slot count, outside the windows
        monitor.begin_window("warmup")
        first = [Request(i, r.prompt, 0.0) for i, r in enumerate(requests[: cell.serving.max_slots])]
        _serve(cell, loaded, first, cache_len, SamplingParams.of(cell, min(WARMUP_TOKENS, cell.max_gen_len)),
               new_generator(model.device, cell.seed))
        warmup = monitor.end_window("warmup")
    progress.begin_segment(dataclasses.replace(
        segment or Segment(segment=0), start_unix_s=time.time(), warmup_s=warmup.duration_s if warmup else 0.0,
        warmup_gpu_j=warmup.gpu_j if warmup else None))
    progress.save()
    phases = PhaseEnergy(monitor)
    monitor.begin_window("cell")
    monitor.begin_window("batch")
    start_unix_s = time.time()
    result = _serve(cell, loaded, requests, cache_len, params, new_generator(model.device, cell.seed))
    batch_window = monitor.end_window("batch")
    window = monitor.end_window("cell")
    steps = [StepShare(s.end_s, s.positions) for s in result.steps]
    idle_w = progress.segments[-1].idle_power_w
    cell_j = distributed.sum_over_ranks(batch_window.gpu_j)
    idle_j = distributed.sum_over_ranks(None if idle_w is None else idle_w * batch_window.duration_s)
    above = None if cell_j is None or idle_j is None else cell_j - idle_j
    energy_j = None if cell_j is None else request_energy(steps, cell_j)
    above_j = None if above is None else request_energy(steps, above)
    texts = [loaded.tokenizer.decode(s.tokens) for s in result.served]
    lines, responses = _lines(cell, rows, arrivals, result, texts, start_unix_s, energy_j, above_j)
    period = batch_window.period_s
    summary = summarize(lines, steps, max_slots=cell.serving.max_slots, warmup=cell.serving.warmup_requests,
                        cell_j=cell_j, slo={"ttft_slo_ms": cell.serving.ttft_slo_ms,
                                            "itl_slo_ms": cell.serving.itl_slo_ms},
                        min_steady_s=None if period is None else period * cell.energy.min_window_periods)
    summary |= {"energy_j_ranks": cell_j, "energy_above_idle_j_ranks": above, "requests": len(lines),
                "max_slots": cell.serving.max_slots, "rate": cell.serving.rate, "correct": responses.correct,
                "scored": responses.scored,
                "restarted_whole": restarts}
    if rank == 0:
        responses.write(responses_path(cell.sweep_dir, cell.id, cell.repeat))
    for flag in summary["flags"]:
        log.warning("serving cell %s: %s", cell.id, flag)
    spans = {PREFILL_STEP: 0.0, DECODE_STEP: 0.0}
    for k, s in enumerate(result.steps):
        spans[s.kind] += s.end_s - (result.steps[k - 1].end_s if k else 0.0)
    entry = Batch(
        index=0, segment=0,
        counts=BatchCounts(prompts=len(lines), responses=len(lines), prompt_tokens=sum(s.prompt_tokens for s in result.served),
                           output_tokens=sum(len(s.tokens) for s in result.served),
                           positions=sum(s.computed for s in result.steps),
                           output_words=sum(len(t.split()) for t in texts), scored=responses.scored,
                           correct=responses.correct, unscorable=responses.unscorable,
                           **{f"ended_{how}": responses.ended.get(how, 0) for how in ENDINGS}),
        times=BatchTimes(start_unix_s=batch_window.start_unix_s, total_s=batch_window.duration_s,
                         prefill_s=spans[PREFILL_STEP], decode_s=spans[DECODE_STEP]),
        energy=batch_energy(batch_window, None, None), gpu_state=window_state(batch_window), **batch_writer(),
    )
    progress.add_batch(entry, save=batch_window.error is None)
    totals = Totals.of(progress.batches, progress.segments)
    errors = [e for e in (window.error, batch_window.error) if e]
    return CellResult(
        counts=Counts(**totals.counts, truncated_prompts=truncated),
        times=Times(**totals.times, warmup_s=warmup.duration_s if warmup else 0.0),
        energy=dataclasses.replace(cell_energy(window, phases, warmup, monitor), **totals.energy,
                                   **window_flags(progress.batches, cell.energy.min_window_periods)),
        gpu_state=gpu_state(window, progress.batches, None),
        telemetry=Telemetry.from_dict(summarize_samples(window.samples, monitor.memory_total_mib,
                                                        list(window.telemetry_errors), window.t0_monotonic_s,
                                                        window.t0_monotonic_s + window.duration_s)),
        timeline=write_timeline(timeline, window, rank),
        batches=list(progress.batches), segments=progress.used_segments(),
        responses={"requested": cell.save_responses, "saved": rank == 0, "file": responses_path(
            cell.sweep_dir, cell.id, cell.repeat).name if rank == 0 else None, "score_reason": None},
        graph=loaded.engines[cell.engine].graph, decode_step=loaded.engines[cell.engine].decode_step,
        serving=summary,
        error=f"EnergyError: {errors[0]}" if errors else None,
    )
