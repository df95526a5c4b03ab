"""manifest.json: what every w2w-sweep into a sweep_dir planned and submitted, and its version 1 upgrade."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from w2w.schema import NewerSchemaError, RecordError, Schema, check_version

MANIFEST_VERSION = 2  # manifest.json's layout (Manifest)
MANIFEST = "manifest.json"  # in the sweep directory


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
