"""Cron schedules with an injected clock: due times, catch-up, state, locking, the loop."""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from jobs.schedule import RunState, ScheduleError, Scheduler, check_schedule, due, load_state, save_state, state_path
from storage.lock import LockHeldError, RootLock

REPO = Path(__file__).resolve().parents[2]
EVERY_10 = "*/10 * * * *"


@dataclass(frozen=True)
class Job:
    name: str
    root: str
    schedule: str | None = EVERY_10


def at(hh: int, mm: int, ss: int = 0) -> datetime:
    return datetime(2025, 3, 1, hh, mm, ss, tzinfo=UTC)


class Clock:
    """An injected clock; sleeping advances it."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)


class Recorder:
    """A run_job that records which jobs ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def __call__(self, config: Job) -> dict:
        self.ran.append(config.name)
        return {"rows": len(self.ran)}


@pytest.mark.parametrize(
    "last_run, now, expected",
    [
        (None, at(12, 34, 56), at(12, 30)),  # never ran: due at once, at the latest tick
        (at(12, 30), at(12, 39, 59), None),
        (at(12, 30), at(12, 40), at(12, 40)),  # a tick exactly at now is due
        (at(12, 30), at(15, 7), at(15, 0)),  # many ticks missed: only the latest is due
        (at(12, 40), at(12, 40), None),
    ],
)
def test_due(last_run, now, expected):
    state = None if last_run is None else RunState(last_run, "ok")
    assert due(Job("a", "/r"), state, now) == expected


def test_due_is_evaluated_in_utc():
    paris = timezone(timedelta(hours=1))
    daily = Job("a", "/r", "0 3 * * *")
    assert due(daily, None, datetime(2025, 3, 1, 4, 30, tzinfo=paris)) == at(3, 0)
    assert due(daily, RunState(at(3, 0), "ok"), datetime(2025, 3, 1, 23, 59, tzinfo=paris)) is None
    with pytest.raises(ValueError, match="timezone-aware"):
        due(daily, None, datetime(2025, 3, 1, 4, 30))


@pytest.mark.parametrize("expression", ["61 * * * *", "* * *", "every day", "", "0 0 31 2 *", "0 0 30 2 *"])
def test_bad_cron_expression_is_a_clear_error(tmp_path, expression):
    job = Job("nightly", str(tmp_path), expression)
    with pytest.raises(ScheduleError, match=re.escape(f"job 'nightly': bad cron expression '{expression}'")):
        check_schedule(job)
    with pytest.raises(ScheduleError, match="bad cron expression"):
        Scheduler([job], Recorder())


