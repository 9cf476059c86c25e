"""Incremental runs and crash safety, with real subprocesses and real kills."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from jobs.cli import main
from storage.store import Store

TEXT = ["text=minilm-l6"]
FAST = ["--batch-size", "8", "--commit-every", "16"]


def write_texts(folder: Path, start: int, stop: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        (folder / f"t{i:04d}.txt").write_text(f"sentence number {i} about {['cats', 'dogs', 'ships', 'stars'][i % 4]}")


def embed_json(media: Path, root: Path, capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["embed", str(media), str(root), "--model", *TEXT, *FAST, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def committed_rows(root: Path) -> list[tuple]:
    """Every committed row (not deduplicated): kind, id, model, content_hash."""
    store = Store(str(root))
    rows = []
    for kind in ("embeddings", "errors"):
        for rel in store.committed_files(kind):
            model = rel.split("model=")[1].split("/")[0] if kind == "embeddings" else None
            t = pq.read_table(rel, columns=["id", "content_hash"] + (["model"] if kind == "errors" else []))
            for r in t.to_pylist():
                rows.append((kind, r["id"], model or r["model"], r["content_hash"]))
    return sorted(rows)


def visible_files(root: Path) -> set[str]:
    return {str(p) for p in (root / "embeddings").rglob("*") if p.is_file()} | {
        str(p) for p in (root / "errors").rglob("*") if p.is_file()
    }


def test_rerun_writes_nothing_and_new_or_changed_files_are_embedded(tmp_path, ray_session, capsys):
    media, root = tmp_path / "media", tmp_path / "store"
    write_texts(media, 0, 20)
    (media / "empty.txt").write_text("")
    first = embed_json(media, root, capsys)["counts"]["text/minilm-l6"]
    assert (first["embedded"], first["errored"], first["already_done"]) == (20, 1, 0)

    again = embed_json(media, root, capsys)["counts"]["text/minilm-l6"]
    assert (again["embedded"], again["errored"], again["already_done"]) == (0, 0, 21)

    write_texts(media, 20, 25)
    (media / "t0003.txt").write_text("a changed sentence")
    (media / "copy.txt").write_text((media / "t0001.txt").read_text())  # same bytes, new id: a row of its own
    more = embed_json(media, root, capsys)["counts"]["text/minilm-l6"]
    assert (more["embedded"], more["errored"], more["already_done"]) == (7, 0, 20)  # t0003 changed: new again

    rows = committed_rows(root)
    assert len(rows) == len(set(rows))
    from storage.query import connect, run_readonly

    newest = run_readonly(
        connect(str(root)), "SELECT id, count(*) AS n FROM texts GROUP BY id HAVING n > 1"
    ).to_pylist()
    assert newest == []
    t3 = run_readonly(connect(str(root)), "SELECT content_hash FROM texts WHERE id = 't0003.txt'").to_pylist()
    import hashlib

    assert t3 == [{"content_hash": hashlib.sha256(b"a changed sentence").hexdigest()}]


def _spawn(media: Path, root: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.cli", "embed", str(media), str(root), "--model", *TEXT, *FAST, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _kill_mid_pipeline(proc: subprocess.Popen, root: Path, commits: int, delay: float, total: int) -> int:
    """Kill the job's process group `delay` s after it has made `commits` commits of its own; -> rows committed then."""
    before = len(committed_rows(root)) if (root / "_commits").exists() else 0
    made = lambda: len(list((root / "_commits").glob("*.json"))) if (root / "_commits").exists() else 0  # noqa: E731
    start, deadline = made(), time.monotonic() + 240
    while made() < start + commits and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    _kill_group(proc)
    committed = len(committed_rows(root))
    assert before < committed < total, f"the kill landed with {committed} of {total} rows committed ({before} before)"
    return committed


def test_kill_at_random_points_then_rerun_equals_a_clean_run(tmp_path, ray_session, capsys):
    """Each kill lands mid-pipeline, and the test checks that it did: after this run's own commits (a random 1-2 of
    them, then up to 0.2 s more), with some rows but not all committed."""
    media, root, clean = tmp_path / "media", tmp_path / "store", tmp_path / "clean"
    write_texts(media, 0, 300)
    (media / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    small_files = tmp_path / "job.yaml"
    small_files.write_text("batch_size:\n  preprocess: 8\n  write: 16\n")  # a commit every 16 rows
    embed_json(media, clean, capsys)
    rng = random.Random(7)
    for _ in range(3):
        proc = _spawn(media, root, "--config", str(small_files))
        _kill_mid_pipeline(proc, root, rng.randint(1, 2), rng.uniform(0, 0.2), 301)
    final = embed_json(media, root, capsys)
    assert final["status"] == "succeeded"
    assert committed_rows(root) == committed_rows(clean)
    assert visible_files(root) == set(Store(str(root)).committed_files("embeddings")) | set(
        Store(str(root)).committed_files("errors")
    )


KILL_IN_COMMIT = """
import os, signal, sys
from storage.store import Store
real = Store.commit
calls = []
def commit(self, job_id, files, stats=None):
    calls.append(1)
    if len(calls) == int(os.environ["KILL_AT_COMMIT"]):
        def write_then_die(rel, obj):  # dies with the record's temporary file half-written
            with self.fs.open_output_stream(self.path(rel) + ".0.tmp") as f:
                f.write(b"{")
            os.kill(os.getpid(), signal.SIGKILL)
        self._write_json = write_then_die
    return real(self, job_id, files, stats)
Store.commit = commit
from jobs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_commit_leaves_nothing_half_visible(tmp_path, ray_session, capsys):
    media, root = tmp_path / "media", tmp_path / "store"
    write_texts(media, 0, 60)
    small_files = tmp_path / "job.yaml"
    small_files.write_text("batch_size:\n  write: 8\n")
    env = {**os.environ, "KILL_AT_COMMIT": "2"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_IN_COMMIT,
            "embed",
            str(media),
            str(root),
            "--model",
            *TEXT,
            *FAST,
            "--config",
            str(small_files),
        ],
        env=env,
        capture_output=True,
        text=True,
        start_new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL
    first_commit = committed_rows(root)
    assert 0 < len(first_commit) < 60
    final = embed_json(media, root, capsys)["counts"]["text/minilm-l6"]
    assert final["already_done"] == len(first_commit)
    rows = committed_rows(root)
    assert len(rows) == 60 and len({r[1] for r in rows}) == 60


def test_second_job_on_a_root_waits_or_exits(tmp_path, ray_session):
    media, root = tmp_path / "media", tmp_path / "store"
    write_texts(media, 0, 200)
    first = _spawn(media, root)
    deadline = time.time() + 60
    while not (root / "_lock").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "embed", str(media), str(root), "--model", *TEXT],
        capture_output=True,
        text=True,
    )
    assert second.returncode != 0
    assert "locked by job" in second.stderr and "--wait-lock" in second.stderr
    assert re.search(r"locked by job \d{8}T\d{6}-[0-9a-f]{6} \(pid", second.stderr), "the holder's job id, not '?'"
    assert len(second.stderr.strip().splitlines()) == 1
    waiter = _spawn(media, root, "--wait-lock", "--json")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    counts = json.loads(out)["counts"]["text/minilm-l6"]
    assert (counts["embedded"], counts["already_done"]) == (0, 200)
    assert Counter(r[1] for r in committed_rows(root)) == Counter({f"t{i:04d}.txt": 1 for i in range(200)})
