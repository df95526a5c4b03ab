"""Files of a sweep written whole: atomic writes, JSON, and whether a folder can hold them."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from w2w.schema import Schema

_UMASK = os.umask(0)
os.umask(_UMASK)


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
    """`obj` (plain JSON or a Schema) as indented JSON with sorted keys, atomically."""
    if isinstance(obj, Schema):
        obj = obj.to_dict()
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


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
