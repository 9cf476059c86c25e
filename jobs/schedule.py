"""Cron schedules for job configs: which runs are due, and a scheduler that runs them.

A job config carries `schedule: "<cron expression>"` (croniter syntax: 5 fields, an optional
6th for seconds, or @hourly/@daily/...), evaluated in UTC. The scheduler remembers, per job,
the scheduled time of its last completed or attempted run in ROOT/_schedule/<name>.json.

Semantics:
- A job is due at the most recent scheduled time <= now that is after its last run. Runs
  missed while no scheduler was up are caught up once, at that most recent time, not once
  per missed time: each run embeds everything new, so replaying old times would do nothing.
- A job that has never run is due at once, at its most recent scheduled time: starting a
  scheduler means "bring the store up to date now", not "wait for the next tick".
- A run that fails is recorded as attempted; it is tried again at the next scheduled time.
- A run whose ROOT lock is held by another live job is skipped and not recorded, so it
  stays due and runs, once, at a later wake after the lock is free.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from croniter import CroniterError, croniter

from encoders.errors import MmembedError
from storage.lock import LockError, LockHeldError, RootLock, local_path
from storage.store import canonical_root

log = logging.getLogger(__name__)

STATE_DIR = "_schedule"
MAX_SLEEP = 60.0  # seconds; run_forever wakes at least this often to retry skipped runs
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ScheduleError(MmembedError):
    """A job's schedule (cron expression, name or ROOT) is invalid."""


class Scheduled(Protocol):
    """What the scheduler needs of a job config."""

    name: str
    root: str
    schedule: str | None


@dataclass(frozen=True)
class RunState:
    """A job's last scheduled run: its cron time and how it ended ("ok" or "failed")."""

    last_run: datetime
    status: str


def utc_now() -> datetime:
    return datetime.now(UTC)


def check_schedule(config: Scheduled) -> str:
    """The config's cron expression, validated; ScheduleError naming the job if it is bad."""
    expression = config.schedule
    if not isinstance(expression, str):
        raise ScheduleError(f'job {config.name!r} has no schedule: give it `schedule: "<cron expression>"`')
    try:
        # an expression can parse and still name no time at all (`0 0 31 2 *`): find one on each side of now
        croniter(expression, utc_now()).get_prev(datetime)
        croniter(expression, utc_now()).get_next(datetime)
    except CroniterError as e:
        raise ScheduleError(f"job {config.name!r}: bad cron expression {expression!r}: {e}") from None
    return expression


def due(config: Scheduled, state: RunState | None, now: datetime) -> datetime | None:
    """The scheduled time to run `config` for at `now` (timezone-aware), or None if not due."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    # croniter's get_prev is strictly before its start; a microsecond later makes it <= now.
    start = now.astimezone(UTC) + timedelta(microseconds=1)
    latest = croniter(check_schedule(config), start).get_prev(datetime)
    return latest if state is None or state.last_run < latest else None


def next_time(config: Scheduled, now: datetime) -> datetime:
    """The first scheduled time strictly after `now`."""
    return croniter(check_schedule(config), now.astimezone(UTC)).get_next(datetime)


def state_path(config: Scheduled) -> Path:
    """ROOT/_schedule/<name>.json; ScheduleError for a name unfit for a file or a non-local ROOT."""
    root = local_path(canonical_root(config.root)) if config.root else None
    if root is None:
        raise ScheduleError(f"job {config.name!r}: schedules need a local ROOT, not {config.root}")
    if not _NAME.fullmatch(config.name or ""):
        raise ScheduleError(f"job name {config.name!r} must be letters, digits, '.', '_' or '-'")
    return root / STATE_DIR / f"{config.name}.json"


def load_state(config: Scheduled) -> RunState | None:
    """The job's recorded last run, or None if it has never run."""
    path = state_path(config)
    try:
        record = json.loads(path.read_text())
        return RunState(datetime.fromisoformat(record["last_run"]), record["status"])
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise ScheduleError(f"job {config.name!r}: ROOT {config.root} is a file, not a store") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise ScheduleError(f"job {config.name!r}: its state {path} is unreadable ({reason}); delete it") from None


