"""The record of a cell on a rank: its typed sections, per-batch and per-segment parts, totals and file layout."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from w2w.files import write_json
from w2w.schema import ADD, CELL, LATER, MIN, RecordError, Schema, check_version, rule, total

SCHEMA_VERSION = 2
STATUS_OK = "ok"


def cell_dir(sweep_dir: str | Path, cid: str) -> Path:
    return Path(sweep_dir) / "cells" / cid


REPEAT_PREFIX = "repeat-"


def run_dir(sweep_dir: str | Path, cid: str, repeat: int = 0) -> Path:
    """One run of a cell: run 0 in the cell's folder (where a sweep without repeats writes), run K
    in its subfolder repeat-K, so that one cell's runs share its id and its folder."""
    folder = cell_dir(sweep_dir, cid)
    return folder if repeat == 0 else folder / f"{REPEAT_PREFIX}{repeat}"


def record_path(sweep_dir: str | Path, cid: str, rank: int, repeat: int = 0) -> Path:
    return run_dir(sweep_dir, cid, repeat) / f"rank-{rank:05d}.json"


def timeline_path(sweep_dir: str | Path, cid: str, rank: int, repeat: int = 0) -> Path:
    return run_dir(sweep_dir, cid, repeat) / f"rank-{rank:05d}.timeline.parquet"


# -- sections: a batch's part carries each field's total() rule; the cell's adds its own fields -------------


@dataclass
class BatchCounts(Schema):
    """What one batch produced on this rank (every rank sees the same prompts and outputs)."""

    prompts: int = rule(ADD, 0)
    responses: int = rule(ADD, 0)
    prompt_tokens: int = rule(ADD, 0)
    output_tokens: int = rule(ADD, 0)  # tokens returned: after the EOS cut
    # Positions computed: the rows of every forward call, prompt rows and rows past EOS included
    # (None: a record from before they were counted).
    positions: int | None = rule(LATER)
    output_words: int = rule(ADD, 0)  # the response text split on whitespace (the paper's words)
    scored: int = rule(ADD, 0)  # responses with a reference answer to score against (GSM8K)
    correct: int = rule(ADD, 0)  # of those, the ones whose final number matches the reference
    # Issue 27's roof: decode forward passes, and the bytes they read on this rank (estimated: the
    # shard's weights once per step, the KV cache up to each step's position; measure.decode_read_bytes).
    decode_steps: int | None = rule(LATER)
    decode_read_bytes: float | None = rule(LATER)
    # Issue 28 (None: a record from before they were counted). Responses whose reference cannot be scored
    # (GSM8K without '#### N'): counted apart, never as wrong; and how many responses ended at their EOS,
    # at max_gen_len, or at the engine's max_seq_len (w2w.engines.common.ENDINGS).
    unscorable: int | None = rule(LATER)
    ended_eos: int | None = rule(LATER)
    ended_max_gen_len: int | None = rule(LATER)
    ended_max_seq_len: int | None = rule(LATER)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class Counts(BatchCounts):
    """What a cell produced on this rank: its batches' counts summed, and the cell's own."""

    batches: int = rule(CELL, 0)  # the cell's batches (of every segment)
    truncated_prompts: int = rule(CELL, 0)


@dataclass
class BatchTimes(Schema):
    """Wall time of one batch on this rank, in seconds."""

    start_unix_s: float | None = rule(MIN)  # s since the epoch, when the window opened
    total_s: float | None = rule(ADD)  # the window (a cell's: warmup excluded)
    prefill_s: float | None = rule(ADD)
    decode_s: float | None = rule(ADD)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class Times(BatchTimes):
    """Wall time of the cell on this rank, in seconds: its batches' summed, and its warm-up."""

    warmup_s: float | None = rule(CELL)


