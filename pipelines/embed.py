"""The Ray Data embedding pipeline for one (modality, model): read -> preprocess (CPU tasks)
-> encode (actor pool) -> write (CPU tasks). Only the written files' descriptions (one small
row per file) come back to the driver, which commits them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray
from ray.data import ActorPoolStrategy, DataContext

from encoders.model import Options

from .sources import Inventory, load_rows
from .stages import EmbedBatch, preprocess, skip_done, write_shard


ACTOR_START_S = 600  # seconds for the encoder actors to load their model


@dataclass(frozen=True)
class StageSizes:
    """Batch sizes and pool size for one pipeline run (from the job config)."""

    read: int
    encode: int
    write: int
    actors: int
    threads_per_actor: int = 0


def start(address: str | None = None) -> None:
    """Connect to Ray (an existing cluster at `address`, else a local instance) once per process."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Start the whole encoder pool before feeding it, so work spreads over every actor (and node), and a
    # cluster too small for the pool fails with Ray's clear timeout instead of waiting forever.
    ctx.wait_for_min_actors_s = ACTOR_START_S


def nodes() -> list[str]:
    """Ids of the live nodes of the cluster."""
    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def stream(
    inventory: Inventory,
    modality: str,
    model: str,
    digest: str,
    options: Options,
    sizes: StageSizes,
    root: str,
    job_id: str,
    done: np.ndarray,
    passthrough: tuple[str, ...] = (),
) -> Iterator[dict]:
    """Run the pipeline over the rows whose key is not in `done`; yields one dict per written file:
    kind, path, rows, nodes, stage seconds."""
    columns = list(inventory.columns or ("id", "uri", "modality")) + list(passthrough)
    # Blocks of one preprocessing batch each (streaming): a whole file in one block would reach one actor.
    ds = ray.data.read_parquet(inventory.files, partitioning=None).select_columns(columns)
    ds = ds.repartition(target_num_rows_per_block=sizes.read)
    # Half a CPU per read/preprocess task: decoding runs in parallel beside the encoder actors, and
    # the differing resources keep Ray from fusing these tasks into the actor.
    cpu_task = {"batch_size": sizes.read, "batch_format": "numpy", "num_cpus": 0.5}
    ds = ds.map_batches(load_rows, fn_kwargs={"modality": modality, "source": inventory.source}, **cpu_task)
    ds = ds.map_batches(skip_done, fn_kwargs={"done": done}, **cpu_task)
    ds = ds.map_batches(preprocess, fn_kwargs={"model": model, "modality": modality, "options": options}, **cpu_task)
    gpu = options.device == "cuda" or (options.device is None and has_gpus())
    ds = ds.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"model": model, "modality": modality, "options": options, "threads": sizes.threads_per_actor},
        compute=ActorPoolStrategy(size=sizes.actors),
        batch_size=sizes.encode,
        num_gpus=1 if gpu else 0,
        batch_format="numpy",
    )
    ds = ds.map_batches(
        write_shard,
        fn_kwargs={"root": root, "modality": modality, "model": model, "digest": digest, "job_id": job_id, "passthrough": passthrough},
        batch_size=sizes.write,
        batch_format="numpy",
    )
    yield from ds.iter_rows()