def save_state(config: Scheduled, state: RunState) -> None:
    """Record the job's last run atomically (write a temporary file, then rename it)."""
    path = state_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    record = {
        "job": config.name,
        "schedule": config.schedule,
        "last_run": state.last_run.isoformat(),
        "status": state.status,
    }
    with open(temporary, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


class Scheduler:
    """Runs job configs on their cron schedules, each run under its ROOT's lock.

    run_job(config) runs one job and returns its summary. It is called with the ROOT lock
    already held by this process, so it must not take that lock again. Jobs run one at a
    time, in config order: each job already uses the whole Ray cluster, so running two
    roots at once would only make them contend.
    """

    def __init__(
        self,
        configs: Sequence[Scheduled],
        run_job: Callable[[Scheduled], dict],
        clock: Callable[[], datetime] = utc_now,
        sleep: Callable[[float], None] = time.sleep,
        lock_factory: Callable[..., RootLock] = RootLock,
        max_sleep: float = MAX_SLEEP,
    ) -> None:
        if not configs:
            raise ScheduleError("no jobs to schedule")
        paths = [state_path(config) for config in configs]
        if len(set(paths)) != len(paths):
            raise ScheduleError("two scheduled jobs share a name and a ROOT: give each its own name")
        for config in configs:
            check_schedule(config)
        self.configs = list(configs)
        self.run_job = run_job
        self.clock = clock
        self.sleep = sleep
        self.locks = [lock_factory(config.root, job_id=f"schedule:{config.name}") for config in configs]
        self.max_sleep = max_sleep

    def run_once(self) -> list[dict]:
        """Run every job that is due now. One result per due job:
        {job, root, scheduled, status: "ok" | "failed" | "skipped", result: run_job's, error}."""
        now = self.clock()
        results = []
        for config, lock in zip(self.configs, self.locks):
            try:
                scheduled = due(config, load_state(config), now)
            except ScheduleError as e:  # this job's own state is broken: the others still run
                log.warning("job %s: failed %s", config.name, e)
                results.append(
                    {"job": config.name, "root": config.root, "scheduled": None, "status": "failed", "result": None}
                    | {"error": str(e)}
                )
                continue
            result = None if scheduled is None else self._run(config, lock, scheduled, now)
            if result is not None:
                level = logging.INFO if result["status"] == "ok" else logging.WARNING
                log.log(
                    level,
                    "job %s at %s: %s %s",
                    config.name,
                    result["scheduled"],
                    result["status"],
                    result["error"] or "",
                )
                results.append(result)
        return results

    def run_forever(self) -> None:
        """Run due jobs, sleep until the next scheduled time (at most max_sleep), repeat."""
        while True:
            self.run_once()
            now = self.clock()
            wake = min(next_time(config, now) for config in self.configs)
            self.sleep(min(max((wake - now).total_seconds(), 0.0), self.max_sleep))

    def _run(self, config: Scheduled, lock: RootLock, scheduled: datetime, now: datetime) -> dict | None:
        """Run one due job under its ROOT lock; None if another scheduler ran it meanwhile."""
        result = {
            "job": config.name,
            "root": config.root,
            "scheduled": scheduled.isoformat(),
            "result": None,
            "error": None,
        }
        try:
            lock.acquire()
        except LockHeldError as e:
            return result | {"status": "skipped", "error": str(e)}
        except LockError as e:
            return result | {"status": "failed", "error": str(e)}
        try:
            if due(config, load_state(config), now) != scheduled:
                return None
            try:
                result |= {"status": "ok", "result": self.run_job(config)}
            except Exception as e:
                result |= {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            save_state(config, RunState(scheduled, result["status"]))
        finally:
            lock.release()
        return result
