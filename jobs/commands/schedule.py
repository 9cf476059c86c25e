"""`mmembed schedule` and `mmembed submit`: jobs run on a cron schedule, or handed to a cluster's job server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import config
from ..options import Parser, Subparsers, command


def schedule_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "schedule",
        schedule,
        "run configured jobs on their cron schedules",
        "mmembed schedule configs/hourly.yaml --once      # from cron or a systemd timer",
        description='Run each job config (input, root and `schedule: "<cron>"`, in UTC) when it is due, one at a '
        "time, never two overlapping instances; missed runs are caught up once. The job's name is its file's stem "
        "unless the config sets `name`.",
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG")
    p.add_argument("--once", action="store_true", help="run whatever is due now, then exit")
    return p


def schedule(args: argparse.Namespace) -> int:
    from storage.lock import RootLock

    from ..run import embed_locked
    from ..schedule import Scheduler

    configs = [
        config.load(path, {"name": config.read_yaml(path).get("name") or Path(path).stem}) for path in args.configs
    ]
    for cfg in configs:
        if not cfg.input or not cfg.root:
            raise config.ConfigError(f"job {cfg.name!r}: a scheduled job needs `input` and `root` in its config")
    scheduler = Scheduler(configs, run_job=embed_locked, lock_factory=RootLock)
    if not args.once:
        scheduler.run_forever()
        return 0
    results = scheduler.run_once()
    for r in results:
        error = f": {r['error']}" if r.get("error") else ""
        when = f" (scheduled {r['scheduled']})" if r["scheduled"] else ""
        print(f"{r['job']}: {r['status']}{when}{error}", file=sys.stderr)
    return 0 if all(r["status"] != "failed" for r in results) else 1


def submit_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "submit",
        submit,
        "submit a job config to a Ray cluster through the Ray Jobs API",
        "mmembed submit job.yaml --cluster http://HEAD:8265 --wait",
        description="Submit `mmembed embed --config CONFIG` to the cluster's job server with a runtime env carrying "
        "the config; prints the submission id. mmembed must be installed on the cluster.",
    )
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--cluster", required=True, metavar="URL", help="the Ray dashboard address, http://HEAD:8265")
    p.add_argument("--wait", action="store_true", help="follow the job's logs and exit with its status")
    return p


def submit(args: argparse.Namespace) -> int:
    from ..submit import submit_job

    return submit_job(args.config, args.cluster, wait=args.wait)
