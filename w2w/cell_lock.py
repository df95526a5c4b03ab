"""One process per cell: an exclusive fcntl lock on a file in the cell's folder, naming its holder."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from w2w.errors import ConfigError
from w2w.records import cell_dir

LOCK_FILE = "cell.lock"  # in cells/<cell id>/; the reducer reads rank-*.json only


def lock_path(sweep_dir: str | Path, cid: str) -> Path:
    return cell_dir(sweep_dir, cid) / LOCK_FILE


def job_attempt() -> tuple[str | None, int]:
    """This process's job id (SLURM's, or the local executor's: its controller's pid, as the manifest
    names the job) and attempt (SLURM's restart count)."""
    env = os.environ
    job_id = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")
    return job_id, int(env.get("SLURM_RESTART_COUNT", 0) or 0)


def batch_writer() -> dict:
    """Who runs a batch, for its progress entry: a resumed cell's record says which attempt ran what."""
    job_id, attempt = job_attempt()
    return {"job_id": job_id, "attempt": attempt, "pid": os.getpid()}


def _holder_text(data: dict) -> str:
    job = f"job {data.get('job_id')}, attempt {data.get('attempt')}, " if data.get("job_id") else ""
    since = time.strftime("%H:%M:%S", time.localtime(data["since_unix_s"])) if data.get("since_unix_s") else "?"
    return f"pid {data.get('pid')} on {data.get('host')} ({job}since {since}: {data.get('command', '?')})"


class CellLock:
    """The cell's lock file, held with fcntl.lockf (a POSIX lock: kept over NFS, dropped by the kernel
    when its process dies, even by kill -9). The holder writes who it is into the file.

    POSIX locks belong to the process and go when it closes any descriptor of the file: the holder
    never opens the file a second time (holder() is for the processes that wait)."""

    def __init__(self, sweep_dir: str | Path, cid: str):
        self.path = lock_path(sweep_dir, cid)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except IsADirectoryError:
            raise ConfigError(f"{self.path} is a folder, not w2w's lock file: remove it and run again") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        job_id, attempt = job_attempt()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "job_id": job_id, "attempt": attempt,
              "since_unix_s": time.time(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:160]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ('another process' until it has)."""
        try:
            return _holder_text(json.loads(self.path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