def test_a_cron_expression_that_never_fires_is_one_line_from_the_cli(tmp_path, capsys):
    """`0 0 31 2 *` parses, and once reached croniter's CroniterBadDateError as a traceback."""
    from jobs.cli import main

    cfg = tmp_path / "never.yaml"
    cfg.write_text(f"input: {tmp_path}\nroot: {tmp_path / 'store'}\nschedule: '0 0 31 2 *'\n")
    assert main(["schedule", str(cfg), "--once"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mmembed: error: job 'never': bad cron expression '0 0 31 2 *'") and err.count("\n") == 1


def test_a_root_that_is_a_file_fails_its_run_with_one_line(tmp_path, capsys):
    """Its lock once raised FileExistsError through the scheduler."""
    from jobs.cli import main

    (tmp_path / "store").write_text("a file")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {tmp_path}\nroot: {tmp_path / 'store'}\nschedule: '0 * * * *'\n")
    assert main(["schedule", str(cfg), "--once"]) == 1
    assert capsys.readouterr().err.splitlines()[-1].endswith("is a file, not a store")


def test_an_unreadable_state_fails_its_job_only(tmp_path):
    """A state file that is not the scheduler's JSON raised ValueError or KeyError through every job."""
    broken, fine = Job("broken", str(tmp_path / "a")), Job("fine", str(tmp_path / "b"))
    state_path(broken).parent.mkdir(parents=True)
    state_path(broken).write_text('{"last_run": "yesterday"}')
    recorder = Recorder()
    results = Scheduler([broken, fine], recorder, clock=lambda: at(12, 1)).run_once()
    assert [(r["job"], r["status"]) for r in results] == [("broken", "failed"), ("fine", "ok")]
    assert "its state" in results[0]["error"] and "unreadable" in results[0]["error"] and recorder.ran == ["fine"]


def test_a_home_relative_root_is_locked_and_recorded_where_the_job_writes(tmp_path, monkeypatch):
    """The scheduler locked `~/store` unexpanded (a directory named '~' under the working directory) while the job
    it ran locked and wrote the expanded path."""
    from jobs.run import root_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    job = Job("a", "~/store/")
    store = tmp_path / "home" / "store"
    seen = []
    scheduler = Scheduler([job], lambda config: seen.append(root_path(config.root)) or {}, clock=lambda: at(12, 1))
    assert scheduler.locks[0].path == store / "_lock"
    assert state_path(job) == store / "_schedule" / "a.json"
    assert [r["status"] for r in scheduler.run_once()] == ["ok"] and seen == [str(store)]
    assert (store / "_schedule" / "a.json").exists() and not (tmp_path / "~").exists()


def test_job_without_schedule_or_with_a_bad_name_or_root_is_refused(tmp_path):
    with pytest.raises(ScheduleError, match="job 'a' has no schedule"):
        Scheduler([Job("a", str(tmp_path), None)], Recorder())
    with pytest.raises(ScheduleError, match="job name '../a'"):
        Scheduler([Job("../a", str(tmp_path))], Recorder())
    with pytest.raises(ScheduleError, match="job name None"):
        Scheduler([Job(None, str(tmp_path))], Recorder())
    for root in (None, "s3://bucket/store"):
        with pytest.raises(ScheduleError, match="schedules need a local ROOT"):
            Scheduler([Job("a", root)], Recorder())
    with pytest.raises(ScheduleError, match="share a name and a ROOT"):
        Scheduler([Job("a", str(tmp_path)), Job("a", f"file://{tmp_path}")], Recorder())


def test_missed_runs_are_caught_up_once(tmp_path):
    clock, run_job = Clock(at(12, 34)), Recorder()
    scheduler = Scheduler([Job("a", str(tmp_path))], run_job, clock=clock)
    [first] = scheduler.run_once()
    assert first == {
        "job": "a",
        "root": str(tmp_path),
        "scheduled": at(12, 30).isoformat(),
        "status": "ok",
        "result": {"rows": 1},
        "error": None,
    }
    clock.now = at(12, 39)
    assert scheduler.run_once() == []
    clock.now = at(15, 7)  # the scheduler was down for 15 ticks
    assert [r["scheduled"] for r in scheduler.run_once()] == [at(15, 0).isoformat()]
    assert scheduler.run_once() == []
    assert run_job.ran == ["a", "a"]


def test_state_persists_across_scheduler_instances(tmp_path):
    job = Job("a", str(tmp_path))
    assert len(Scheduler([job], Recorder(), clock=Clock(at(12, 34))).run_once()) == 1
    saved = json.loads((tmp_path / "_schedule" / "a.json").read_text())
    assert saved == {"job": "a", "schedule": EVERY_10, "last_run": at(12, 30).isoformat(), "status": "ok"}
    assert load_state(job) == RunState(at(12, 30), "ok")
    later = Recorder()
    assert Scheduler([job], later, clock=Clock(at(12, 36))).run_once() == []
    assert len(Scheduler([job], later, clock=Clock(at(12, 41))).run_once()) == 1
    assert later.ran == ["a"]
    assert [p.name for p in (tmp_path / "_schedule").iterdir()] == ["a.json"]  # no temporaries left


def test_jobs_on_one_root_run_one_after_another_each_under_the_lock(tmp_path):
    events = []

    def run_job(config: Job) -> dict:
        lock = json.loads((tmp_path / "_lock").read_text())
        events.append((config.name, lock["job_id"], lock["pid"]))
        with pytest.raises(LockHeldError):  # nobody else can take the ROOT meanwhile
            RootLock(str(tmp_path)).acquire()
        events.append((config.name, "done"))
        return {}

    jobs = [Job("a", str(tmp_path)), Job("b", f"file://{tmp_path}", "*/5 * * * *")]
    results = Scheduler(jobs, run_job, clock=Clock(at(12, 34))).run_once()
    assert [(r["job"], r["status"], r["scheduled"]) for r in results] == [
        ("a", "ok", at(12, 30).isoformat()),
        ("b", "ok", at(12, 30).isoformat()),
    ]
    assert events == [("a", "schedule:a", os.getpid()), ("a", "done"), ("b", "schedule:b", os.getpid()), ("b", "done")]
    assert not (tmp_path / "_lock").exists()


HOLDER = r"""
import sys
from storage.lock import RootLock
lock = RootLock(sys.argv[1], "manual-backfill").acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
"""


def test_run_is_skipped_while_another_process_holds_the_root(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        clock, run_job = Clock(at(12, 34)), Recorder()
        scheduler = Scheduler([Job("a", str(tmp_path))], run_job, clock=clock)
        [skipped] = scheduler.run_once()
        assert skipped["status"] == "skipped" and skipped["scheduled"] == at(12, 30).isoformat()
        assert f"job manual-backfill (pid {holder.pid} " in skipped["error"]
        assert run_job.ran == [] and load_state(Job("a", str(tmp_path))) is None
    finally:
        holder.communicate("\n", timeout=30)
    clock.now = at(12, 35)
    [ran] = scheduler.run_once()  # still due once the lock is free
    assert (ran["status"], ran["scheduled"]) == ("ok", at(12, 30).isoformat())
    assert run_job.ran == ["a"]


def test_run_done_by_another_scheduler_while_waiting_for_the_lock_is_not_repeated(tmp_path):
    job = Job("a", str(tmp_path))

    class RacedLock(RootLock):
        def acquire(self, *args, **kwargs):
            # another scheduler finished this very run just before we got the lock
            save_state(job, RunState(at(12, 30), "ok"))
            return super().acquire(*args, **kwargs)

    run_job = Recorder()
    assert Scheduler([job], run_job, clock=Clock(at(12, 34)), lock_factory=RacedLock).run_once() == []
    assert run_job.ran == []


def test_failed_run_is_recorded_and_tried_again_at_the_next_time(tmp_path):
    job = Job("a", str(tmp_path))
    attempts = []

    def run_job(config: Job) -> dict:
        attempts.append(config.name)
        raise RuntimeError("boom")

    clock = Clock(at(12, 34))
    scheduler = Scheduler([job], run_job, clock=clock)
    [failed] = scheduler.run_once()
    assert (failed["status"], failed["error"], failed["result"]) == ("failed", "RuntimeError: boom", None)
    assert load_state(job) == RunState(at(12, 30), "failed")
    assert scheduler.run_once() == []
    clock.now = at(12, 40)
    assert [r["status"] for r in scheduler.run_once()] == ["failed"]
    assert attempts == ["a", "a"]
    assert not (tmp_path / "_lock").exists()


class Stop(Exception):
    pass


def run_until(scheduler: Scheduler, clock: Clock, sleeps: int) -> list[tuple[str, datetime]]:
    """Run the scheduler's loop for `sleeps` sleeps; return (job, clock time) of each run."""
    runs = []
    scheduler.run_job = lambda config: runs.append((config.name, clock.now)) or {}

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if len(clock.slept) == sleeps:
            raise Stop

    scheduler.sleep = sleep
    with pytest.raises(Stop):
        scheduler.run_forever()
    return runs


def test_run_forever_sleeps_until_the_next_scheduled_time(tmp_path):
    clock = Clock(at(12, 34, 30))
    jobs = [Job("a", str(tmp_path)), Job("b", str(tmp_path), "45 12 * * *")]
    runs = run_until(Scheduler(jobs, Recorder(), clock=clock, max_sleep=3600), clock, sleeps=4)
    assert clock.slept == [330, 300, 300, 600]
    assert runs == [
        ("a", at(12, 34, 30)),
        ("b", at(12, 34, 30)),
        ("a", at(12, 40)),
        ("b", at(12, 45)),
        ("a", at(12, 50)),
    ]


def test_run_forever_wakes_at_least_every_max_sleep(tmp_path):
    clock = Clock(at(12, 34, 30))
    runs = run_until(Scheduler([Job("a", str(tmp_path))], Recorder(), clock=clock, max_sleep=60), clock, sleeps=7)
    assert clock.slept == [60, 60, 60, 60, 60, 30, 60]
    assert runs == [("a", at(12, 34, 30)), ("a", at(12, 40))]


def test_schedule_cli_runs_a_due_job_once(tmp_path, ray_session, capsys):
    from jobs.cli import main
    from storage.store import Store as EmbeddingStore

    media = tmp_path / "media"
    media.mkdir()
    (media / "a.txt").write_text("scheduled text")
    cfg = tmp_path / "hourly.yaml"
    cfg.write_text(f"input: {media}\nroot: {tmp_path / 'store'}\nschedule: '0 * * * *'\nmodels:\n  text: [minilm-l6]\n")
    assert main(["schedule", str(cfg), "--once"]) == 0
    assert main(["schedule", str(cfg), "--once"]) == 0  # already ran for this hour: nothing due
    records = EmbeddingStore(str(tmp_path / "store")).jobs()
    assert len(records) == 1 and records[0]["counts"]["text/minilm-l6"]["embedded"] == 1
    assert "hourly: ok" in capsys.readouterr().err
