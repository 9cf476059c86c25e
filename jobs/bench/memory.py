"""Peak memory of a process tree (the bench, or a subprocess job, with Ray's processes), from /proc."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from .plan import MEMORY_SAMPLING, TOP_PROCESSES


def _process_tree(root: int) -> list[int]:
    """`root` and every process descending from it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return str(pid)


def _private_bytes(pid: int) -> int:
    """The process's private memory (RssAnon: heap, arrays, model weights), from /proc/PID/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _shm_bytes() -> int:
    """Shared memory in use (/dev/shm, where Ray's object store lives); 0 where there is none."""
    try:
        return shutil.disk_usage("/dev/shm").used
    except OSError:
        return 0


class PeakMemory:
    """Peak memory of a process and all its descendants (Ray's GCS, raylet and workers included).

    Sampled every `interval` s as the sum of each process's private memory (RssAnon) plus the
    shared memory in use above its level at the start, i.e. Ray's object store counted once. Shared
    libraries are left out: they are page cache, mapped by every worker. Reading PSS from
    smaps_rollup instead cost ~3.5 ms per Ray process per sample (each maps the whole object store):
    5-7% of a core, taken from the pipelines being timed; a sample now takes ~2 ms in all.
    """

    METHOD = (
        f"sum of private memory (RssAnon, /proc/PID/status) over the process tree incl. Ray GCS, raylet and workers, "
        f"plus /dev/shm in use above its level at the start (Ray's object store), sampled every {MEMORY_SAMPLING:g} s"
    )

    def __init__(self, pid: int | None = None, interval: float = MEMORY_SAMPLING):
        self.pid, self.interval = pid or os.getpid(), interval
        self.peak = 0
        self.at_peak: list[tuple[int, int]] = []  # (pid, bytes), largest first, at the peak sample
        self.names: dict[int, str] = {}
        self.shm_at_start = _shm_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            sizes = sorted(((_private_bytes(p), p) for p in _process_tree(self.pid)), reverse=True)
            total = sum(size for size, _ in sizes) + max(0, _shm_bytes() - self.shm_at_start)
            if total > self.peak:
                self.peak, self.at_peak = total, [(p, size) for size, p in sizes[:TOP_PROCESSES]]
                self.names = {p: _name(p) for p, _ in self.at_peak}  # now, while they live
            if self._stop.wait(self.interval):
                return

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    def largest(self) -> list[dict]:
        """The largest processes at the peak: name (Ray's process title for a worker) and MB."""
        return [{"process": self.names.get(p, str(p)), "mb": round(size / 2**20, 1)} for p, size in self.at_peak]

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
