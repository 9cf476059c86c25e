"""Ray's own output during a job goes to a log file, so that the job's stderr carries mmembed's lines alone.

Ray writes to the driver's stdout and stderr from several places: its Python loggers (the token-auth notice, Ray
Data's execution lines), the lines of its workers (which the driver forwards), and its C++ core worker, which writes
to file descriptor 2 itself (an error-level `core_worker.cc` line about actor constructor arguments on every job
with an encoder pool). Pointing descriptors 1 and 2 at the file catches them all; mmembed's progress goes to a
stream on the original stderr meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from encoders.registry import model_home


def log_path(job_id: str) -> Path:
    """Where a job's Ray output goes: $MMEMBED_HOME/logs/<job_id>.log."""
    return model_home() / "logs" / f"{job_id}.log"


def _writes_to_fd2(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a StringIO, pytest's capture: not the descriptor
        return False


def _restore(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, original in zip((1, 2), saved):
        os.dup2(original, fd)
        os.close(original)


@contextlib.contextmanager
def diverted(path: str | None) -> Iterator[TextIO]:
    """While the block runs, descriptors 1 and 2 write to `path` (appended); yields the stream for mmembed's own
    lines, the original stderr. `path` None (--verbose): nothing is diverted, and the stream is sys.stderr."""
    if path is None:
        yield sys.stderr
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        console = sys.stderr
        if _writes_to_fd2(sys.stderr):  # the terminal: a stream of its own on the descriptor, kept apart from fd 2
            console = stack.enter_context(open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace"))
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        stack.callback(_restore, saved)
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        yield console
