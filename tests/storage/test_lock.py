"""RootLock with real processes: contention, waiting, SIGKILLed holders, racing recoverers."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.lock import LockError, LockHeldError, RootLock, _process_start

REPO = Path(__file__).resolve().parents[2]

# Runs in a child process: `ROOT JOB hold wait|nowait [GO]` takes the lock (after GO exists),
# says "locked <time>" and holds it until a line arrives on stdin, then says "released <time>";
# or says "held <message>" and exits 3. `ROOT JOB turn GO JOURNAL` waits for GO, takes the lock
# when it can, journals its entry and exit while inside, and dies holding it: a stale lock.
CHILD = r"""
import os, sys, time
from storage.lock import LockHeldError, RootLock

root, job, mode, *args = sys.argv[1:]
lock = RootLock(root, job)

def wait_for(go):
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)

if mode == "hold":
    if len(args) > 1:
        wait_for(args[1])
    try:
        lock.acquire(wait=args[0] == "wait", timeout=30, poll=0.02)
    except LockHeldError as e:
        print("held", e, flush=True)
        sys.exit(3)
    print("locked", time.time(), flush=True)
    sys.stdin.readline()
    lock.release()
    print("released", time.time(), flush=True)
else:
    go, journal = args
    wait_for(go)
    lock.acquire(wait=True, timeout=60, poll=0.005)
    with open(journal, "a") as f:
        f.write(f"enter {os.getpid()}\n")
    time.sleep(0.02)
    with open(journal, "a") as f:
        f.write(f"exit {os.getpid()}\n")
    os._exit(0)
"""


def spawn(root: Path, job: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), job, *args],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )


def said(proc: subprocess.Popen, timeout: float = 30) -> list[str]:
    """The next line the child prints, split into words."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode() if ready else ""
    if not line:
        proc.kill()
        pytest.fail(f"child said nothing; stderr: {proc.stderr.read().decode()}")
    return line.split(maxsplit=1)


def let_go(proc: subprocess.Popen) -> None:
    proc.stdin.write(b"\n")
    assert said(proc)[0] == "released"
    assert proc.wait(timeout=30) == 0


def record(root: Path) -> dict:
    return json.loads((root / "_lock").read_text())


def dead_lock(root: Path) -> int:
    """Leave ROOT/_lock behind a holder killed with SIGKILL; return its pid."""
    holder = spawn(root, "killed", "hold", "nowait")
    assert said(holder)[0] == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert record(root)["pid"] == holder.pid
    return holder.pid


def test_lock_file_holds_the_record_and_release_removes_it(tmp_path):
    root = tmp_path / "store"
    with RootLock(f"file://{root}", "job-1"):
        held = record(root)
        assert held["pid"] == os.getpid()
        assert held["host"] == socket.gethostname()
        assert held["job_id"] == "job-1"
        assert held["proc_start"] == _process_start(os.getpid()) is not None
        assert held["started"].endswith("+00:00")
    assert os.listdir(root) == []  # no lock, no temporaries left


def test_second_process_fails_while_first_holds(tmp_path):
    first = spawn(tmp_path, "job-a", "hold", "nowait")
    assert said(first)[0] == "locked"
    second = spawn(tmp_path, "job-b", "hold", "nowait")
    word, message = said(second)
    assert second.wait(timeout=30) == 3
    assert word == "held"
    for part in ("job job-a", f"pid {first.pid}", socket.gethostname(), "since", "--wait-lock"):
        assert part in message
    assert "\n" not in message.strip()
    let_go(first)


def test_waiting_process_gets_the_lock_after_release(tmp_path):
    first = spawn(tmp_path, "job-a", "hold", "nowait")
    assert said(first)[0] == "locked"
    second = spawn(tmp_path, "job-b", "hold", "wait")
    time.sleep(1.0)
    assert second.poll() is None and record(tmp_path)["job_id"] == "job-a"
    first.stdin.write(b"\n")
    word, released = said(first)
    assert word == "released"
    word, locked = said(second)
    assert word == "locked" and float(locked) >= float(released)
    assert record(tmp_path)["pid"] == second.pid
    let_go(second)


def test_lock_of_a_killed_process_is_recovered(tmp_path):
    dead = dead_lock(tmp_path)
    with RootLock(str(tmp_path), "after"):
        assert record(tmp_path)["pid"] == os.getpid() != dead
    assert not (tmp_path / "_lock").exists()


def test_live_holder_is_not_stolen_even_when_waiting(tmp_path):
    holder = spawn(tmp_path, "job-a", "hold", "nowait")
    assert said(holder)[0] == "locked"
    start = time.monotonic()
    with pytest.raises(LockHeldError, match=r"job job-a .*gave up after 0.5s"):
        RootLock(str(tmp_path), "job-b").acquire(wait=True, timeout=0.5, poll=0.05)
    assert time.monotonic() - start >= 0.5
    assert record(tmp_path)["pid"] == holder.pid
    let_go(holder)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def write_record(root: Path, pid: int, proc_start: str | None, host: str = socket.gethostname()) -> None:
    """A lock record that no process flocks, so only the pid checks can tell liveness."""
    record = {
        "pid": pid,
        "host": host,
        "job_id": "manual",
        "started": "2025-01-01T00:00:00+00:00",
        "proc_start": proc_start,
    }
    (root / "_lock").write_text(json.dumps(record))


def test_record_naming_a_live_process_is_kept(tmp_path, sleeper):
    write_record(tmp_path, sleeper.pid, _process_start(sleeper.pid))
    with pytest.raises(LockHeldError, match=f"pid {sleeper.pid} "):
        RootLock(str(tmp_path)).acquire()


