"""The Ray Data embedding pipeline of one (modality, model) target: read -> preprocess (CPU tasks)
-> encode (actor pool) -> write (CPU tasks). Only the written files' descriptions (one small
row per file) come back to the driver, which commits them."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TextIO

import numpy as np
import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from encoders.errors import MmembedError
from encoders.options import Options

from . import ray_private
from .errors import ClusterError, ResourceError, WorkerDiedError
from .sinks import write_shard
from .sources import NO_IDS, Inventory, load_rows, of_modality, skip_done
from .stages import EmbedBatch, embed_in_task, preprocess

TASK_CPUS = 0.5  # what each preprocessing task reserves: several run beside the encoder actors
FREE_CPUS = (
    1.0  # per node, what the encoder actors leave to the decoding tasks: a pool holding every CPU starves its input
)
MIN_ACTOR_CPUS = 0.25  # the least an encoder actor reserves: at most 4 actors per CPU they may use
INFLIGHT_BYTES_PER_NODE = (
    512 << 20
)  # blocks a job keeps in the object store at once, per node (Ray Data: half the store)
# How long a local Ray keeps an idle worker process beyond one per CPU (Ray's default: 1 s). A pipeline's read,
# repartition and write tasks reserve no CPU, so more of them run at once than there are CPUs; Ray killed the
# spares as soon as a pipeline ended, and the next one started new processes (seconds of CPU each). Not forever:
# an idle worker polls ~1% of a core, which a long job's encoder would lose.
IDLE_WORKER_S = 30
PROBE_S = 5.0  # how long a cluster's address gets to accept a connection: Ray itself waits minutes on a dead one
# How often Ray starts an encoder's process anew after it died (killed for memory, a crash) and retries its batch,
# before the job fails. Ray Data's default is for ever: an encoder killed at every load hung its job.
RESTARTS = 2
TOKEN_HELP = (
    "give this machine the cluster's token (`ray get-auth-token` on the head node) in ~/.ray/auth_token, "
    "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"
)


@dataclass(frozen=True)
class StageSizes:
    """Batch sizes and pool size of a job's pipelines (from the job config)."""

    read: int
    write: int
    actors: int
    threads_per_actor: int = 0


@dataclass(frozen=True)
class Target:
    """One (modality, model) pair a job embeds, and the row keys the store already holds for it."""

    modality: str
    model: str
    digest: str
    encode_batch: int
    done: np.ndarray  # sorted S32 row keys (`storage.store.row_key`): rows to skip
    duplicates: np.ndarray = field(default_factory=lambda: NO_IDS)  # ids several input rows share (sources.id_digest)


def start(address: str | None = None, log: TextIO | None = None, verbose: bool = False) -> bool:
    """Connect to Ray (an existing cluster at `address`, else a local instance) once per process; -> whether this
    call connected (False: already connected). `log` gets mmembed's note when a recorded cluster is gone.

    The lines Ray's workers print reach this process only when `verbose`; else they stay in Ray's session logs
    (/tmp/ray/session_latest/logs on each node): forwarded, they could arrive after a failed job's one line."""
    connected = not ray.is_initialized()
    if connected:
        join = join_address(address, log or sys.stderr)
        init = {
            "address": join,
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "configure_logging": True,
            "log_to_driver": verbose,
        }
        try:
            ray_private.init(IDLE_WORKER_S, **init)
        except (ConnectionError, ray.exceptions.AuthenticationError) as e:
            joined = join if join not in (None, "auto", "local") else (ray_private.recorded_cluster() or ("", ""))[1]
            if not joined or join == "local":  # starting Ray here failed: not a cluster's refusal
                raise
            raise refused(joined, e) from None
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    # A task's exception reaches the driver as itself (with `.cause`), not as Ray Data's UserCodeException, so an
    # encoder's MmembedError (a model that does not load) ends the job as that one line.
    ctx.raise_original_map_exception = True
    # Bounded memory, whatever the input's size: what waits between stages is capped, not a share of RAM.
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=INFLIGHT_BYTES_PER_NODE * len(nodes())
    )
    ctx.print_on_execution_start = False
    ray_private.use_parquet_reader_v1(ctx)
    # a bounded light step (see `dataset`) over fewer inputs than its bound is expected, not a mistake
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    return connected