@dataclass
class EnergyFigures(Schema):
    """What an energy window measured on this rank, in J (None: no figure), under Window's names."""

    gpu_j: float | None = rule(ADD)
    counter_gpu_j: float | None = rule(ADD)
    integrated_gpu_j: float | None = rule(ADD)
    prefill_gpu_j: float | None = rule(ADD)
    decode_gpu_j: float | None = rule(ADD)
    cpu_j: float | None = rule(ADD)  # the node's RAPL (local rank 0 only)
    # Worst-case bounds on gpu_j and cpu_j (w2w.energy.bounds): they add linearly (adjacent windows share
    # edges, and the counter-sample gap is a bias).
    gpu_bound_j: float | None = rule(ADD)
    cpu_bound_j: float | None = rule(ADD)
    cpu_package_j: float | None = rule(ADD)  # the RAPL package zones of cpu_j
    cpu_dram_j: float | None = rule(ADD)  # the RAPL DRAM zones of cpu_j (each zone counted once)
    # Issue 27: both sampled powers integrated beside the counter, and how far apart the three may lie
    # (w2w.energy.bounds.agreement_bounds_j: counter vs instant, and the 1 s average vs either; bounds add
    # linearly as gpu_bound_j's do).
    instant_gpu_j: float | None = rule(LATER)
    average_gpu_j: float | None = rule(LATER)
    agreement_bound_j: float | None = rule(LATER)
    average_bound_j: float | None = rule(LATER)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class BatchEnergy(EnergyFigures):
    """One batch window's energy, and its length in update periods of its source (cell_record.window_flags)."""

    period_s: float | None = None  # update period of gpu_j's source (None: no figure)
    window_periods: float | None = None  # the window's length in those periods


@dataclass
class Energy(EnergyFigures):
    """This rank's GPU energy in J (None: no figure, see reason), its job's load and idle baseline."""

    # Issue 27's fields: absent from files written before them (they read and write back the same).
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = (
        "readings_flag", "missing_readings", "active_power_w", "active_s", "static_gpu_j", "dynamic_gpu_j")

    source: str | None = None  # nvml_counter | nvml_integrated | none
    short_phase_windows: dict[str, int] | None = None  # per phase: windows under the counter's period
    warmup_gpu_j: float | None = None
    power_reading: str | None = None
    sample_interval_s: float | None = None
    cpu_zones_j: dict[str, float] | None = None
    cpu_reason: str | None = None
    reason: str | None = None  # why gpu_j is None
    # The job's model load and idle baseline (measured once per job, repeated in each record).
    load_gpu_j: float | None = None
    load_s: float | None = None
    load_cpu_j: float | None = None
    idle_power_w: float | None = None
    idle_s: float | None = None
    idle_source: str | None = None
    idle_cpu_power_w: float | None = None
    idle_reason: str | None = None
    # What this GPU would have drawn at rest over the cell's batches, at each segment's own baseline.
    idle_gpu_j: float | None = None
    window_period_s: float | None = None  # update period of gpu_j's source: counter period or sampler interval
    min_window_periods: float | None = None  # energy.min_window_periods the cell ran with
    short_windows: int | None = None  # batch windows under min_window_periods update periods (None: no period)
    shortest_window_periods: float | None = None  # the shortest batch window, in update periods
    # The three readings checked against each other (bounds.disagreement): the readings where they disagree.
    readings_flag: str | None = None
    missing_readings: dict[str, str] | None = None  # reading -> why this GPU lacks it (never a silent zero)
    # Static and dynamic energy: the GPU loaded and waiting (a window after the warm-up with no work).
    active_power_w: float | None = None  # W: that window's energy / its duration
    active_s: float | None = None  # s it lasted
    static_gpu_j: float | None = None  # J: active_power_w x the cell's batch time
    dynamic_gpu_j: float | None = None  # J: gpu_j - static_gpu_j


