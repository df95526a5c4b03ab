"""A local process known by its PID and start time, so that a reused PID is not taken for it."""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")
BOOT_ID = PROC / "sys" / "kernel" / "random" / "boot_id"
# The command of submitit's local controller (python -m submitit.local._local FOLDER): a job recorded
# before start times were kept is recognised by it.
LOCAL_CONTROLLER = "submitit.local._local"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command (field 3 on), or None where there is no such process."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_stamp(pid: int) -> str | None:
    """'<boot id>:<start time>' of a live process (field 22 of /proc/<pid>/stat, clock ticks since boot);
    two processes never share it, even when one reuses the other's PID."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        boot = BOOT_ID.read_text().strip()
    except OSError:
        boot = ""
    return f"{boot}:{fields[19]}"


def _command(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int, stamp: str | None) -> tuple[bool, str]:
    """Whether the process recorded as (pid, stamp) still runs, and why not where it does not. Without
    a stamp (recorded by an older w2w), its command must be submitit's local controller."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False, ""
    if stamp is not None:
        if start_stamp(pid) != stamp:
            return False, f"pid {pid} now belongs to another process (started later)"
        return True, ""
    if LOCAL_CONTROLLER not in _command(pid):
        return False, f"pid {pid} now belongs to another process ({_command(pid)[:60].strip() or '?'})"
    return True, ""
