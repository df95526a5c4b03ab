"""One process per cell: an exclusive fcntl lock on a file in the cell's folder, naming its holder."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
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


# A lock taken on a file that was replaced between its open and its lock is retried, this many times at most.
ACQUIRE_TRIES = 8
# flock on the cell's folder is refused where it is emulated with POSIX locks (NFS needs a writable file):
# the lock file alone decides there.
_NO_FLOCK = (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)
_BUSY = (errno.EACCES, errno.EAGAIN)


class CellLock:
    """The cell's lock file, held with fcntl.lockf (a POSIX lock: kept over NFS, dropped by the kernel
    when its process dies, even by kill -9). The holder writes who it is into the file.

    Only the holder's death releases it. POSIX locks belong to the process and go when it closes any
    descriptor of the file: the holder never opens the file a second time (holder() and taken() are for
    the processes that wait or ask), and also holds flock on the cell's folder, which a second descriptor
    does not drop. A deleted lock file lets no second runner in: the folder's flock is still held (where
    the filesystem has flock), and a lock taken on a file that was replaced meanwhile is taken again."""

    def __init__(self, sweep_dir: str | Path, cid: str):
        self.path = lock_path(sweep_dir, cid)
        self._fd: int | None = None
        self._dir_fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if no other process holds it; never waits."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._lock_folder():
            return False
        for _ in range(ACQUIRE_TRIES):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except IsADirectoryError:
                self._unlock_folder()
                raise ConfigError(f"{self.path} is a folder, not w2w's lock file: remove it and run again") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                self._unlock_folder()
                if exc.errno in _BUSY:
                    return False
                raise
            if self._same_file(fd):
                self._fd = fd
                self._write_holder(fd)
                return True
            os.close(fd)  # deleted or replaced between open and lock: the lock must be on the file at the path
        self._unlock_folder()
        raise OSError(f"{self.path}: replaced {ACQUIRE_TRIES} times while it was being locked")

    def _same_file(self, fd: int) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def _lock_folder(self) -> bool:
        """flock the cell's folder (False: another process holds it); where flock is refused, go on."""
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _BUSY:
                return False
            if exc.errno in _NO_FLOCK:
                return True
            raise
        self._dir_fd = fd
        return True

    def _unlock_folder(self) -> None:
        if self._dir_fd is not None:
            fd, self._dir_fd = self._dir_fd, None
            os.close(fd)  # the folder's flock goes with its only descriptor

    @staticmethod
    def _write_holder(fd: int) -> None:
        job_id, attempt = job_attempt()
        me = {"pid": os.getpid(), "host": socket.gethostname(), "job_id": job_id, "attempt": attempt,
              "since_unix_s": time.time(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:160]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ('another process' until it has)."""
        try:
            return _holder_text(json.loads(self.path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def taken(self) -> bool:
        """Whether another process holds the lock now, asked without taking it (F_GETLK): w2w-status may
        ask while a runner is about to take it. Never call it in the holder (it opens the file)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        except OSError:
            return False
        finally:
            os.close(fd)
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
            self._unlock_folder()


# struct flock: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t), padded as C pads it.
_FLOCK = "hhqqi4x"