@dataclass
class WindowState(Schema):
    """This rank's GPU at a window's edges: temperature and SM clock, and the clock event (throttle)
    reasons seen in the window (None: not read)."""

    temp_start_c: float | None = None
    temp_end_c: float | None = None
    sm_clock_start_mhz: float | None = None
    sm_clock_end_mhz: float | None = None
    clock_events: int | None = None  # NVML clock event reasons, OR of every read (bit mask)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class GpuState(WindowState):
    """This rank's GPU over the cell: its window's edges, the reasons any of its windows saw, the settle before it."""

    clock_event_names: list[str] | None = None  # the reasons by name (w2w.energy.gpustate)
    throttled: bool | None = None  # a power or thermal reason was seen
    settle_s: float | None = None  # s waited before the cell (energy.settle_s)
    settle_temp_c: float | None = None
    settled: bool | None = None  # the temperature held still before the wait ran out


@dataclass
class Telemetry(Schema):
    """The sampler's summary over the cell's window; averages weighted by time (schema >= 2)."""

    samples: int = 0
    power_avg_w: float | None = None
    power_max_w: float | None = None
    sm_util_avg_pct: float | None = None
    mem_util_max_pct: float | None = None
    mem_used_max_mib: float | None = None
    mem_used_max_pct: float | None = None
    temp_max_c: float | None = None
    sm_clock_avg_mhz: float | None = None
    read_errors: int = 0
    first_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class Segment(Schema):
    """One job attempt that ran part of a cell: who it was, its idle baseline and its warm-up."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("sampling_restarted",)

    segment: int  # 0, 1, ...: the cell's attempts in order
    first_batch: int = 0  # the index of the first batch it ran
    job_id: str | None = None
    restart_count: int | None = None
    pid: int | None = None
    host: str | None = None
    idle_power_w: float | None = None  # W: this attempt's idle baseline (w2w.energy.window.IdleBaseline)
    idle_s: float | None = None
    start_unix_s: float | None = None  # s since the epoch, when it began the cell
    warmup_s: float | None = None
    warmup_gpu_j: float | None = None
    # True: no sampling state was saved after the batch it resumed at (a progress file of an older w2w), so
    # its sampled tokens are not an uninterrupted run's from first_batch on; None: the stream resumed exactly.
    sampling_restarted: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


def sampling_restarts(segments: list[Segment]) -> list[int]:
    """The batches at which a cell's sampling stream restarted instead of resuming (Segment.sampling_restarted)."""
    return [s.first_batch for s in segments if s.sampling_restarted]


@dataclass
class Batch(Schema):
    """One finished batch of a cell on this rank, as its progress file and its record keep it."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("gpu_state",)

    index: int  # 0, 1, ...: the batch's place in the cell
    segment: int  # the Segment (job attempt) that ran it
    counts: BatchCounts = field(default_factory=BatchCounts)
    times: BatchTimes = field(default_factory=BatchTimes)
    energy: BatchEnergy = field(default_factory=BatchEnergy)
    gpu_state: WindowState | None = None  # None: a batch from before it was kept
    # Who ran it (cell_lock.batch_writer): a resumed cell's record says which attempt ran what.
    job_id: str | None = None
    attempt: int | None = None
    pid: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass(frozen=True)
class Totals:
    """A cell's counts, times and energy summed from its batches, by each field's rule (schema.total)."""

    counts: dict[str, Any]  # BatchCounts' fields, and batches
    times: dict[str, Any]  # BatchTimes' fields
    energy: dict[str, Any]  # EnergyFigures' fields, and idle_gpu_j

    @classmethod
    def of(cls, batches: list[Batch], segments: list[Segment]) -> Totals:
        idle_w = {s.segment: s.idle_power_w for s in segments}
        # What this GPU would have drawn at rest over its batches, at each segment's own baseline.
        idle = [None if idle_w.get(b.segment) is None or b.times.total_s is None
                else idle_w[b.segment] * b.times.total_s for b in batches]
        return cls(
            counts=total([b.counts for b in batches], BatchCounts) | {"batches": len(batches)},
            times=total([b.times for b in batches], BatchTimes),
            energy=total([b.energy for b in batches], EnergyFigures) | total_idle(idle),
        )


def total_idle(idle_j: list[float | None]) -> dict[str, float | None]:
    """idle_gpu_j over the batches: None where any batch's segment has no baseline."""
    known = [j for j in idle_j if j is not None]
    return {"idle_gpu_j": float(math.fsum(known)) if idle_j and len(known) == len(idle_j) else None}


