"""Per-batch progress of a cell on one rank, written after every batch: a requeued job resumes there."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from w2w.files import write_json
from w2w.records import Batch, Segment, run_dir
from w2w.schema import RecordError

log = logging.getLogger("w2w.progress")
# 2: the sampling stream's state is saved; a version-1 file cannot resume the stream, so its cell starts over.
PROGRESS_VERSION = 2
# The progress file keeps the stream's state after its last batches only (ranks that save after the same
# batch differ by one at most), so that it stays small (a CPU stream's state is 6.7 kB, rewritten after
# every batch); the state after every batch is appended to a side file (streams_path), so that a cell
# resumed earlier (a damaged response part deleted, a gap in the batch indices) samples exactly too.
KEPT_STREAM_STATES = 2


def streams_path(progress: Path) -> Path:
    """The side file of a progress file: one line {"done": N, "state": ...} per batch, appended."""
    return progress.with_name(progress.stem + ".streams.jsonl")


def remove_progress(sweep_dir: str | Path, cid: str, rank: int, repeat: int = 0) -> None:
    """A finished cell's progress (its record holds the batches now) and its side file."""
    path = progress_path(sweep_dir, cid, rank, repeat)
    path.unlink(missing_ok=True)
    streams_path(path).unlink(missing_ok=True)


def _appended_states(path: Path) -> dict[int, str]:
    """The states a side file holds (the last line for each batch wins; a torn last line is skipped)."""
    states: dict[int, str] = {}
    try:
        lines = streams_path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return states
    for line in lines:
        try:
            entry = json.loads(line)
            states[int(entry["done"])] = str(entry["state"])
        except (ValueError, TypeError, KeyError):
            continue
    return states


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
    batches: list[Batch] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    # batches done -> the sampling stream's state after them (opaque text: base64 of Generator.get_state())
    stream_states: dict[str, str] = field(default_factory=dict)
    version: int = PROGRESS_VERSION
    _saving: bool = field(default=True, repr=False)
    abandoned: int = field(default=0, repr=False)  # segments resume_at dropped: attempts that finished no batch
    _appending: bool = field(default=False, repr=False)  # False: the side file is started afresh at the next state

    @classmethod
    def load(cls, path: Path, shape: CellShape) -> CellProgress:
        """This rank's saved progress, or none where the file is absent or is not this cell's."""
        fresh = cls(shape, path)
        if not path.is_file():
            return fresh
        try:
            data = json.loads(path.read_text())
            saved = CellShape(**data["shape"])
            version = data["version"]
            states = {int(k): str(v) for k, v in dict(data.get("stream_states", {})).items()} | _appended_states(path)
            batches = [Batch.from_dict(b, f"batches[{i}]") for i, b in enumerate(data["batches"])]
            segments = [Segment.from_dict(s, f"segments[{i}]") for i, s in enumerate(data["segments"])]
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecordError) as exc:
            log.warning("%s: unreadable progress (%s): the cell starts from its first batch", path, exc)
            return fresh
        if saved != shape or version != PROGRESS_VERSION:
            log.warning("%s: progress of another batching (%s): the cell starts from its first batch", path, saved)
            return fresh
        contiguous = list(itertools.takewhile(lambda ib: ib[1].index == ib[0], enumerate(batches)))
        # The state after every batch kept: a gap's later batches run again from the state before them.
        kept = {str(k): v for k, v in sorted(states.items()) if k <= len(contiguous)}
        return cls(shape, path, [b for _, b in contiguous], segments, kept, _appending=True)

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
        self.stream_states = {k: v for k, v in self.stream_states.items() if int(k) <= start}
        kept = self.used_segments()
        self.abandoned = len(self.segments) - len(kept)  # attempts cut off before finishing a batch
        self.segments = kept

    def used_segments(self) -> list[Segment]:
        """The segments that ran at least one of the batches kept."""
        used = {b.segment for b in self.batches}
        return [s for s in self.segments if s.segment in used]

    @property
    def segment(self) -> int:
        """The number of the segment now running (begin_segment), or the next one's."""
        return self.segments[-1].segment if self.segments else 0

    def begin_segment(self, segment: Segment) -> None:
        """A new job attempt on this cell (its idle baseline and warm-up, measured again), numbered
        after the last one, from the first batch not done."""
        number = self.segments[-1].segment + 1 if self.segments else 0
        self.segments.append(dataclasses.replace(segment, segment=number, first_batch=self.done))

    def add_batch(self, batch: Batch, *, save: bool = True, stream_state: str | None = None) -> None:
        """Record one finished batch (numbered here: the next index, the running segment) and the
        sampling stream's state after it, and save them atomically (a kill at any point leaves the
        previous file whole); save=False: this batch and the later ones are not resumed from."""
        self.batches.append(dataclasses.replace(batch, index=self.done, segment=self.segment))
        if stream_state is not None:
            self.stream_states[str(self.done)] = stream_state
        self._saving = self._saving and save
        if self.path is not None and self._saving and stream_state is not None:
            self._append_state(self.path, self.done, stream_state)  # before the progress file that lists its batch
        self.save()

    def save(self) -> None:
        """Write the progress file atomically (after each batch; a serving cell also as its segment
        begins, so that a later attempt knows an earlier one was cut off)."""
        if self.path is not None and self._saving:
            kept = sorted(self.stream_states, key=int)[-KEPT_STREAM_STATES:]
            write_json(self.path, {"version": self.version, "shape": asdict(self.shape),
                                   "batches": [b.to_dict() for b in self.batches],
                                   "segments": [s.to_dict() for s in self.segments],
                                   "stream_states": {k: self.stream_states[k] for k in kept}})

    def _append_state(self, path: Path, done: int, state: str) -> None:
        """One line of the side file (a fresh cell's starts it over); appended, not rewritten: O(1) a batch.
        Not fsynced: a kill loses nothing written, and a line lost with the machine is a recorded restart."""
        path.parent.mkdir(parents=True, exist_ok=True)  # a run's repeat-K/ folder is made by its first save
        with streams_path(path).open("a" if self._appending else "w") as f:
            f.write(json.dumps({"done": done, "state": state}) + "\n")
        self._appending = True
