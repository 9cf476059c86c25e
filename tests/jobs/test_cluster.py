"""A real two-node Ray cluster on this machine, `ray start --head` plus a second raylet, with token
authentication on as users' clusters have it: Ray 2.60's `ray start --head` turns it on when the head has a token
at ~/.ray/auth_token (which any local `ray.init()` before it leaves there).

The cluster's processes run in their own sessions and are killed by process group at the
end, so the test session's own Ray instance is left alone (`ray stop` would stop it too).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

RAY = Path(sys.executable).parent / "ray"
pytestmark = pytest.mark.skipif(not RAY.exists(), reason="`ray start` is unavailable (no ray executable)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_count(address: str, env: dict) -> int:
    code = f"import ray; ray.init(address='{address}', logging_level='ERROR'); print(len([n for n in ray.nodes() if n['Alive']]))"
    env = env | {"RAY_AUTH_MODE": "token"}  # how Ray documents a client joining a token cluster by address
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


@pytest.fixture(scope="module")
def cluster():
    port, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    token, homes = secrets.token_hex(32), {name: Path(temp) / name for name in ("head", "bare")}
    for home in homes.values():
        (home / ".ray").mkdir(parents=True)
    (homes["head"] / ".ray" / "auth_token").write_text(token)
    (Path(temp) / "token").write_text(token)
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    base |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env = base | {"HOME": str(homes["head"])}  # the cluster's machine, and a client on it: the token at ~/.ray
    # Two nodes on one machine: each node's agents need ports of their own.
    agent_ports = [
        [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]
        for _ in range(2)
    ]
    starts = [
        [
            str(RAY),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--disable-usage-stats",
            "--block",
            *agent_ports[0],
        ],
        [
            str(RAY),
            "start",
            f"--address=127.0.0.1:{port}",
            "--num-cpus=2",
            "--disable-usage-stats",
            "--block",
            *agent_ports[1],
        ],
    ]
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                starts[0], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
        deadline = time.time() + 90
        while _node_count(f"127.0.0.1:{port}", env) < 1 and time.time() < deadline:
            time.sleep(1)
        procs.append(  # a node joins a token cluster as Ray documents: RAY_AUTH_MODE=token, and the token
            subprocess.Popen(
                starts[1],
                env=env | {"RAY_AUTH_MODE": "token"},
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        while _node_count(f"127.0.0.1:{port}", env) < 2 and time.time() < deadline:
            time.sleep(1)
        if _node_count(f"127.0.0.1:{port}", env) < 2:
            pytest.fail("the two-node cluster did not come up within 90 s")
        bare = base | {"HOME": str(homes["bare"])}  # a client elsewhere, with no token of its own
        yield {
            "address": f"127.0.0.1:{port}",
            "dashboard": f"http://127.0.0.1:{dashboard}",
            "env": env,
            "token_path_env": bare | {"RAY_AUTH_TOKEN_PATH": str(Path(temp) / "token")},
            "token_env": bare | {"RAY_AUTH_TOKEN": token},
            "bare_env": bare,
        }
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        shutil.rmtree(temp, ignore_errors=True)


def make_media(folder: Path, n: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"t{i:03d}.txt").write_text(f"line {i} of the cluster test")
    return folder


def mmembed(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_job_runs_on_both_nodes(cluster, tmp_path):
    media, root = make_media(tmp_path / "media"), tmp_path / "store"
    small_batches = tmp_path / "job.yaml"  # many small blocks, so every actor gets some
    small_batches.write_text("batch_size:\n  preprocess: 4\n  text: 4\n")
    args = [
        "embed",
        str(media),
        str(root),
        "--model",
        "text=minilm-l6",
        "--address",
        cluster["address"],
        "--actors",
        "3",
        "--config",
        str(small_batches),
        "--json",
    ]  # 3 one-CPU actors cannot fit one 2-CPU node
    refused = mmembed(*args, env=cluster["env"])  # joined with the token at ~/.ray/auth_token
    assert refused.returncode != 0 and "--allow-local-root" in refused.stderr
    run = mmembed(*args, "--allow-local-root", "--verbose", env=cluster["token_path_env"])
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["counts"]["text/minilm-l6"]["embedded"] == 64
    assert len(record["nodes"]) == 2, record["nodes"]
    own = r"text/minilm-l6: \d+/64 \(\d+%\) [\d.]+ items/s|job .*files skipped"
    assert record["ray_log"] is None and any(not re.fullmatch(own, line) for line in run.stderr.splitlines()), (
        "--verbose: Ray's own lines on stderr, no log file"
    )


def test_a_client_without_the_token_is_told_where_to_put_it(cluster, tmp_path):
    run = mmembed(
        "embed",
        str(make_media(tmp_path / "media", 2)),
        str(tmp_path / "store"),
        "--address",
        cluster["address"],
        env=cluster["bare_env"],
    )
    err = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(err) == 1, run.stderr
    assert cluster["address"] in err[0] and "~/.ray/auth_token" in err[0] and "RAY_AUTH_TOKEN" in err[0], err


def test_submit_through_the_jobs_api(cluster, tmp_path):
    media, root = make_media(tmp_path / "media", 8), tmp_path / "store"
    config = tmp_path / "job.yaml"
    config.write_text(f"input: {media}\nroot: {root}\nmodels:\n  text: [minilm-l6]\nray:\n  allow_local_root: true\n")
    run = mmembed("submit", str(config), "--cluster", cluster["dashboard"], "--wait", env=cluster["token_env"])
    assert run.returncode == 0, run.stderr
    submission_id = run.stdout.strip().splitlines()[0]
    assert submission_id.startswith("raysubmit_")
    jobs = mmembed("jobs", str(root), "--json", env=cluster["env"])
    records = json.loads(jobs.stdout)
    assert len(records) == 1 and records[0]["status"] == "succeeded"
    assert records[0]["counts"]["text/minilm-l6"]["embedded"] == 8
