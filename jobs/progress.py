"""Progress lines on stderr: items done / total and items/s, at most a few times a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None, every: float = 0.5):
        self.label, self.total, self.stream, self.every = label, total, stream or sys.stderr, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            self._print(now)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _print(self, now: float) -> None:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        print(f"{self.label}: {self.done}/{self.total}{pct} {self.rate():.1f} items/s", file=self.stream, flush=True)
