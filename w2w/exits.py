"""How a command ends: a closed stdout (`| head`, `>&-`) quietly, as Unix tools do, never with a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

# The shell's status for a process ended by SIGPIPE (128 + 13), what `head`'s writer normally gets.
EXIT_BROKEN_PIPE = 141

F = TypeVar("F", bound=Callable[..., int])


def quiet_on_broken_pipe(main: F) -> F:
    """Wrap a command's main: a reader that stops early (`| head`) ends it quietly with 141."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            status = main(*args, **kwargs)
            if sys.stdout is not None:  # None: started with stdout closed (`>&-`), where print writes nothing
                sys.stdout.flush()  # a block-buffered stdout (no PYTHONUNBUFFERED) meets the closed pipe here
            return status
        except BrokenPipeError:
            # Python flushes stdout again at exit, which would fail and print: point it at /dev/null.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            return EXIT_BROKEN_PIPE

    return wrapped  # type: ignore[return-value]
