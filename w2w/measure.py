"""Measure one cell on this rank: warm-up, its batches in energy windows, and its record."""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from w2w import distributed, signals
from w2w.cell import OFFLINE, Cell
from w2w.cell_lock import batch_writer
from w2w.cell_record import (
    batch_energy,
    cell_energy,
    checked_energy,
    failed,
    gpu_state,
    identity,
    job_segment,
    responses_block,
    window_flags,
    window_state,
    write_timeline,
)
from w2w.data import Prompt
from w2w.energy.errors import ClockError, PowerCapError
from w2w.energy.monitor import EnergyMonitor, Window
from w2w.energy.phases import PhaseEnergy
from w2w.energy.powercap import PowerCapper
from w2w.energy.sampler import summarize
from w2w.engines import prompt_room
from w2w.engines.common import (
    DECODE,
    ENDINGS,
    PREFILL,
    Engine,
    Generation,
    KvCache,
    PhaseClock,
    SamplingParams,
    new_generator,
)
from w2w.model import Transformer
from w2w.progress import CellProgress, CellShape, progress_path
from w2w.records import (
    STATUS_OK,
    Batch,
    BatchCounts,
    BatchTimes,
    Counts,
    Energy,
    GpuState,
    RankRecord,
    Segment,
    Telemetry,
    Times,
    Totals,
    timeline_path,
)
from w2w.responses import Responses, first_missing_part, response_part_path
from w2w.tokenizer import TokenizerLike, encode_prompts

log = logging.getLogger("w2w.run")
WARMUP_TOKENS = 4


@dataclass(frozen=True)
class Loaded:
    """What a job loads once for all its cells: this rank's model shard, the tokenizer, the engines
    (by name, each created once so that the state it keeps, such as CUDA graphs, is reused), and the
    job's own energy (load and idle baseline), which no cell counts."""

    model: Transformer
    tokenizer: TokenizerLike
    engines: dict[str, Engine]  # engine name -> w2w.engines.<name>.Engine over `model`
    job_energy: dict


def weight_bytes(model: Transformer) -> int:
    """Bytes of this rank's shard that every decode step reads: every parameter but the embedding table
    (a step reads only its batch's rows of it)."""
    table = {id(p) for p in model.tok_embeddings.parameters()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in table)


