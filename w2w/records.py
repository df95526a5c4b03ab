"""Sweep directory layout and record files: one JSON per (cell, rank), written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)
STATUS_OK = "ok"


class RecordError(ValueError):
    """A record file that does not parse or lacks required fields."""


def cell_dir(sweep_dir: str | Path, cid: str) -> Path:
    return Path(sweep_dir) / "cells" / cid


def record_path(sweep_dir: str | Path, cid: str, rank: int) -> Path:
    return cell_dir(sweep_dir, cid) / f"rank-{rank:05d}.json"


def timeline_path(sweep_dir: str | Path, cid: str, rank: int) -> Path:
    return cell_dir(sweep_dir, cid) / f"rank-{rank:05d}.timeline.parquet"


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
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: unreadable record ({exc})") from exc
    if not isinstance(record, dict):
        raise RecordError(f"{path}: not a JSON object")
    for key in ("cell_id", "rank", "world_size", "status"):
        if key not in record:
            raise RecordError(f"{path}: missing field '{key}'")
    return record


def cell_done(sweep_dir: str | Path, cid: str, world_size: int) -> bool:
    """Done: every rank's record exists and says ok."""
    for rank in range(world_size):
        path = record_path(sweep_dir, cid, rank)
        if not path.is_file():
            return False
        try:
            if read_record(path)["status"] != STATUS_OK:
                return False
        except RecordError:
            return False
    return True
