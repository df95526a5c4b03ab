"""Sweep layout and the typed schema of its record and manifest files, written atomically."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

SCHEMA_VERSION = 2
MANIFEST_VERSION = 2  # manifest.json's layout (Manifest)
_UMASK = os.umask(0)
os.umask(_UMASK)
STATUS_OK = "ok"
MANIFEST = "manifest.json"  # in the sweep directory
UPGRADE_HINT = "upgrade w2w (pip install -U w2w, or git pull in its checkout) to read it"

S = TypeVar("S", bound="Schema")


class RecordError(ValueError):
    """A record file that does not parse or lacks required fields."""


class NewerSchemaError(RecordError):
    """A record or manifest written by a newer w2w than this one."""


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


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are shared with the group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    if isinstance(obj, Schema):
        obj = obj.to_dict()
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


# -- typed sections ---------------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _convert(value: Any, hint: Any, where: str) -> Any:
    """`value` from JSON as `hint` says (a Schema becomes its dataclass), or RecordError naming the field."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) == 1:  # X | None: the error is X's, down to the nested field
            return _convert(value, options[0], where)
        for option in options:
            try:
                return _convert(value, option, where)
            except RecordError:
                continue
        raise RecordError(f"field '{where}' is {value!r}, not {_type_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif isinstance(hint, type) and issubclass(hint, Schema):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return hint.from_dict(value, where)
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            args = typing.get_args(hint)
            return {k: _convert(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    elif origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, list | tuple):
            args = typing.get_args(hint)
            return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise RecordError(f"field '{where}' is {value!r}, not {_type_name(hint)}")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """A Schema dataclass's JSON fields and their types (`extra` holds the rest)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "extra"}


def _plain(value: Any) -> Any:
    if isinstance(value, Schema):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class Schema:
    """A dataclass with a JSON form: known keys typed, unknown keys kept in `extra`, nothing lost.

    Adding a field is one line in its dataclass (with a default, so older files still read).
    """

    # Fields left out of the JSON while None (sections a failed cell never had).
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()
    extra: dict[str, Any]

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any], where: str = "") -> S:
        types_ = _field_types(cls)
        known, extra = {}, {}
        for key, value in data.items():
            if key in types_:
                known[key] = _convert(value, types_[key], f"{where}.{key}" if where else key)
            else:
                extra[key] = value
        missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                   if f.name not in known and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RecordError(f"missing field '{(where + '.') if where else ''}{missing[0]}'")
        return cls(**known, extra=extra)

    def merged(self: S, values: dict[str, Any]) -> S:
        """A copy with `values` set (plain JSON or sections), checked as when read from a file."""
        return type(self).from_dict(self.to_dict() | _plain(values))

    def __getitem__(self, key: str) -> Any:
        """The JSON form by key (fields, then keys this version does not know), as plain records read."""
        if key in _field_types(type(self)):
            return getattr(self, key)
        return self.extra[key]

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in self.OMIT_IF_NONE:
                continue
            out[f.name] = _plain(value)
        return out | _plain(self.extra)


@dataclass
class Counts(Schema):
    """What a cell produced on this rank (every rank sees the same prompts and outputs)."""

    prompts: int = 0
    responses: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0  # tokens returned: after the EOS cut
    # Positions computed: the rows of every forward call, prompt rows and rows past EOS included
    # (None: a record from before they were counted).
    positions: int | None = None
    output_words: int = 0  # the response text split on whitespace (the paper's words)
    batches: int = 0
    truncated_prompts: int = 0
    scored: int = 0  # responses with a reference answer to score against (GSM8K)
    correct: int = 0  # of those, the ones whose final number matches the reference
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class Times(Schema):
    """Wall time of the cell on this rank, in seconds."""

    start_unix_s: float | None = None  # s since the epoch, when the cell's window opened
    total_s: float | None = None  # the cell's window, warmup excluded
    prefill_s: float | None = None
    decode_s: float | None = None
    warmup_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class Energy(Schema):
    """This rank's GPU energy in J (None: no figure, see reason), its job's load and idle baseline."""

    source: str | None = None  # nvml_counter | nvml_integrated | none
    gpu_j: float | None = None
    counter_gpu_j: float | None = None
    integrated_gpu_j: float | None = None
    prefill_gpu_j: float | None = None
    decode_gpu_j: float | None = None
    short_phase_windows: dict[str, int] | None = None  # per phase: windows under the counter's period
    warmup_gpu_j: float | None = None
    power_reading: str | None = None
    sample_interval_s: float | None = None
    cpu_j: float | None = None  # the node's RAPL (local rank 0 only)
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
    # Worst-case bounds on gpu_j and cpu_j (w2w.energy.bounds), summed linearly over the batch windows.
    gpu_bound_j: float | None = None
    cpu_bound_j: float | None = None
    cpu_package_j: float | None = None  # the RAPL package zones of cpu_j
    cpu_dram_j: float | None = None  # the RAPL DRAM zones of cpu_j (each zone counted once)
    window_period_s: float | None = None  # update period of gpu_j's source: counter period or sampler interval
    min_window_periods: float | None = None  # energy.min_window_periods the cell ran with
    short_windows: int | None = None  # batch windows under min_window_periods update periods (None: no period)
    shortest_window_periods: float | None = None  # the shortest batch window, in update periods
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class GpuState(Schema):
    """This rank's GPU over the cell: temperature and SM clock at the cell window's edges, clock event
    (throttle) reasons seen in any of its windows, and the settle before it (None: not read)."""

    temp_start_c: float | None = None
    temp_end_c: float | None = None
    sm_clock_start_mhz: float | None = None
    sm_clock_end_mhz: float | None = None
    clock_events: int | None = None  # NVML clock event reasons, OR of every read (bit mask)
    clock_event_names: list[str] | None = None  # the same by name (w2w.energy.gpustate)
    throttled: bool | None = None  # a power or thermal reason was seen
    settle_s: float | None = None  # s waited before the cell (energy.settle_s)
    settle_temp_c: float | None = None
    settled: bool | None = None  # the temperature held still before the wait ran out
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


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
                                               "graph", "decode_step", "gpu_state")
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
    end_unix_s: float | None = None
    repeat: int = 0  # which run of the cell (0 .. repeats-1); its folder is run_dir(sweep_dir, cell_id, repeat)
    # Per batch: index, segment, counts, times, energy (w2w/progress.py); summed into the sections above.
    batches: list[dict[str, Any]] = field(default_factory=list)
    # Per job attempt that ran the cell: segment, job_id, first_batch, idle baseline, warm-up.
    segments: list[dict[str, Any]] = field(default_factory=list)
    # requested, saved (rank 0 wrote the file), file (its name, beside the record), score_reason.
    responses: dict[str, Any] | None = None
    # fast: how its decode steps ran: "cuda graph", "eager", or "eager, capture failed: <why>".
    graph: str | None = None
    decode_step: str | None = None  # the decode step's program (EngineSpec.decode_step); None before it was recorded
    gpu_state: GpuState | None = None  # temperature, clock and throttle reasons over the cell (no GPU: None)
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


def check_version(found: Any, newest: int, what: str, key: str = "schema") -> None:
    """Refuse what a newer w2w wrote: its fields may mean something this version does not know."""
    if isinstance(found, bool) or not isinstance(found, int):
        raise RecordError(f"{what}: {key} {found!r} is not a version number")
    if found > newest:
        raise NewerSchemaError(
            f"{what}: written by a newer w2w ({key} {found}; this w2w reads up to {newest}): {UPGRADE_HINT}"
        )


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


def write_record_unless_worse(sweep_dir: str | Path, record: RankRecord) -> Path | None:
    """write_record, except over an ok record of the same (cell, rank) when this one is not ok: an error
    never replaces an ok (None then: the file is left as it was)."""
    path = record_path(sweep_dir, record.cell_id, record.rank, record.repeat)
    if not record.ok and path.is_file():
        try:
            if read_record(path).ok:
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
            if not read_record(path).ok:
                return False
        except RecordError:
            return False
    return True


def runs_done(sweep_dir: str | Path, cid: str, world_size: int, repeats: int) -> bool:
    """A cell is done when every one of its runs is."""
    return all(cell_done(sweep_dir, cid, world_size, k) for k in range(repeats))


# -- the sweep manifest ---------------------------------------------------------------------------


class ManifestError(RecordError):
    """A manifest.json that does not parse (torn by hand, truncated by a full disk) or has a wrong field."""


class NewerManifestError(ManifestError, NewerSchemaError):
    """A manifest.json written by a newer w2w: reading or rewriting it could lose what it knows."""


@dataclass
class Command(Schema):
    """One w2w-sweep command that submitted into the sweep."""

    argv: list[str]  # ["w2w-sweep", override, ...]
    unix_s: float | None = None  # s since the epoch, when it planned
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class Submission(Schema):
    """One job queued for a placement, with the cells it was given to run."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("submitted_unix_s", "command", "process_start")

    job_id: str  # SLURM's job id, or the local controller's pid
    folder: str  # submitit's folder of the job (its logs and result pickles)
    submitted_unix_s: float | None = None
    cells: list[str] = field(default_factory=list)  # cell ids
    command: list[str] | None = None  # the argv of the w2w-sweep that submitted it
    # Local jobs: "<boot id>:<start time>" of the controller process (job_id is its PID, which the
    # system reuses once it ends; w2w.launch.process).
    process_start: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class ManifestJob(Schema):
    """One placement: its shape, every cell ever planned for it, and every submission of it."""

    backend: str  # slurm | local
    nodes: int
    tasks_per_node: int
    shape: str = ""  # Job.shape(): "model=... gpu=... shards=... precision=... -> N node(s) x M task(s)"
    cells: list[str] = field(default_factory=list)  # cell ids, in the order they were planned
    submissions: list[Submission] = field(default_factory=list)  # appended, never rewritten
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know

    def holder(self, cid: str) -> Submission | None:
        """The latest submission that holds the cell: its state is the cell's, until records say more."""
        return next((s for s in reversed(self.submissions) if cid in s.cells), None)


@dataclass
class ManifestCell(Schema):
    """One planned cell: its placement (None: skipped by the planner) and its parameters."""

    world_size: int  # ranks, each writing cells/<id>/rank-NNNNN.json
    job: str | None = None  # the ManifestJob's key
    params: dict[str, Any] = field(default_factory=dict)  # free-form: every leaf of the cell's config, dotted
    skip_reason: str | None = None  # why the planner skipped it (the fit estimate)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know


@dataclass
class Manifest(Schema):
    """manifest.json: what every w2w-sweep into a sweep_dir planned and submitted; it only ever grows.

    Written by w2w-sweep (launch/submit.py, under an fcntl lock), read by w2w-status, w2w-sweep
    --wait, w2w-reduce and w2w-report. JSON form (version 2; keys sorted on disk)::

        {"version": 2, "updated_unix_s": 1.7e9,
         "commands": [{"argv": ["w2w-sweep", "batch_size=1,2", ...], "unix_s": 1.7e9}],
         "jobs": {"300e37ec": {"backend": "slurm", "nodes": 1, "tasks_per_node": 2,
                               "shape": "model=tiny gpu=v100 shards=2 precision=fp16 -> 1 node(s) x 2 task(s)",
                               "cells": ["29b8c0b50d76", ...],
                               "submissions": [{"job_id": "4242", "folder": "D/submitit/4242",
                                                "submitted_unix_s": 1.7e9, "cells": ["29b8c0b50d76"],
                                                "command": ["w2w-sweep", ...]}]}},
         "cells": {"29b8c0b50d76": {"job": "300e37ec", "world_size": 2, "skip_reason": null,
                                    "params": {"model.name": "tiny", "batch_size": 2, ...}}}}

    A cell skipped by the planner has "job": null and its "skip_reason". Version history: 1 kept one
    "command" (the last), submissions without "cells" or "command" (each held all of its job's
    cells) and a job's shape inside its "describe" line; it is upgraded on read, and written back
    as version 2.
    """

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("updated_unix_s",)

    version: int = MANIFEST_VERSION
    commands: list[Command] = field(default_factory=list)  # every command, oldest first
    updated_unix_s: float | None = None  # when a command last planned into it
    jobs: dict[str, ManifestJob] = field(default_factory=dict)  # by placement key (Job.key)
    cells: dict[str, ManifestCell] = field(default_factory=dict)  # by cell id
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not know

    def holder(self, cid: str) -> tuple[ManifestJob, Submission] | None:
        """The latest submission that holds the cell, in whichever placement: a cell re-planned under
        another placement key (a cluster option changed) is still held by the job that has it."""
        latest = None
        for entry in self.jobs.values():
            submission = entry.holder(cid)
            if submission is not None and (latest is None or (submission.submitted_unix_s or 0.0)
                                           >= (latest[1].submitted_unix_s or 0.0)):
                latest = (entry, submission)
        return latest


def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1's JSON as version 2's: its command kept, each submission given its job's cells."""
    data = dict(data)
    command = data.pop("command", None)
    data["commands"] = [{"argv": command, "unix_s": data.get("updated_unix_s")}] if command else []
    jobs = data.get("jobs")
    if isinstance(jobs, dict):
        data["jobs"] = {key: _upgrade_v1_job(entry, command) for key, entry in jobs.items()}
    data["version"] = MANIFEST_VERSION
    return data


def _upgrade_v1_job(entry: Any, command: Any) -> Any:
    if not isinstance(entry, dict):
        return entry  # the typed read names it
    entry = dict(entry)
    if "shape" not in entry and isinstance(entry.get("describe"), str):  # "job K: SHAPE, N cell(s), ..."
        entry["shape"] = entry["describe"].split(": ", 1)[-1].split(", ")[0]
    if isinstance(entry.get("submissions"), list):
        entry["submissions"] = [
            {"cells": list(entry.get("cells") or []), "command": command} | s if isinstance(s, dict) else s
            for s in entry["submissions"]
        ]
    return entry


_MOVE_AWAY = "restore it, or move it away to start the bookkeeping afresh (finished cells are kept: their records are in cells/)"


def parse_manifest(data: Any, where: str = "manifest") -> Manifest:
    """A manifest's JSON (any version up to MANIFEST_VERSION) as a version 2 Manifest; ManifestError if not."""
    if not isinstance(data, dict) or not ({"jobs", "cells"} & set(data)):
        raise ManifestError(f"{where} is not a w2w-sweep manifest (no jobs/cells): restore it or move it away")
    try:
        check_version(data.get("version", 1), MANIFEST_VERSION, where, "version")  # the first writer wrote 1
    except NewerSchemaError as exc:
        raise NewerManifestError(str(exc)) from None
    except RecordError as exc:
        raise ManifestError(f"{exc}: {_MOVE_AWAY}") from None
    if data.get("version", 1) < MANIFEST_VERSION:
        data = _upgrade_v1(data)
    try:
        return Manifest.from_dict(data)
    except RecordError as exc:
        raise ManifestError(f"{where}: {exc}: {_MOVE_AWAY}") from None


def read_manifest(path: Path) -> Manifest:
    """The manifest at `path` (a sweep's MANIFEST), upgraded; an empty one where there is none yet."""
    if not path.is_file():
        return Manifest()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is unreadable ({exc}): {_MOVE_AWAY}") from exc
    return parse_manifest(data, str(path))


def writable_problem(path: Path) -> str | None:
    """Why sweep_dir cannot hold the sweep, judged from it or its nearest existing parent."""
    probe = path
    try:
        while not probe.exists():
            if probe.is_symlink():
                return f"{probe} is a broken symbolic link"
            probe = probe.parent
    except OSError as exc:  # a parent this user may not enter
        return f"{probe} cannot be reached ({exc.strerror})"
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if os.statvfs(probe).f_flag & os.ST_RDONLY:  # first: access() also says no there, less precisely
        return f"{probe} is on a read-only file system"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None