def decode_read_bytes(model: Transformer, weights_b: int, rows: int, prompt_len: int, steps: int) -> float:
    """Bytes the batch's decode steps read on this rank: the weights once per step, and the KV cache of
    every row up to the step's position (step t reads prompt_len + t + 1 positions). An estimate: it
    leaves out activations and what the caches hold past those positions."""
    args = model.args
    element = next(model.parameters()).element_size()
    per_position = 2 * args.n_layers * model.layers[0].attention.local_kv_heads * (args.dim // args.n_heads) * element
    positions = steps * prompt_len + steps * (steps + 1) // 2
    return float(steps * weights_b + per_position * rows * positions)


def batch_counts(gen: Generation, texts: list[str], responses: Responses,
                 decode_read_b: float | None = None) -> BatchCounts:
    """What one batch produced (`batches` and `truncated_prompts` belong to the whole cell's Counts)."""
    return BatchCounts(
        prompts=len(gen.tokens),
        responses=len(gen.tokens),
        prompt_tokens=gen.prompt_tokens,
        output_tokens=sum(len(t) for t in gen.tokens),
        positions=gen.positions,
        output_words=sum(len(text.split()) for text in texts),  # the paper's words: split on whitespace
        scored=responses.scored,
        correct=responses.correct,
        unscorable=responses.unscorable,
        **{f"ended_{how}": responses.ended.get(how, 0) for how in ENDINGS},
        decode_steps=gen.decode_steps,
        decode_read_bytes=decode_read_b,
    )


@dataclass
class _BatchResponses:
    """One batch's prompt rows, and where rank 0 keeps their responses until the cell ends."""

    cell: Cell
    index: int
    rows: list[Prompt]
    rank: int

    def score(self, batch: list[list[int]], gen: Generation, texts: list[str]) -> Responses:
        """The batch's responses, scored and counted by how they ended; with save_responses, rank 0
        writes the batch's lines (every rank scores: the ranks' tokens are identical)."""
        cell = self.cell
        responses = Responses(cell.dataset.name, keep=cell.save_responses and self.rank == 0)
        responses.add(self.rows, [len(p) for p in batch], gen.tokens, texts, gen.ended_by)
        if responses.keep:  # before the batch counts as done: a resumed cell finds every earlier batch's part
            responses.write(response_part_path(cell.sweep_dir, cell.id, self.index, cell.repeat))
        return responses


@dataclass
class _CellRun:
    """What every batch of one cell shares on this rank."""

    cell: Cell
    loaded: Loaded
    cache_len: int
    clock: PhaseClock
    phases: PhaseEnergy
    stream: torch.Generator  # the cell's sampling stream on this rank, drawn by its batches in turn
    weights_b: int = 0  # bytes of this rank's weights a decode step reads (weight_bytes)

    def generate(self, batch: list[list[int]], max_gen_len: int | None = None,
                 clock: PhaseClock | None = None, generator: torch.Generator | None = None) -> Generation:
        tokenizer = self.loaded.tokenizer
        engine = self.loaded.engines[self.cell.engine]
        return engine.generate(batch, SamplingParams.of(self.cell, max_gen_len), tokenizer.eos_id,
                               tokenizer.pad_id, self.cache_len, clock, generator, cache_batch=self.cell.batch_size)


def stream_state(generator: torch.Generator) -> str:
    """The stream's state as text for the progress file."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def cell_stream(cell: Cell, device: torch.device, progress: CellProgress) -> torch.Generator:
    """The cell's sampling stream on this rank: seeded at the cell's start, or where its finished
    batches left it (a resumed cell samples what an uninterrupted one would have)."""
    generator = new_generator(device, cell.seed)
    saved = progress.stream_state
    if progress.done and saved is None:
        log.warning("cell %s: no sampling state saved after batch %d: sampled tokens restart the stream",
                    cell.id, progress.done)
    if progress.done and saved is not None:
        generator.set_state(torch.frombuffer(bytearray(base64.b64decode(saved)), dtype=torch.uint8))
    return generator


def _warm_up(run: _CellRun, batches: list[list[list[int]]], monitor: EnergyMonitor) -> Window | None:
    """First calls pay for allocation, kernel selection and (fast) a graph capture per batch shape:
    one batch of each size the cell will run (a ragged last one too), largest first so the cache is
    allocated once, all outside the cell's windows (every segment)."""
    if not run.cell.warmup:
        return None
    firsts = {len(batch): batch for batch in reversed(batches)}  # the first batch of each size
    monitor.begin_window("warmup")
    # A stream of its own leaves the cell's undrawn.
    warmup_stream = new_generator(run.stream.device, run.cell.seed)
    for size in sorted(firsts, reverse=True):  # the cache is sized for the cell's max_gen_len
        run.generate(firsts[size], min(WARMUP_TOKENS, run.cell.max_gen_len), generator=warmup_stream)
    return monitor.end_window("warmup")


def _run_batch(run: _CellRun, batch: list[list[int]], responses: _BatchResponses) -> tuple[Batch, str | None]:
    """One batch in an energy window of its own: its entry for the progress file (numbered there), and
    its window's error."""
    clock, phases = run.clock, run.phases
    seconds, joules = dict(clock.seconds), dict(phases.joules)
    phases.monitor.begin_window("batch")
    gen = run.generate(batch, clock=clock, generator=run.stream)
    window = phases.monitor.end_window("batch")
    texts = [run.loaded.tokenizer.decode(t) for t in gen.tokens]

    def joules_in(phase: str) -> float | None:
        now, then = phases.joules.get(phase), joules.get(phase, 0.0)
        return None if now is None or then is None else now - then

    entry = Batch(
        index=0, segment=0,
        counts=batch_counts(gen, texts, responses.score(batch, gen, texts),
                            decode_read_bytes(run.loaded.model, run.weights_b, len(batch), max(map(len, batch)),
                                              gen.decode_steps)),
        times=BatchTimes(start_unix_s=window.start_unix_s, total_s=window.duration_s,
                         prefill_s=clock.seconds[PREFILL] - seconds[PREFILL],
                         decode_s=clock.seconds[DECODE] - seconds[DECODE]),
        energy=batch_energy(window, joules_in(PREFILL), joules_in(DECODE)),
        gpu_state=window_state(window),
        **batch_writer(),
    )
    return entry, window.error


@dataclass(frozen=True)
class CellResult:
    """What run_cell measured on this rank: the record's measured sections, summed over the batches of
    every segment (job attempt) that ran the cell, and the first error that voids them (None: ok)."""

    counts: Counts
    times: Times
    energy: Energy
    gpu_state: GpuState | None
    telemetry: Telemetry
    timeline: str | None  # the timeline file's name, beside the record
    batches: list[Batch]
    segments: list[Segment]
    responses: dict
    graph: str | None
    decode_step: str | None  # the decode-step variant that ran (the engine's spec)
    kv_cache: KvCache | None = None  # the KV cache the engine held at the cell's end on this rank
    error: str | None = None
    serving: dict | None = None  # scenario=serving: the cell's serving figures (w2w.serving_stats.summarize)

    def onto(self, record: RankRecord) -> RankRecord:
        """`record` (the cell's identity) with these sections, status ok or error."""
        return dataclasses.replace(
            record, status=STATUS_OK if self.error is None else "error", error=self.error, counts=self.counts,
            times=self.times, energy=self.energy, gpu_state=self.gpu_state, telemetry=self.telemetry,
            timeline=self.timeline, batches=self.batches, segments=self.segments, responses=self.responses,
            graph=self.graph, decode_step=self.decode_step, serving=self.serving,
            kv_cache_shape=None if self.kv_cache is None else list(self.kv_cache.shape),
            kv_cache_bytes=None if self.kv_cache is None else self.kv_cache.bytes)


def run_cell(
    cell: Cell,
    rows: list[Prompt],
    loaded: Loaded,
    monitor: EnergyMonitor,
    *,
    timeline: Path | None = None,
    rank: int = 0,
    progress: CellProgress | None = None,
    segment: Segment | None = None,
) -> CellResult:
    """Run the cell's prompt rows from progress's first unfinished batch; returns what it measured.

    An NVML read error during the cell makes it status error (the rest is still recorded).
    """
    model = loaded.model
    fits = prompt_room(cell.engine, model.args.max_seq_len, cell.max_gen_len)
    cut_to = None if cell.dataset.max_prompt_tokens is None else min(cell.dataset.max_prompt_tokens, fits)
    prompts, truncated = encode_prompts([r.text for r in rows], loaded.tokenizer, cut_to, fits,
                                        rows=[r.id for r in rows], max_seq_len=model.args.max_seq_len)
    cache_len = max(len(p) for p in prompts) + cell.max_gen_len
    size = cell.batch_size
    batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    if progress is None:  # nothing saved between batches
        progress = CellProgress(CellShape(cell.id, rank, 1, size, len(batches)), None)
    phases = PhaseEnergy(monitor)
    # Sampled (not greedy) batches resumed without the stream's state draw other tokens than an uninterrupted run.
    restarted = bool(progress.done) and progress.stream_state is None and not cell.greedy
    run = _CellRun(cell, loaded, cache_len, PhaseClock(model.device, phases.on_boundary), phases,
                   cell_stream(cell, model.device, progress), weight_bytes(model))
    start = progress.done
    warmup = _warm_up(run, batches[start:], monitor) if start < len(batches) else None
    distributed.stop_if_asked()
    progress.begin_segment(dataclasses.replace(
        segment or Segment(segment=0), start_unix_s=time.time(), warmup_s=warmup.duration_s if warmup else 0.0,
        warmup_gpu_j=warmup.gpu_j if warmup else None, sampling_restarted=True if restarted else None))
    settled = monitor.settle(cell.energy.settle_s) if cell.energy.settle_s > 0 else None
    # Warmed up and waiting: the GPU's active-state power, for the static part of the cell's energy.
    active = monitor.measure_active(cell.energy.active_s) if start < len(batches) else None
    run.clock.enter(None)  # synchronize before the cell's window opens
    monitor.begin_window("cell")
    errors: list[str] = []
    for index in range(start, len(batches)):
        first = index * size
        entry, error = _run_batch(run, batches[index], _BatchResponses(cell, index, rows[first : first + size], rank))
        if error:
            errors.append(f"batch {index}: {error}")
        # A re-run does not resume after void figures.
        progress.add_batch(entry, save=not errors, stream_state=stream_state(run.stream))
        log.info("cell batch %d/%d: %d output tokens", index + 1, len(batches), entry.counts.output_tokens)
        if index + 1 < len(batches):  # after the last one the record is written first
            distributed.stop_if_asked()
    window: Window = monitor.end_window("cell")
    totals = Totals.of(progress.batches, progress.segments)
    errors = ([f"cell: {window.error}"] if window.error else []) + phases.errors + errors
    more = f" (and {len(errors) - 1} more window(s))" if len(errors) > 1 else ""
    energy = dataclasses.replace(cell_energy(window, phases, warmup, monitor), **totals.energy,
                                 **window_flags(progress.batches, cell.energy.min_window_periods))
    return CellResult(  # with an error the figures are void; later cells still try
        counts=Counts(**totals.counts, truncated_prompts=truncated),
        times=Times(**totals.times, warmup_s=warmup.duration_s if warmup else 0.0),
        energy=checked_energy(energy, monitor.missing_readings(), active, totals.times["total_s"]),
        gpu_state=gpu_state(window, progress.batches, settled),
        telemetry=Telemetry.from_dict(summarize(window.samples, monitor.memory_total_mib,
                                                list(window.telemetry_errors), window.t0_monotonic_s,
                                                window.t0_monotonic_s + window.duration_s)),
        timeline=write_timeline(timeline, window, rank),
        batches=list(progress.batches),
        segments=progress.used_segments(),
        responses=responses_block(cell, len(batches), rank),
        graph=loaded.engines[cell.engine].graph,
        decode_step=loaded.engines[cell.engine].decode_step,
        kv_cache=loaded.engines[cell.engine].kv_cache,
        error=f"EnergyError: {errors[0]}{more}" if errors else None,
    )


def _resume(cell: Cell, info: distributed.DistInfo, num_prompts: int) -> CellProgress:
    """The batches of the cell that earlier segments finished on every rank (a preempted job's)."""
    # A serving cell is one time series, one "batch": resumed only once whole (else it restarts whole).
    size = cell.batch_size if cell.scenario == OFFLINE else max(num_prompts, 1)
    shape = CellShape(cell.id, info.rank, info.world_size, size, math.ceil(num_prompts / size))
    progress = CellProgress.load(progress_path(cell.sweep_dir, cell.id, info.rank, cell.repeat), shape)
    done = progress.done
    if cell.save_responses and info.rank == 0:  # rank 0 writes responses: not past a batch whose part is gone
        done = first_missing_part(cell.sweep_dir, cell.id, done, cell.repeat)
    start = distributed.agreed_min(done)  # ranks run batches together: resume where all got to
    progress.resume_at(start)
    if start >= shape.num_batches:  # stopped after its last batch, before its record was written
        log.info("cell %s: all %d batches done in %d earlier segment(s): its record is written now", cell.id,
                 shape.num_batches, len(progress.segments))
    elif start:
        log.info("cell %s: resumed at batch %d/%d after %d segment(s)", cell.id, start + 1, shape.num_batches,
                 len(progress.segments))
    return progress


def apply_power_cap(capper: PowerCapper, cell: Cell) -> None:
    """Set the cell's cap and locked clock on every rank, or fail the cell on every rank (never run it
    uncapped or at other clocks)."""
    error = None
    try:
        capper.apply(cell.power_cap_w, cell.power_cap_command)
        capper.clocks.apply(cell.gpu_clock_mhz)
    except (PowerCapError, ClockError) as exc:
        error = exc
    if not distributed.all_ok(error is None):
        raise error or PowerCapError("the power cap or clock could not be set on another rank of this cell "
                                     "(see its record)")


def measure_cell(
    cell: Cell, rows: list[Prompt], loaded: Loaded, info: distributed.DistInfo, monitor: EnergyMonitor,
    capper: PowerCapper, run: Callable[..., CellResult] | None = None,
) -> tuple[RankRecord, int]:
    """One cell on this rank: its full record, and its outcome for the agreement between ranks.
    run: what measures the cell (run_cell; a serving cell's from w2w.serving_cell)."""
    record = identity(cell, info)
    outcome = distributed.CELL_OK
    try:
        apply_power_cap(capper, cell)
        progress = _resume(cell, info, len(rows))
        with signals.deferred():  # a stop signal ends the cell between batches, on every rank at once
            record = (run or run_cell)(
                cell, rows, loaded, monitor, timeline=timeline_path(cell.sweep_dir, cell.id, info.rank, cell.repeat),
                rank=info.rank, progress=progress, segment=job_segment(loaded.job_energy)).onto(record)
    except signals.Stopped:  # no record: the progress file keeps the finished batches for a re-run
        monitor.abandon_windows()
        raise
    except Exception as exc:  # the sweep goes on; the record says what happened
        record = failed(record, exc)
        outcome = distributed.GROUP_BROKEN if distributed.is_collective_error(exc) else distributed.CELL_FAILED
        monitor.abandon_windows()  # a cell that raised left its windows open
    return dataclasses.replace(
        record, energy=record.energy.merged(loaded.job_energy), gpu=monitor.gpu_record(),
        power_cap=capper.state(cell.power_cap_w), gpu_clock=capper.clocks.state(cell.gpu_clock_mhz),
        end_unix_s=time.time()), outcome
