"""`mmembed submit`: a job config to a Ray cluster's job server (the Ray Jobs API).

The config travels in the runtime env's working_dir; the entrypoint runs `mmembed embed
--config` there, on the cluster, where mmembed must be installed."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from .config import ConfigError, load

TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
AGENT_WAIT = 60.0  # seconds: a freshly started cluster's job agent comes up after its dashboard


def _submit(client, working_dir: str, config_name: str) -> str:
    deadline = time.monotonic() + AGENT_WAIT
    while True:
        try:
            return client.submit_job(
                entrypoint="mmembed embed --config job.yaml --json",
                runtime_env={"working_dir": working_dir},
                metadata={"mmembed_config": config_name},
            )
        except RuntimeError as e:
            if "try again later" not in str(e) or time.monotonic() > deadline:
                raise ConfigError(f"the Ray job server refused the job: {str(e).splitlines()[0]}") from None
            time.sleep(2)


def submit_job(config_path: str, cluster: str, wait: bool = False, poll: float = 1.0) -> int:
    from ray.job_submission import JobSubmissionClient

    from pipelines.ray_private import use_token_if_available

    cfg = load(config_path)
    if not cfg.input or not cfg.root:
        raise ConfigError(
            f"{config_path}: a submitted job needs `input` and `root` (paths the cluster can read and write)"
        )
    use_token_if_available()  # a token cluster's job server wants it too (see pipelines.embed.join_address)
    try:
        client = JobSubmissionClient(cluster)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot reach the Ray job server at {cluster}: {str(e).splitlines()[0]}") from None
    with tempfile.TemporaryDirectory(prefix="mmembed-submit-") as tmp:
        shutil.copy(config_path, Path(tmp) / "job.yaml")
        submission_id = _submit(client, tmp, Path(config_path).name)
    print(submission_id, flush=True)
    if not wait:
        return 0
    shown = 0
    while True:
        status = str(client.get_job_status(submission_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(submission_id)
        sys.stderr.write(logs[shown:])
        shown = len(logs)
        if status in TERMINAL:
            print(f"job {submission_id}: {status}", file=sys.stderr)
            return TERMINAL[status]
        time.sleep(poll)