def test_flocked_lock_is_kept_whatever_its_record_says(tmp_path):
    """A holder in another pid namespace may look dead by its pid; its flock says otherwise."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    with RootLock(str(tmp_path), "holder"):
        write_record(tmp_path, gone.pid, None)  # same file, still flocked by the holder
        with pytest.raises(LockHeldError, match=f"pid {gone.pid} "):
            RootLock(str(tmp_path)).acquire()


def test_record_naming_another_host_is_kept_with_a_hint(tmp_path):
    write_record(tmp_path, 999999, None, host="elsewhere")
    with pytest.raises(LockHeldError, match=r"on elsewhere .*delete .*_lock"):
        RootLock(str(tmp_path)).acquire()


def test_record_whose_pid_was_reused_is_recovered(tmp_path, sleeper):
    boot, tick = _process_start(sleeper.pid).split(":")
    write_record(tmp_path, sleeper.pid, f"{boot}:{int(tick) - 1}")
    with RootLock(str(tmp_path)):
        assert record(tmp_path)["pid"] == os.getpid()


def test_record_naming_a_zombie_is_recovered(tmp_path, sleeper):
    write_record(tmp_path, sleeper.pid, _process_start(sleeper.pid))
    sleeper.send_signal(signal.SIGKILL)
    time.sleep(0.2)  # not reaped: os.kill(pid, 0) still succeeds on the zombie
    os.kill(sleeper.pid, 0)
    with RootLock(str(tmp_path)):
        assert record(tmp_path)["pid"] == os.getpid()


def start_together(procs: list[subprocess.Popen], go: Path) -> None:
    for proc in procs:
        assert said(proc)[0] == "ready"
    go.touch()


def test_racing_recoverers_exactly_one_wins(tmp_path):
    dead_lock(tmp_path)
    go = tmp_path.parent / f"{tmp_path.name}-go"
    racers = [spawn(tmp_path, f"racer-{i}", "hold", "nowait", str(go)) for i in range(8)]
    start_together(racers, go)
    words = {proc.pid: said(proc)[0] for proc in racers}
    winners = [proc for proc in racers if words[proc.pid] == "locked"]
    assert len(winners) == 1, words
    assert record(tmp_path)["pid"] == winners[0].pid
    let_go(winners[0])
    assert all(proc.wait(timeout=30) == 3 for proc in racers if proc is not winners[0])


def test_racing_recoverers_take_turns(tmp_path):
    """Every racer dies holding the lock, so each hand-over is a stale-lock recovery race."""
    dead_lock(tmp_path)
    go = tmp_path.parent / f"{tmp_path.name}-go"
    journal = tmp_path.parent / f"{tmp_path.name}-journal"
    racers = [spawn(tmp_path, f"racer-{i}", "turn", str(go), str(journal)) for i in range(6)]
    start_together(racers, go)
    assert all(proc.wait(timeout=60) == 0 for proc in racers)
    lines = journal.read_text().split()
    entries, exits = lines[0::4], lines[2::4]
    assert entries == ["enter"] * 6 and exits == ["exit"] * 6
    assert lines[1::4] == lines[3::4]  # each exit follows its own entry: never two inside
    assert sorted(map(int, lines[1::4])) == sorted(proc.pid for proc in racers)
    assert record(tmp_path)["pid"] == int(lines[-1])


def test_object_store_roots_are_locked_on_this_host(tmp_path, caplog):
    root = f"s3://bucket/{tmp_path.name}"
    with RootLock(root, "first") as held:
        assert held.host_only and held.path.is_file() and "bucket" not in str(held.path)
        assert "locked on this host only" in caplog.text
        with pytest.raises(LockHeldError, match="locked by job first"):
            RootLock(root, "second").acquire()
        with RootLock(f"s3://bucket/{tmp_path.name}-other"):
            pass
    with RootLock(root, "second"):
        pass


def test_unreadable_lock_file_is_a_clear_error(tmp_path):
    (tmp_path / "_lock").write_text("")
    with pytest.raises(LockError, match="unreadable.*delete it if no job is running"):
        RootLock(str(tmp_path)).acquire()


def test_same_lock_cannot_be_acquired_twice(tmp_path):
    lock = RootLock(str(tmp_path))
    with lock, pytest.raises(LockError, match="already locked"):
        lock.acquire()
    lock.acquire()  # reusable after release
    lock.release()


@pytest.mark.parametrize(
    "content", ['{"host": "h", "job_id": "j", "started": "s", "proc_start": null}', '{"pid": "12", "host": "h"}', "[1]"]
)
def test_a_lock_record_missing_a_key_is_a_clear_error(tmp_path, content):
    """A record without its pid once raised KeyError."""
    (tmp_path / "_lock").write_text(content)
    with pytest.raises(LockError, match=r"lock file .*_lock is unreadable \(.*\); delete it if no job is running"):
        RootLock(str(tmp_path)).acquire()


def test_one_root_has_one_lock_however_it_is_spelt(tmp_path, monkeypatch):
    """`s3://b/x/` and `s3://b/x` were two locks; `~/store` was locked unexpanded, relative to the working directory."""
    assert RootLock(f"s3://bucket/{tmp_path.name}/").path == RootLock(f"s3://bucket/{tmp_path.name}").path
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    assert RootLock("~/store").path == tmp_path / "store" / "_lock"
    (tmp_path / "link").symlink_to(tmp_path / "store", target_is_directory=True)
    (tmp_path / "store").mkdir()
    with RootLock(str(tmp_path / "link"), "first"), pytest.raises(LockHeldError, match="locked by job first"):
        RootLock("~/store/").acquire()
