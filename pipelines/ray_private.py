"""The private or undocumented Ray APIs the pipelines rely on, fenced here (Ray 2.60).

Each is a setting Ray has no public switch for; an upgrade may rename or remove any of them, so everything else
calls the functions below, and tests/pipelines/test_ray_private.py names each API and fails loudly when one
changes. What each buys is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset, TaskPoolStrategy
from ray.util.annotations import RayDeprecationWarning

IDLE_WORKER_KEY = "idle_worker_killing_time_threshold_ms"  # a `_system_config` key of ray.init


def init(idle_worker_s: float, **kwargs: Any) -> None:
    """`ray.init(**kwargs)` keeping idle workers for `idle_worker_s` (Ray's default: 1 s). Joining a running
    cluster (`--address`, RAY_ADDRESS, `ray start` on this machine) takes no `_system_config`: it keeps its own."""
    try:
        ray.init(**kwargs, _system_config={IDLE_WORKER_KEY: int(idle_worker_s * 1000)})
    except ValueError as e:
        if "_system_config" not in str(e):
            raise
        ray.init(**kwargs)


def recorded_cluster() -> tuple[str, str] | None:
    """(file, address) of the cluster `ray start` recorded on this machine, which `ray.init()` without an address
    joins: $RAY_TMPDIR (else $TMPDIR, else /tmp)/ray/ray_current_cluster. None when there is none. `ray stop`
    deletes the file; a `ray start --block` that is killed, or a reboot, leaves it behind."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        address = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    return (path, address) if address else None


def use_token_if_available() -> bool:
    """Turn on Ray's token authentication in this process when RAY_AUTH_MODE is unset and a token is at hand
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); -> whether it is on. `ray.init()` does this itself
    for a cluster it finds on this machine, never for an address it is given (Ray 2.60), so a client joining a
    `ray start` cluster by address failed with InvalidAuthToken. A client holding a token still joins a cluster
    that has authentication off. Ray's warning that it turned authentication on is not shown."""
    from ray._private.authentication import authentication_token_setup as setup

    logger = logging.getLogger(setup.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        logger.setLevel(level)


def map_batches_restarting(ds: Dataset, fn: Callable, restarts: int, **kwargs: Any) -> Dataset:
    """`ds.map_batches(fn, **kwargs)` whose worker, when its process dies (killed for memory, a crash), Ray
    replaces `restarts` times and then fails the job: an actor is restarted and its tasks retried, a task is
    retried. Ray Data's default is for ever (-1), so an encoder killed on every load hung its job. Ray 2.60 takes
    these settings only as `**ray_remote_args`, deprecated (to go in 2.64) with no named parameter for them."""
    actor = isinstance(kwargs.get("compute"), ActorPoolStrategy)
    limits = {"max_restarts": restarts, "max_task_retries": restarts} if actor else {"max_retries": restarts}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        return ds.map_batches(fn, **kwargs, **limits)


def use_parquet_reader_v1(ctx: DataContext) -> None:
    """Ray Data's Parquet reader V2 lists files in a task that takes a whole CPU and reads footers in up to 32
    new actor processes per pipeline: seconds of CPU before a batch moves (a 10-item job: 6 of its 22 workers).
    V1 reads the footers of our few, large files in the driver."""
    if not hasattr(ctx, "use_datasource_v2"):
        raise AttributeError("DataContext.use_datasource_v2 is gone: see pipelines/ray_private.py")
    ctx.use_datasource_v2 = False


def last_step_light(ds: Dataset, tasks: int) -> Dataset:
    """`ds` with its last step's tasks reserving no CPU, `tasks` at most at once. `Dataset.repartition` takes
    neither argument (Ray 2.60), and each of its tasks would reserve a whole CPU."""
    step = ds._logical_plan.dag
    step.ray_remote_args["num_cpus"] = 0
    object.__setattr__(step, "compute", TaskPoolStrategy(size=tasks))  # a frozen dataclass
    return ds


def logical_steps(ds: Dataset) -> list:
    """The dataset's logical operators, last first (they carry `name`, `ray_remote_args`, `compute`, ...)."""
    return _chain(ds._logical_plan.dag)


def fused_step_names(ds: Dataset) -> list[str]:
    """The names of the operators Ray Data will run, after its optimiser fuses steps, first first."""
    from ray.data._internal.logical.optimizers import get_execution_plan

    return [op.name for op in _chain(get_execution_plan(ds._logical_plan)[0].dag)][::-1]


def _chain(op) -> list:
    steps = []
    while op is not None:
        steps.append(op)
        op = op.input_dependencies[0] if op.input_dependencies else None
    return steps