def unreachable(address: str) -> str | None:
    """Why nothing accepts a connection at `address` (HOST:PORT, ray://HOST:PORT) within PROBE_S; None when
    something does, or the address is not HOST:PORT (Ray judges it)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S):
            return None
    except OSError as e:
        return str(e.strerror or e)


def join_address(address: str | None, log: TextIO) -> str | None:
    """What `ray.init` gets: the cluster to join, None or "auto" (Ray finds one), or "local" (start Ray here).

    An address the user gave (`address`, else RAY_ADDRESS) must accept a connection: if not, the job fails at
    once with one line. Without one, Ray joins the cluster `ray start` recorded on this machine; when that cluster
    is gone (its record left behind), the note goes to `log` and Ray starts here instead of waiting on it."""
    given = address or os.environ.get("RAY_ADDRESS") or None
    if given not in (None, "auto", "local"):
        if reason := unreachable(given):
            source = "--address / ray.address" if address else "RAY_ADDRESS"
            raise ClusterError(
                f"cannot reach the Ray cluster at {given} ({reason}): check {source}, start the cluster "
                "(`ray start --head` on its head node), or leave the address out to run Ray on this machine"
            )
        ray_private.use_token_if_available()
        return given
    recorded = ray_private.recorded_cluster()
    if given == "local" or recorded is None or not (reason := unreachable(recorded[1])):
        return given
    path, stale = recorded
    if given == "auto":
        raise ClusterError(
            f"address auto means the Ray cluster recorded in {path}, {stale}, which is not running ({reason}): "
            "start it (`ray start --head`), or leave the address out to run Ray on this machine"
        )
    print(
        f"mmembed: no Ray cluster runs at {stale}, which {path} records (left by a `ray start` that was not "
        "stopped with `ray stop`): running Ray on this machine; delete that file to silence this",
        file=log,
        flush=True,
    )
    return "local"


def refused(address: str, e: Exception) -> ClusterError:
    """A failed `ray.init` as one line: a cluster that wants a token this client lacks, or any other refusal."""
    if isinstance(e, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in f"{e} {e.__cause__}":
        return ClusterError(f"the Ray cluster at {address} refused this client's token (or its lack): {TOKEN_HELP}")
    return ClusterError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}")


def stop() -> None:
    """Disconnect from Ray (a local instance shuts down with its workers)."""
    ray.shutdown()


def nodes() -> list[str]:
    """Ids of the live nodes of the cluster."""
    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def actor_resources(actors: int, gpu: bool) -> dict[str, float]:
    """What each of a pool's `actors` encoder actors reserves.

    CPU: one at most, and together no more than all but one CPU of each node, so however Ray places
    them some node keeps a whole CPU for the decoding tasks (a pool holding every CPU stalls the job,
    waiting for input no task can make). On one-CPU nodes the actors reserve
    none and share the CPU with the tasks. GPU: one each, or an equal share when there are more actors."""
    node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpu and not gpus:
        raise ResourceError("device cuda was asked for but the cluster has no GPU")
    spare = sum(max(0.0, c - FREE_CPUS) for c in node_cpus)
    if spare and spare / actors < MIN_ACTOR_CPUS:
        raise ResourceError(
            f"{actors} encoder actors per model is too many for the cluster's {sum(node_cpus):g} CPUs: "
            f"use --actors {max(1, int(spare / MIN_ACTOR_CPUS))} or fewer"
        )
    return {"num_cpus": min(1.0, spare / actors), "num_gpus": min(1.0, gpus / actors) if gpu else 0}


def light_tasks() -> int:
    """How many read, repartition or write tasks of a pipeline may run at once: reserving no CPU, they need a
    bound. One per node: each task running at once takes a worker process of its own (~2 core-s to start), and
    they are light enough that one keeps up."""
    return len(nodes())


def actor_threads(sizes: StageSizes, gpu: bool) -> int:
    """torch threads per encoder actor: as configured, else (on CPU) the largest node's CPUs shared by the pool.

    Ray sets OMP_NUM_THREADS to an actor's reserved CPUs (1 or less), which would leave a CPU encoder
    on one core while decoding, a few percent of the work, holds the rest idle."""
    if sizes.threads_per_actor or gpu:
        return sizes.threads_per_actor
    node_cpus = max(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"])
    return max(1, int(node_cpus // sizes.actors))


def one_call(inventory: Inventory, target: Target, gpu: bool) -> bool:
    """Whether the target's rows fit one encoder call, which a CPU task then makes instead of an actor pool.

    An actor is a worker process of its own that imports Ray Data and torch (~3 core-s) before its model loads;
    for one call, a task runs in a worker process the pipeline's earlier steps have started, where Ray Data (and,
    after the job's first such target, torch) is imported already: a small job is mostly this start-up (BENCHMARKS.md).
    The count is the input's rows of the modality, not the rows still to do: what is done is known only once the
    rows are read and hashed. Not on GPUs: a reused worker keeps the CUDA device it first saw, whichever GPU Ray
    gives its next task."""
    return not gpu and inventory.counts.get(target.modality, 0) <= target.encode_batch


def stream(
    inventory: Inventory,
    target: Target,
    options: Options,
    sizes: StageSizes,
    root: str,
    job_id: str,
    passthrough: tuple[str, ...] = (),
) -> Iterator[dict]:
    """Run the target's pipeline over the input rows it has not done yet; yields one dict per written
    file: kind, path, rows, nodes, stage seconds.

    An encoder's MmembedError (its model does not load there) ends it as itself; an encoder whose process keeps
    dying (RESTARTS times restarted) as a WorkerDiedError."""
    try:
        yield from dataset(inventory, target, options, sizes, root, job_id, passthrough).iter_rows()
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, MmembedError):
            e.cause.args = (str(e.cause).splitlines()[0],)  # less the retry advice Ray Data appends to it
            raise e.cause from None
        raise
    except (ray.exceptions.ActorDiedError, ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError) as e:
        raise WorkerDiedError(died(target, e)) from None


def died(target: Target, e: Exception) -> str:
    """One line for an encoder process that died once more than it is restarted; Ray's reason in brief."""
    detail = re.search(r"Worker exit detail: ([^.]*)", str(e)) or re.search(r"([^\n.]*)", str(e))
    return (
        f"the {target.modality}/{target.model} encoder's process died, and again after each of its {RESTARTS} "
        f"restarts (Ray: {detail.group(1).strip()}; killed for memory?): the job stopped, the rows it committed "
        "stay, and running it again embeds the rest"
    )