@dataclass
class RankRecord(Schema):
    """One (cell, rank): identity, the cell's parameters, what it measured, and its status.

    JSON form (``cells/<cell_id>/rank-NNNNN.json``): each field below under its own name, the
    sections as their dataclasses' fields; units in the names (``_s`` seconds, ``_unix_s`` s since
    the epoch, ``_j`` joules, ``_w`` watts, ``_mib``, ``_pct``)::

        {"schema": 2, "cell_id": "3a52dd4377ea", "rank": 0, "world_size": 2, "status": "ok",
         "local_rank": 0, "sweep_dir": "runs/demo", "job_id": "4242", "host": "n1", "node": "n1",
         "device": "cuda:0", "params": {"model": "llama_65b", "batch_size": 64, ...},
         "config": {...}, "counts": {"responses": 64, "output_tokens": 16384, ...},
         "times": {"total_s": 95.2, ...}, "energy": {"gpu_j": 25100.0, "source": "nvml_counter",
         ...}, "telemetry": {"sm_util_avg_pct": 71.5, ...}, "timeline": "rank-00000.timeline.parquet",
         "gpu": {"gpu_name": ..., "counter_period_s": 0.1, ...}, "power_cap": {"enforced_w": 250.0,
         ...}, "end_unix_s": 1.7e9}

    A failed cell (status oom or error) has "error" and "traceback" and no counts, times or
    telemetry. params, config, gpu and power_cap are free-form mappings. Schema history: 1 the
    first layout; 2 the same layout with telemetry averages weighted by time (1: per sampler row).
    """

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("error", "traceback", "counts", "times", "telemetry", "responses",
                                               "graph", "decode_step", "gpu_state", "gpu_clock", "kv_cache_shape",
                                               "kv_cache_bytes", "serving")
    # Present and typed in every ok record: the reducer relies on them.
    OK_REQUIRED: ClassVar[tuple[str, ...]] = (
        "node", "counts.responses", "counts.output_tokens", "counts.output_words", "times.total_s",
    )

    cell_id: str
    rank: int
    world_size: int
    status: str  # ok | oom | error
    schema: int = SCHEMA_VERSION
    local_rank: int | None = None
    sweep_dir: str | None = None
    job_id: str | None = None
    host: str | None = None
    node: str | None = None
    device: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # free-form: the cell's parameters
    config: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    counts: Counts | None = None
    times: Times | None = None
    energy: Energy = field(default_factory=Energy)
    telemetry: Telemetry | None = None
    timeline: str | None = None  # the timeline file's name, beside the record
    gpu: dict[str, Any] = field(default_factory=dict)  # NVML identity and power limits, or read_error
    power_cap: dict[str, Any] = field(default_factory=dict)  # requested_w, enforced_w, original_w, ...
    gpu_clock: dict[str, Any] | None = None  # requested_mhz, locked_mhz, read_back_mhz, refused (gpu_clock_mhz set)
    end_unix_s: float | None = None
    repeat: int = 0  # which run of the cell (0 .. repeats-1); its folder is run_dir(sweep_dir, cell_id, repeat)
    # Per batch (w2w/progress.py), summed into the sections above (Totals).
    batches: list[Batch] = field(default_factory=list)
    # Per job attempt that ran the cell's batches.
    segments: list[Segment] = field(default_factory=list)
    # requested, saved (rank 0 wrote the file), file (its name, beside the record), score_reason.
    responses: dict[str, Any] | None = None
    # fast: how its decode steps ran: "cuda graph", "eager", or "eager, capture failed: <why>".
    graph: str | None = None
    decode_step: str | None = None  # the decode step's program (EngineSpec.decode_step); None before it was recorded
    serving: dict[str, Any] | None = None  # scenario=serving: whole run and steady state (w2w.serving_stats.summarize)
    gpu_state: GpuState | None = None  # temperature, clock and throttle reasons over the cell (no GPU: None)
    # The KV cache the cell's engine held on this rank: one layer's K tensor shape (llama1: Meta's
    # (max batch, max_seq_len, heads, head_dim)) and every layer's K and V in bytes; None before recorded.
    kv_cache_shape: list[int] | None = None
    kv_cache_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def missing_ok_field(self) -> str | None:
        """The first field an ok record needs that this one lacks, or None."""
        for dotted in self.OK_REQUIRED:
            value: Any = self
            for name in dotted.split("."):
                value = getattr(value, name, None)
            if value is None:
                return dotted
        return None


