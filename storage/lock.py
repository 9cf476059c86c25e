"""The per-ROOT job lock: at most one job writes to an embedding store at a time.

The lock is the file ROOT/_lock, holding JSON {pid, host, job_id, started, proc_start}.
`proc_start` is "<boot id>:<start tick>" from /proc (None where /proc is missing); with the pid
it tells the holder apart from a later process that reuses its pid.

Taking the lock: the record is written to a private temporary file (O_CREAT|O_EXCL), flocked,
then published with os.link, which fails if ROOT/_lock exists. So the lock never exists
without its record, and it is flocked from its first moment until its holder releases or dies
(the kernel drops a flock when its process exits, SIGKILL included).

Recovering a stale lock: a contender opens ROOT/_lock and tries a non-blocking flock on it.
Busy means a live holder (or another contender recovering it): the lock is held. Won, and
ROOT/_lock is still that same file, the contender alone may remove it, and does so only if the
record names this host and a pid that is gone, a zombie, or now another process; then it
retries the link. Two recoverers cannot both win: the flock admits one at a time, and the one
that comes second finds ROOT/_lock replaced or gone.

Object stores (s3://, gs://) have no exclusive create nor flock, so the lock of such a ROOT is
a file on this host, under the temporary directory, named after the ROOT: it keeps two jobs on
this host (a scheduler's, a user's) apart, not jobs on two hosts; those must be kept apart by
whoever starts them. A lock held by a job on another host is never treated as stale: if that
job is gone, delete ROOT/_lock by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from encoders.errors import MmembedError

from .store import canonical_root

log = logging.getLogger(__name__)

LOCK_NAME = "_lock"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"
_STARTTIME = 19  # /proc/<pid>/stat field 22, counted from field 3 (the one after the command name)


class LockError(MmembedError):
    """The ROOT lock cannot be used (an unreadable lock file, a second acquire)."""


class LockHeldError(LockError):
    """Another live job holds the ROOT lock."""


def local_path(root: str) -> Path | None:
    """The local directory of ROOT given as a path or file:// URI; None for any other URI."""
    if "://" not in root:
        return Path(root)
    url = urlparse(root)
    if url.scheme == "file" and url.netloc in ("", "localhost"):
        return Path(unquote(url.path))
    return None


class RootLock:
    """Exclusive lock on a store ROOT.

    `with RootLock(root, job_id):` fails at once if a live job holds it;
    `with RootLock(root, job_id).acquire(wait=True):` waits for it.
    """

    def __init__(self, root: str, job_id: str = "") -> None:
        root = canonical_root(root)
        directory = local_path(root)
        self.host_only = directory is None
        if directory is None:
            directory = Path(tempfile.gettempdir()) / "mmembed-locks" / hashlib.sha256(root.encode()).hexdigest()[:16]
        self.root = root
        self.job_id = job_id
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, wait: bool = False, timeout: float | None = None, poll: float = 0.2) -> RootLock:
        """Take the lock, recovering a stale one; if a live job holds it, raise LockHeldError,
        or with wait=True poll every `poll` s until it is free (raising after `timeout` s)."""
        if self._fd is not None:
            raise LockError(f"{self.root} is already locked by this RootLock")
        if self.host_only:
            log.warning(
                "%s is locked on this host only (%s): no job on another host may write to it meanwhile",
                self.root,
                self.path,
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise LockError(f"{self.root} is a file, not a store (or lies under one)") from None
        except OSError as e:
            raise LockError(f"cannot lock {self.root}: {e.strerror}") from None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            holder = self._attempt()
            if holder is None:
                return self
            if not wait:
                raise LockHeldError(_held_message(self.root, self.path, holder))
            if deadline is not None and time.monotonic() >= deadline:
                raise LockHeldError(f"{_held_message(self.root, self.path, holder)}; gave up after {timeout:g}s")
            time.sleep(poll)

    def release(self) -> None:
        """Give the lock up; a no-op when it is not held."""
        if self._fd is None:
            return
        try:
            # Unlink while still flocked, so no contender can judge the record stale meanwhile;
            # and only our own file, in case someone deleted ours and another job took the lock.
            if _same_file(self.path, self._fd):
                os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RootLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _attempt(self) -> dict | None:
        """One try: take the lock (None) or return the record of its live holder."""
        while True:
            if self._publish():
                return None
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # released between our link and our open
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return _read_record(self.path, fd)
                if not _same_file(self.path, fd):
                    continue  # released or recovered by someone else meanwhile
                holder = _read_record(self.path, fd)
                if not _stale(holder):
                    return holder
                log.warning("recovering stale lock %s of dead pid %s", self.path, holder["pid"])
                os.unlink(self.path)
            finally:
                os.close(fd)

    def _publish(self) -> bool:
        """Link a flocked file holding our record to ROOT/_lock; False if the lock exists."""
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "job_id": self.job_id,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "proc_start": _process_start(os.getpid()),
        }
        temporary = self.path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex}.tmp")
        fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        published = False
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)  # the file is ours alone, so this never waits
            os.link(temporary, self.path)
            published = True
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
            if not published:
                os.close(fd)
        if published:
            self._fd = fd
        return published


def _same_file(path: Path, fd: int) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


RECORD = {"pid": int, "host": str, "job_id": str, "started": str, "proc_start": (str, type(None))}


def _read_record(path: Path, fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0))
    except ValueError as e:
        raise LockError(f"lock file {path} is unreadable ({e}); delete it if no job is running") from None
    if not isinstance(record, dict):
        raise LockError(f"lock file {path} is unreadable (not a JSON object); delete it if no job is running")
    for key, kind in RECORD.items():
        if key not in record:
            raise LockError(f"lock file {path} is unreadable (it has no {key!r}); delete it if no job is running")
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise LockError(
                f"lock file {path} is unreadable ({key!r} is {record[key]!r}); delete it if no job is running"
            )
    return record


def _stale(holder: dict) -> bool:
    return holder["host"] == socket.gethostname() and not _alive(holder["pid"], holder["proc_start"])


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # the pid exists but belongs to another user
    return start is None or _process_start(pid) == start


def _process_start(pid: int) -> str | None:
    """'<boot id>:<start tick>' of a running pid; None without /proc, or if it is gone or a zombie."""
    try:
        boot = Path(_BOOT_ID).read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')'.
    fields = stat[stat.rindex(")") + 1 :].split()
    return None if fields[0] == "Z" else f"{boot}:{fields[_STARTTIME]}"


def _held_message(root: str, path: Path, holder: dict) -> str:
    message = (
        f"{root} is locked by job {holder['job_id'] or '?'} (pid {holder['pid']} on {holder['host']} "
        f"since {holder['started']}); retry later or pass --wait-lock to wait for it"
    )
    if holder["host"] != socket.gethostname():
        message += f"; if that job is gone, delete {path}"
    return message