def dataset(
    inventory: Inventory,
    target: Target,
    options: Options,
    sizes: StageSizes,
    root: str,
    job_id: str,
    passthrough: tuple[str, ...] = (),
) -> ray.data.Dataset:
    """The target's pipeline, not yet run: one row per file it will write."""
    modality, model = target.modality, target.model
    gpu = options.device == "cuda" or (options.device is None and has_gpus())
    columns = list(inventory.columns or ("id", "uri", "modality")) + list(passthrough)
    # Only the preprocessing tasks and the actors reserve CPU: a task that Ray Data pauses while its
    # output waits (downstream is full) keeps what it reserved, and a read, repartition or write task
    # holding the CPU the preprocessing needs stalled the job for good (seen: a 20k-image job on 2 CPUs).
    tasks = light_tasks()
    light = {"num_cpus": 0, "compute": TaskPoolStrategy(size=tasks)}
    # One read task per file, not split further: a read whose blocks are split (to reach Ray Data's 200-block
    # parallelism target) is never fused with the step after it, and the modality filter then ran as tasks of
    # its own in processes of its own (a 10-item job: 3 worker processes for tasks instead of 1, ~6 core-s).
    ds = ray.data.read_parquet(
        inventory.files, partitioning=None, num_cpus=0, concurrency=tasks, override_num_blocks=len(inventory.files)
    ).select_columns(columns)
    ds = ds.map_batches(of_modality, fn_kwargs={"modality": modality}, batch_format="pyarrow", **light)
    # Blocks of exactly one preprocessing batch each (streaming): a whole file in one block would reach one actor,
    # and blocks of uneven size gave the encoder a small batch after every full one (64, 8, 64, 8, ...). At least
    # one encoder batch: text's 256 in blocks of 64 made 4x the tasks for the driver to schedule, beside the encoder.
    block = max(sizes.read, target.encode_batch)
    ds = ray_private.last_step_light(ds.repartition(target_num_rows_per_block=block, strict=True), tasks)
    cpu_task = {"batch_size": block, "batch_format": "numpy", "num_cpus": TASK_CPUS}
    ds = ds.map_batches(load_rows, fn_kwargs={"source": inventory.source}, **cpu_task)
    ds = ds.map_batches(skip_done, fn_kwargs={"done": target.done, "duplicates": target.duplicates}, **cpu_task)
    ds = ds.map_batches(
        preprocess,
        fn_kwargs={"model": model, "modality": modality, "options": options, "yield_cpu": not gpu},
        **cpu_task,
    )
    encoder = {"model": model, "modality": modality, "options": options}
    pool = actor_resources(sizes.actors, gpu)  # checked whatever the input's size
    encode = {"batch_size": target.encode_batch, "batch_format": "numpy"}
    if one_call(inventory, target, gpu):
        ds = ray_private.map_batches_restarting(
            ds,
            embed_in_task,
            RESTARTS,
            fn_kwargs=encoder | {"threads": actor_threads(replace(sizes, actors=1), gpu)},
            **actor_resources(1, gpu),
            **encode,
        )
    else:
        ds = ray_private.map_batches_restarting(
            ds,
            EmbedBatch,
            RESTARTS,
            fn_constructor_kwargs=encoder | {"threads": actor_threads(sizes, gpu)},
            compute=ActorPoolStrategy(size=sizes.actors),
            **pool,
            **encode,
        )
    return ds.map_batches(
        write_shard,
        fn_kwargs={
            "root": root,
            "modality": modality,
            "model": model,
            "digest": target.digest,
            "job_id": job_id,
            "passthrough": passthrough,
        },
        batch_size=sizes.write,
        batch_format="numpy",
        **light,
    )
