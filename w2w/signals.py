"""SIGTERM and SIGINT as a request to stop: at once outside a batch, after the batch inside one."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)  # scancel and the local executor send SIGTERM; a terminal SIGINT


class Stopped(BaseException):
    """A stop signal was obeyed. Not an Exception: a cell's `except Exception` (which writes a failed
    record) lets it through, so the cell's progress file is kept for a re-run to resume."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # the shell's status for a process ended by the signal: 143, 130


_state = {"signum": None, "deferred": 0}


def requested() -> int | None:
    """The stop signal received (and not yet obeyed), or None."""
    return _state["signum"]


def _on_signal(signum: int, frame) -> None:
    again = _state["signum"] is not None
    _state["signum"] = signum
    # Inside a batch the ranks stop together at its end (a rank that left mid-collective would hang the
    # others); a second signal is the user insisting.
    if not _state["deferred"] or again:
        _state["signum"] = None  # obeyed
        raise Stopped(signum)


@contextlib.contextmanager
def on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT stop this process (raising Stopped) while in the block; the previous handlers
    (submitit's, which ignores SIGTERM) are back after it. Off the main thread signals cannot be caught."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _state["signum"] = None
    for signum in SIGNALS:
        if previous[signum] is not signal.SIG_IGN:  # nohup's ignored SIGINT stays ignored
            signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a stop signal is only noted: the caller checks requested() between batches."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1


def check(agreed: int | None) -> None:
    """Raise Stopped if the ranks agreed that one of them was asked to stop (agreed: the signal or None)."""
    if agreed is not None:
        _state["signum"] = None
        raise Stopped(agreed)


def stopped_line(prog: str, stop: Stopped) -> str:
    """The one line a command prints when a signal stopped it."""
    return (f"{prog}: stopped by {signal.Signals(stop.signum).name}: every finished batch is kept; "
            "run the same command again to resume")