def parse_record(data: Any, where: str = "record") -> RankRecord:
    """A record's JSON object as a RankRecord; RecordError says which field is wrong."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: not a JSON object")
    check_version(data.get("schema", 1), SCHEMA_VERSION, where)  # the first writers always wrote 1
    for key in ("cell_id", "rank", "world_size", "status"):
        if key not in data:
            raise RecordError(f"{where}: missing field '{key}'")
    try:
        record = RankRecord.from_dict(data)
    except RecordError as exc:
        raise RecordError(f"{where}: {exc}") from None
    if "schema" not in data:
        record.schema = 1
    if record.ok:
        missing = record.missing_ok_field()
        if missing:
            raise RecordError(f"{where}: field '{missing}' is missing from an ok record")
    return record


def read_record(path: Path) -> RankRecord:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: unreadable record ({exc})") from exc
    return parse_record(data, str(path))


def write_record(sweep_dir: str | Path, record: RankRecord) -> Path:
    path = record_path(sweep_dir, record.cell_id, record.rank, record.repeat)
    write_json(path, record)
    return path


def misplaced(record: RankRecord, cid: str, rank: int, repeat: int) -> str | None:
    """Why a record read from cid's rank-`rank` file of run `repeat` is not that (copied from another cell
    or run), or None where it is: such a record is no result of this cell."""
    if (record.cell_id, record.rank, record.repeat) == (cid, rank, repeat):
        return None
    return (f"rank-{rank:05d}.json of cell {cid} repeat {repeat} holds cell {record.cell_id!r} rank {record.rank} "
            f"repeat {record.repeat} (copied from another cell or run?): it is run again")


def write_record_unless_worse(sweep_dir: str | Path, record: RankRecord) -> Path | None:
    """write_record, except over an ok record of the same (cell, rank, run) when this one is not ok: an error
    never replaces an ok (None then: the file is left as it was)."""
    path = record_path(sweep_dir, record.cell_id, record.rank, record.repeat)
    if not record.ok and path.is_file():
        try:
            kept = read_record(path)
            if kept.ok and misplaced(kept, record.cell_id, record.rank, record.repeat) is None:
                return None
        except RecordError:
            pass  # an unreadable file holds no result to keep
    return write_record(sweep_dir, record)


def cell_done(sweep_dir: str | Path, cid: str, world_size: int, repeat: int = 0) -> bool:
    """Done (one run of the cell): every rank's record exists and says ok."""
    for rank in range(world_size):
        path = record_path(sweep_dir, cid, rank, repeat)
        if not path.is_file():
            return False
        try:
            record = read_record(path)
        except RecordError:
            return False
        if not record.ok or misplaced(record, cid, rank, repeat) is not None:
            return False
    return True


def runs_done(sweep_dir: str | Path, cid: str, world_size: int, repeats: int) -> bool:
    """A cell is done when every one of its runs is."""
    return all(cell_done(sweep_dir, cid, world_size, k) for k in range(repeats))


def with_batch_totals(record: RankRecord) -> RankRecord:
    """The record with its counts, times and energy summed from its batches (as the runner wrote
    them; records from before per-batch progress have no batches and stay as they are)."""
    if not record.batches:
        return record
    totals = Totals.of(record.batches, record.segments)
    return dataclasses.replace(
        record, counts=dataclasses.replace(record.counts or Counts(), **totals.counts),
        times=dataclasses.replace(record.times or Times(), **totals.times),
        energy=dataclasses.replace(record.energy, **totals.energy))
