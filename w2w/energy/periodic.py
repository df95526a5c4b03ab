"""A daemon thread that calls a function now and then every interval_s, until it is stopped."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class PeriodicThread:
    """tick() at start and on a fixed grid of deadlines after it: the period does not drift by the
    time a tick takes. tick must not raise (a reader keeps its errors)."""

    def __init__(self, tick: Callable[[], None], interval_s: float, name: str,
                 clock: Callable[[], float] = time.perf_counter):
        self._tick = tick
        self.interval_s = interval_s
        self._name = name
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        self.run(self._stop.wait)

    def run(self, wait: Callable[[float], bool]) -> None:
        """The thread's loop: tick, then wait(seconds to the next deadline) until wait says stopped (True).
        The thread waits on its stop event; a test passes a wait that moves a fake clock."""
        start = self._clock()
        ticks = 0
        while True:
            self._tick()
            ticks += 1
            if wait(max(0.0, start + ticks * self.interval_s - self._clock())):
                return
