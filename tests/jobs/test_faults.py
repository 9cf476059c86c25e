"""Faults that used to hang or leak, each with the real thing: an encoder whose model does not load where it runs,
an encoder process killed as the OOM killer kills (SIGKILL), once and then every time it comes back, and a Ray
address that `ray start` recorded and nothing answers at any more. Every job ends within seconds, with one line,
its lock released, a failed record, and only committed rows in the store; and a successful job's stderr holds
mmembed's lines alone, Ray's going to the log file its record names."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encoders import registry, weights
from jobs.cli import main
from pipelines.embed import RESTARTS
from storage.lock import RootLock
from storage.query import connect, run_readonly
from storage.store import Store

RAY = Path(sys.executable).parent / "ray"
ENCODER_TITLE = "MapWorker(MapBatches(EmbedBatch))"  # the process title Ray gives an encoder actor
# The lines of a successful job on stderr: progress, the summary, the note on a recorded cluster that is gone.
OWN_LINES = (
    r"[a-z]+/[\w.-]+: \d+/\d+( \(\d+%\))? [\d.]+ items/s",
    r"job \S+: \d+ embedded, \d+ errored, \d+ already done, \d+ files skipped",
    r"mmembed: no Ray cluster runs at \S+, which .* records .*",
)


def write_texts(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"t{i:03d}.txt").write_text(f"sentence number {i} about {['cats', 'ships', 'stars'][i % 3]}")
    return folder


def committed_ids(root: Path) -> list[str]:
    store = Store(str(root))
    return sorted(
        i for rel in store.committed_files("embeddings") for i in pq.read_table(rel, columns=["id"])["id"].to_pylist()
    )


def assert_ended_cleanly(root: Path, error: str) -> dict:
    """The lock is free, the job's record says failed (why), and readers see the committed rows, no others."""
    RootLock(str(root)).acquire().release()
    (record,) = Store(str(root)).jobs()
    assert record["status"] == "failed" and record["error"].startswith(error), record["error"]
    if (root / "embeddings").exists():
        visible = run_readonly(connect(str(root)), "SELECT id FROM texts ORDER BY id").column("id").to_pylist()
        assert visible == committed_ids(root)
    return record


@pytest.fixture(scope="module")
def broken_clip(tiny_clip_model) -> Path:
    """tiny-clip's store with one tensor's bytes changed and its stored checksum kept: the driver, which reads the
    footer and the checksums (the model's digest), accepts it; the encoder, which verifies every tensor, cannot."""
    table = pq.read_table(registry.resolve(tiny_clip_model))
    data = table.column("data").to_pylist()
    data[0] = bytes([data[0][0] ^ 0xFF]) + data[0][1:]
    column = table.schema.get_field_index("data")
    path = registry.models_dir() / "broken-clip.parquet"
    pq.write_table(table.set_column(column, "data", pa.array(data, pa.large_binary())), path, compression="none")
    assert weights.read_digest(path) and weights.read_meta(path)["kind"] == "clip", "the driver's checks pass"
    return path


@pytest.mark.parametrize(("items", "encoder"), [(20, "an actor pool"), (3, "a one-call task")])
def test_a_model_that_fails_to_load_in_its_encoder_ends_the_job_with_one_line(
    tmp_path, ray_session, capsys, broken_clip, items, encoder
):
    media, root = write_texts(tmp_path / "media", items), tmp_path / "store"
    started = time.monotonic()
    assert main(["embed", str(media), str(root), "--model", "text=broken-clip", "--batch-size", "8"]) == 1, encoder
    seconds = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"mmembed: error: model 'broken-clip' cannot load in its encoder: {broken_clip}: tensor '"
    ), err
    assert err[0].endswith("fails its checksum (the store is corrupt)"), err
    assert seconds < 60, f"{seconds:.0f} s: the job must fail at the first batch, not restart its encoder"
    assert (
        assert_ended_cleanly(root, "EncoderLoadError: model 'broken-clip'")["counts"]["text/broken-clip"]["embedded"]
        == 0
    )
    assert committed_ids(root) == []


