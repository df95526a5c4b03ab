"""Per-batch progress of a cell on one rank, written after every batch: a requeued job resumes there."""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from w2w.records import Counts, RankRecord, run_dir, write_json

log = logging.getLogger("w2w.progress")
# 2: the sampling stream's state is saved; a version-1 file cannot resume the stream, so its cell starts over.
PROGRESS_VERSION = 2
# The stream's state is kept for the last batches only: ranks that save after the same batch differ by one at most.
KEPT_STREAM_STATES = 2
# Counts of the whole cell; every other field of records.Counts is summed over the cell's batches.
CELL_COUNTS = ("batches", "truncated_prompts")
BATCH_COUNTS = tuple(f.name for f in fields(Counts) if f.name not in (*CELL_COUNTS, "extra"))
# Counts added after records were written: unknown (None) for a cell where any batch lacks them, never 0.
LATER_COUNTS = ("positions",)
BATCH_TIMES = ("total_s", "prefill_s", "decode_s")
BATCH_ENERGY = ("gpu_j", "counter_gpu_j", "integrated_gpu_j", "prefill_gpu_j", "decode_gpu_j", "cpu_j",
                # Bounds add linearly (worst case): adjacent windows share edges, and the counter-sample gap is a bias.
                "gpu_bound_j", "cpu_bound_j", "cpu_package_j", "cpu_dram_j")


def progress_path(sweep_dir: str | Path, cid: str, rank: int, repeat: int = 0) -> Path:
    """Beside the rank's record (of this run), under a name the record globs (rank-*.json) do not match."""
    return run_dir(sweep_dir, cid, repeat) / f"progress-rank-{rank:05d}.json"


@dataclass(frozen=True)
class CellShape:
    """What a progress file must match to be resumed: the same cell, rank and batching."""

    cell_id: str
    rank: int
    world_size: int
    batch_size: int
    num_batches: int


@dataclass
class CellProgress:
    """The batches this rank finished, and the segments (job attempts) that ran them."""

    shape: CellShape
    path: Path | None  # None: kept in memory only
    batches: list[dict] = field(default_factory=list)  # index, segment, counts, times, energy
    segments: list[dict] = field(default_factory=list)  # segment, job_id, first_batch, idle, warm-up
    # batches done -> the sampling stream's state after them (opaque text: base64 of Generator.get_state())
    stream_states: dict[str, str] = field(default_factory=dict)
    version: int = PROGRESS_VERSION
    _saving: bool = field(default=True, repr=False)

    @classmethod
    def load(cls, path: Path, shape: CellShape) -> CellProgress:
        """This rank's saved progress, or none where the file is absent or is not this cell's."""
        fresh = cls(shape, path)
        if not path.is_file():
            return fresh
        try:
            data = json.loads(path.read_text())
            saved = CellShape(**data["shape"])
            batches, segments = list(data["batches"]), list(data["segments"])
            version, states = data["version"], dict(data.get("stream_states", {}))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("%s: unreadable progress (%s): the cell starts from its first batch", path, exc)
            return fresh
        if saved != shape or version != PROGRESS_VERSION:
            log.warning("%s: progress of another batching (%s): the cell starts from its first batch", path, saved)
            return fresh
        contiguous = list(itertools.takewhile(lambda ib: ib[1].get("index") == ib[0], enumerate(batches)))
        return cls(shape, path, [b for _, b in contiguous], segments, states)

    @property
    def done(self) -> int:
        """Batches finished in a row from the first."""
        return len(self.batches)

    @property
    def stream_state(self) -> str | None:
        """The sampling stream's state after the batches kept (None: saved by no batch)."""
        return self.stream_states.get(str(self.done))

    def resume_at(self, start: int) -> None:
        """Keep the first `start` batches (the ranks agreed on them) and drop segments left empty."""
        self.batches = self.batches[:start]
        used = {b["segment"] for b in self.batches}
        self.segments = [s for s in self.segments if s["segment"] in used]

    def begin_segment(self, segment: dict) -> None:
        """A new job attempt on this cell: its idle baseline and warm-up, measured again."""
        number = self.segments[-1]["segment"] + 1 if self.segments else 0
        self.segments.append({"segment": number, "first_batch": self.done} | segment)

    def add_batch(self, batch: dict, *, save: bool = True, stream_state: str | None = None) -> None:
        """Record one finished batch and the sampling stream's state after it, and save them atomically
        (a kill at any point leaves the previous file whole); save=False: this batch and the later ones
        are not resumed from."""
        self.batches.append({"index": self.done, "segment": self.segments[-1]["segment"]} | batch)
        if stream_state is not None:
            self.stream_states[str(self.done)] = stream_state
            kept = sorted(self.stream_states, key=int)[-KEPT_STREAM_STATES:]
            self.stream_states = {k: self.stream_states[k] for k in kept}
        self._saving = self._saving and save
        if self.path is not None and self._saving:
            write_json(self.path, {"version": self.version, "shape": asdict(self.shape), "batches": self.batches,
                                   "segments": self.segments, "stream_states": self.stream_states})

def _sum(values: list) -> float | None:
    """None where any batch has no figure (or there is no batch): never a partial sum."""
    return None if not values or any(v is None for v in values) else float(math.fsum(values))


def _count(batches: list[dict], key: str) -> int | None:
    """A count summed over the batches; a later count is None where any batch has none."""
    values = [b["counts"].get(key) for b in batches]
    if key in LATER_COUNTS and (not values or any(v is None for v in values)):
        return None
    return int(sum(v or 0 for v in values))


def sum_batches(batches: list[dict], segments: list[dict]) -> dict:
    """A cell's counts, times and energy from its batches (over every segment that ran them)."""
    idle_w = {s["segment"]: s.get("idle_power_w") for s in segments}
    idle = [idle_w.get(b["segment"]) for b in batches]
    return {
        "counts": {k: _count(batches, k) for k in BATCH_COUNTS} | {"batches": len(batches)},
        "times": {k: float(math.fsum(b["times"][k] for b in batches)) for k in BATCH_TIMES}
        | {"start_unix_s": min((b["times"]["start_unix_s"] for b in batches), default=None)},
        "energy": {k: _sum([b["energy"].get(k) for b in batches]) for k in BATCH_ENERGY}
        # What this GPU would have drawn at rest over its batches, at each segment's own baseline.
        | {"idle_gpu_j": _sum([None if w is None else w * b["times"]["total_s"] for w, b in zip(idle, batches, strict=True)])},
    }


def with_batch_totals(record: RankRecord) -> RankRecord:
    """The record with its counts, times and energy summed from its batches (as the runner wrote
    them; records from before per-batch progress have no batches and stay as they are)."""
    if not record.batches:
        return record
    totals = sum_batches(record.batches, record.segments)
    return record.merged({key: _section(record, key) | totals[key] for key in ("counts", "times", "energy")})


def _section(record: RankRecord, key: str) -> dict:
    section = getattr(record, key)
    return {} if section is None else section.to_dict()