def _process_tree() -> tuple[dict[int, int], dict[int, str]]:
    parents, titles = {}, {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                titles[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return parents, titles


def encoder_processes(ancestor: int) -> list[int]:
    """The encoder actors' processes below `ancestor` (this test's own Ray, never another session's)."""
    parents, titles = _process_tree()

    def below(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == ancestor:
                return True
        return False

    return sorted(pid for pid, title in titles.items() if title.startswith(f"ray::{ENCODER_TITLE}") and below(pid))


class Killer(threading.Thread):
    """SIGKILLs the encoder process below `ancestor` `times` times (each replacement Ray starts, too: killed as it
    loads), the first once the store has committed some rows; notes how many rows were committed at each kill."""

    def __init__(self, root: Path, times: int, ancestor: int | None = None):
        super().__init__(daemon=True)
        self.root, self.times, self.ancestor, self.kills = root, times, ancestor or os.getpid(), []

    def run(self) -> None:
        deadline = time.monotonic() + 240
        while len(self.kills) < self.times and time.monotonic() < deadline:
            time.sleep(0.1)
            committed = len(committed_ids(self.root)) if (self.root / "_commits").exists() else 0
            fresh = (
                [p for p in encoder_processes(self.ancestor) if p not in {k[0] for k in self.kills}]
                if committed
                else []
            )
            if fresh:
                title = _process_tree()[1].get(fresh[0], "")
                os.kill(fresh[0], signal.SIGKILL)
                self.kills.append((fresh[0], committed, title.strip()))


N = 96


def small_steps(tmp_path: Path) -> list[str]:
    """A commit every 16 rows (two encoder batches), so that a kill can land between commits."""
    config = tmp_path / "job.yaml"
    config.write_text("batch_size:\n  preprocess: 8\n  write: 16\n")
    return ["--config", str(config), "--batch-size", "8", "--commit-every", "16"]


def test_an_encoder_killed_mid_job_is_restarted_and_the_job_completes(tmp_path, ray_session, capsys):
    media, root = write_texts(tmp_path / "media", N), tmp_path / "store"
    killer = Killer(root, 1)
    killer.start()
    capsys.readouterr()
    assert main(["embed", str(media), str(root), "--model", "text=minilm-l6", *small_steps(tmp_path), "--json"]) == 0
    killer.join(5)
    ((_, committed, _),) = killer.kills
    assert 0 < committed < N, f"the kill landed with {committed} of {N} rows committed"
    record = json.loads(capsys.readouterr().out)
    assert record["status"] == "succeeded" and record["counts"]["text/minilm-l6"]["embedded"] == N
    assert committed_ids(root) == [f"t{i:03d}.txt" for i in range(N)], "every row once: none lost, none twice"


def test_an_encoder_that_keeps_dying_ends_the_job_after_its_restarts(tmp_path, own_ray, ray_session):
    """The CLI in a process of its own, so that its stderr is what a user sees; the rerun in this one."""
    media, root = write_texts(tmp_path / "media", N), tmp_path / "store"
    args = ["embed", str(media), str(root), "--model", "text=minilm-l6", *small_steps(tmp_path)]
    proc = _spawn(args, own_ray)
    killer = Killer(root, RESTARTS + 1, ancestor=proc.pid)  # the first mid-job, then each replacement as it loads
    killer.start()
    started = time.monotonic()
    run = _finish(proc, 300)
    seconds = time.monotonic() - started
    killer.join(5)
    assert len(killer.kills) == RESTARTS + 1 and 0 < killer.kills[0][1] < N, killer.kills
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and all(re.fullmatch(OWN_LINES[0], line) for line in lines[:-1]), run.stderr
    assert lines[-1].startswith(
        f"mmembed: error: the text/minilm-l6 encoder's process died, and again after each of its {RESTARTS} restarts"
    ), lines
    assert seconds < 120, f"{seconds:.0f} s"
    assert_ended_cleanly(root, "WorkerDiedError")
    kept = committed_ids(root)
    assert 0 < len(kept) < N
    assert main(args) == 0
    assert committed_ids(root) == [f"t{i:03d}.txt" for i in range(N)], "the rerun embeds the rest, once"


def _spawn(args: list[str], env: dict) -> subprocess.Popen:
    """The CLI in a process (and session) of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Its output once it exits; whatever it leaves running is killed with its process group."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _mmembed(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return _finish(_spawn(args, env), timeout)


def _private_ray_env(temp: Path) -> dict:
    """This environment with a Ray temp dir (RAY_TMPDIR) and home of its own: no cluster `ray start` recorded
    elsewhere is seen, and the token a local Ray makes goes to that home."""
    home = temp / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    return env | {"RAY_TMPDIR": str(temp), "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture
def own_ray():
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    yield _private_ray_env(temp)
    subprocess.run(["rm", "-rf", str(temp)], check=False)


@pytest.fixture(scope="module")
def stale_cluster():
    """A real `ray start --head` in a Ray temp dir of its own (RAY_TMPDIR), killed without `ray stop`: the
    ray_current_cluster file it wrote, where `ray.init()` looks, names an address nothing answers at."""
    if not RAY.exists():
        pytest.skip("`ray start` is unavailable (no ray executable)")
    temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = _private_ray_env(temp)
    env["PATH"] = f"{RAY.parent}:{env['PATH']}"
    port = _free_port()
    head = subprocess.Popen(
        [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false", "--block"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    recorded = temp / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 90
        while not recorded.exists() and time.monotonic() < deadline and head.poll() is None:
            time.sleep(0.2)
        assert recorded.exists(), "`ray start --head` did not record its address"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    address = recorded.read_text().strip()
    yield {"env": env, "file": recorded, "address": address}
    subprocess.run(["rm", "-rf", str(temp)], check=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stale_recorded_cluster_runs_the_job_locally_and_stderr_shows_mmembed_only(tmp_path, stale_cluster):
    """Without an address, Ray would wait minutes on the address `ray start` left behind. The job notes it and runs
    on a local Ray instead; the rest of its stderr is its progress and summary, Ray's lines are in its log file."""
    media, root = write_texts(tmp_path / "media", 12), tmp_path / "store"
    run = _mmembed(
        ["embed", str(media), str(root), "--model", "text=minilm-l6", "--batch-size", "4"], stale_cluster["env"]
    )
    assert run.returncode == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines[0] == (
        f"mmembed: no Ray cluster runs at {stale_cluster['address']}, which {stale_cluster['file']} records (left by a "
        "`ray start` that was not stopped with `ray stop`): running Ray on this machine; delete that file to silence this"
    )
    assert lines[-1].endswith("12 embedded, 0 errored, 0 already done, 0 files skipped")
    strangers = [line for line in lines if not any(re.fullmatch(p, line) for p in OWN_LINES)]
    assert strangers == [], "stderr holds mmembed's lines only"
    (record,) = Store(str(root)).jobs()
    assert record["status"] == "succeeded" and record["ray_log"]
    assert re.search(r"^\S+ \S+\s+(INFO|WARNING|ERROR) \S+\.py:\d+ -- ", Path(record["ray_log"]).read_text(), re.M), (
        "Ray's own lines went to the job's log file"
    )


def test_a_stale_address_given_fails_in_seconds_with_one_line(tmp_path, stale_cluster):
    media = write_texts(tmp_path / "media", 2)
    address = stale_cluster["address"]
    for args, env in (
        (["--address", address], stale_cluster["env"]),
        (["--address", "auto"], stale_cluster["env"]),
        ([], stale_cluster["env"] | {"RAY_ADDRESS": address}),
    ):
        started = time.monotonic()
        run = _mmembed(["embed", str(media), str(tmp_path / "store"), "--model", "text=minilm-l6", *args], env, 60)
        seconds = time.monotonic() - started
        err = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(err) == 1, run.stderr
        assert address in err[0] and "ray start --head" in err[0] and "leave the address out" in err[0], err
        assert seconds < 15, f"{seconds:.0f} s"
