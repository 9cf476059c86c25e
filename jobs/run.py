"""Jobs: inputs -> store, under the root's lock, committed in shards, with a job record.

`run_job` takes the ROOT lock and runs `embed_locked`; a caller that already holds the lock
(the scheduler) calls `embed_locked` itself. A backfill is the same job over every input the
store has recorded, with one model.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from encoders import weights
from encoders.errors import MmembedError
from encoders.options import Options
from encoders.registry import resolve
from pipelines import embed as pipeline
from pipelines.errors import SourceError
from pipelines.sinks import FATES
from pipelines.sources import SKIPPED_NAMED, Inventory, open_input, remove_dir
from storage.lock import RootLock
from storage.store import Store, StoreError, canonical_root

from . import ray_log
from .config import ConfigError, JobConfig
from .progress import Progress


def new_job_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class RowsLostError(MmembedError):
    """A pipeline's rows did not all end as embedded, errored or already done: a bug in mmembed, never the input's."""


def root_path(root: str) -> str:
    """Local roots made absolute (Ray workers do not share the driver's working directory), URIs without a trailing
    slash: the one spelling of a ROOT that the store, the lock and the scheduler share."""
    return canonical_root(root)


def encoder_options(cfg: JobConfig) -> Options:
    return Options(
        device=None if cfg.device == "auto" else cfg.device,
        dtype=cfg.dtype,
        audio_mode=cfg.whisper_mode,
        max_audio_seconds=cfg.limits.audio_seconds,
        max_text_bytes=cfg.limits.text_bytes,
    )


def model_digest(model: str) -> str:
    return weights.read_digest(resolve(model))


def check_models(cfg: JobConfig, counts: Counter) -> dict[str, str]:
    """Every modality in the input has a model, and every model exists: -> {model: digest}."""
    for modality, n in sorted(counts.items()):
        if n and not cfg.models.get(modality):
            raise ConfigError(
                f"the input has {n} {modality} item(s) but no {modality} model is configured (use --model {modality}=NAME)"
            )
    return {m: model_digest(m) for modality, models in cfg.models.items() if counts.get(modality) for m in models}


def check_cluster(cfg: JobConfig, root: str) -> None:
    """On several nodes, workers write ROOT themselves: a driver-local path would scatter the store."""
    nodes = pipeline.nodes()
    if len(nodes) > 1 and "://" not in root and not cfg.ray.allow_local_root:
        raise ConfigError(
            f"ROOT {root} is a local path but the Ray cluster has {len(nodes)} nodes, whose workers write the store "
            "themselves: use shared storage (s3://...), or --allow-local-root if ROOT is on a filesystem every node mounts"
        )


def new_record(cfg: JobConfig, kind: str, root: str, job_id: str | None = None) -> dict:
    return {
        "job_id": job_id or new_job_id(),
        "kind": kind,
        "status": "running",
        "started_at": now_iso(),
        "ended_at": None,
        "inputs": [],
        "root": root,
        "config": cfg.to_dict(),
        "counts": {},
        "skipped_files": 0,
        "skipped": [],  # the first SKIPPED_NAMED skipped files or rows: input, id, reason
        "missing_inputs": [],
        "stages_s": {},
        "throughput": 0.0,
        "nodes": [],
        "error": None,
        "ray_log": None,
    }


def run_job(
    cfg: JobConfig,
    inputs: list[str] | None = None,
    kind: str = "embed",
    wait_lock: bool = False,
    log: TextIO | None = None,
    verbose: bool = False,
) -> dict:
    """Take ROOT's lock and run the job; `inputs` defaults to the config's input. Progress goes to `log` (default:
    stderr); Ray's own output to the log file the record names (`ray_log`), or with `verbose` to stderr."""
    if not cfg.root:
        raise ConfigError("a job needs a root")
    root = root_path(cfg.root)
    check_root(root)
    job_id = new_job_id()
    lock = RootLock(root, job_id)
    lock.acquire(wait=wait_lock)
    try:
        return embed_locked(cfg, inputs, kind, log, verbose, job_id)
    finally:
        lock.release()


def check_root(root: str) -> None:
    """ROOT is a directory or can become one."""
    store = Store(root)
    if store.is_file():
        raise StoreError(f"{root} is a file, not a store")
    if "://" not in root:
        parent = Path(root).parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise StoreError(f"cannot make the store {root}: {parent} is a file")


def embed_locked(
    cfg: JobConfig,
    inputs: list[str] | None = None,
    kind: str = "embed",
    log: TextIO | None = None,
    verbose: bool = False,
    job_id: str | None = None,
) -> dict:
    """Run a job whose caller holds ROOT's lock; returns the job record (also in ROOT/_jobs/)."""
    inputs = inputs if inputs is not None else [cfg.input] if cfg.input else []
    if not inputs and kind == "embed":
        raise ConfigError("a job needs an input")
    root = root_path(cfg.root)
    check_root(root)
    store = Store(root)
    record = new_record(cfg, kind, root, job_id)
    job_id = record["job_id"]
    started = time.monotonic()
    stage_s, nodes = Counter(), set()
    try:
        store.clean_uncommitted()
        remove_dir(f"{root}/_staging")
        inventories = []
        for i, source in enumerate(inputs):
            try:
                staging = f"{root}/_staging/{job_id}/{i}"
                inventories.append(open_input(source, staging, cfg.passthrough, root, cfg.format))
            except SourceError as e:
                if kind == "embed":
                    raise
                record["missing_inputs"].append({"input": source, "reason": str(e)})
        present = sum((inv.counts for inv in inventories), Counter())
        if kind == "backfill":
            present = Counter({m: n for m, n in present.items() if m in cfg.models})
        digests = check_models(cfg, present)
        record["inputs"] = [inv.source for inv in inventories]
        record["skipped_files"] = sum(inv.skipped for inv in inventories)
        record["skipped"] = [named for inv in inventories for named in inv.skipped_named][:SKIPPED_NAMED]
        record["stages_s"]["list"] = round(time.monotonic() - started, 3)
        record["ray_log"] = None if verbose else str(ray_log.log_path(job_id))
        store.write_job(record)
        with ray_log.diverted(record["ray_log"]) as console:
            pipeline.start(cfg.ray.address, log or console, verbose)
            check_cluster(cfg, root)
            pipeline.actor_resources(cfg.actors, cfg.device == "cuda" or (cfg.device == "auto" and pipeline.has_gpus()))
            for inventory in inventories:
                _embed_inventory(cfg, inventory, digests, store, record, stage_s, nodes, log or console)
        wall = time.monotonic() - started
        processed = sum(c["embedded"] + c["errored"] for c in record["counts"].values())
        record.update(status="succeeded", nodes=sorted(nodes), throughput=round(processed / wall, 2) if wall else 0.0)
        record["stages_s"].update({k: round(v, 3) for k, v in stage_s.items()}, wall=round(wall, 3))
        return record
    except BaseException as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}", nodes=sorted(nodes))
        raise
    finally:
        record["ended_at"] = now_iso()
        store.write_job(record)
        remove_dir(f"{root}/_staging/{job_id}")


def _embed_inventory(
    cfg: JobConfig,
    inventory: Inventory,
    digests: dict[str, str],
    store: Store,
    record: dict,
    stage_s: Counter,
    nodes: set,
    log: TextIO,
) -> None:
    """Every (modality, model) pipeline over one input, one after another; commits every `commit_every` rows."""
    sizes = pipeline.StageSizes(cfg.batch_size.preprocess, cfg.batch_size.write, cfg.actors, cfg.threads_per_actor)
    for modality, total in sorted(inventory.counts.items()):
        for model in cfg.models.get(modality, ()):  # a backfill embeds only its model's modality
            counts = record["counts"].setdefault(
                f"{modality}/{model}",
                {"modality": modality, "model": model, "read": 0, "embedded": 0, "errored": 0, "already_done": 0},
            )
            counts["read"] += total
            progress = Progress(f"{modality}/{model}", total, log)
            pending, pending_rows = [], 0
            before = {fate: counts[fate] for fate in FATES.values()}
            done = store.done_index(modality, model)
            batch = getattr(cfg.batch_size, modality)
            target = pipeline.Target(modality, model, digests[model], batch, done, inventory.duplicates)
            for entry in pipeline.stream(
                inventory, target, encoder_options(cfg), sizes, store.root, record["job_id"], cfg.passthrough
            ):
                counts[FATES[entry["kind"]]] += entry["rows"]
                if entry["kind"] != "done":
                    pending.append(entry["path"])
                    pending_rows += entry["rows"]
                stage_s.update({k: entry[k] for k in ("preprocess_s", "encode_s", "write_s")})
                nodes.update(n for n in entry["nodes"].split(",") if n)
                progress.update(entry["rows"])
                if pending_rows >= cfg.commit_every:
                    store.commit(record["job_id"], pending)
                    pending, pending_rows = [], 0
            if pending:
                store.commit(record["job_id"], pending)
            store.write_job(record)
            check_fates(inventory, modality, model, total, {fate: counts[fate] - n for fate, n in before.items()})


def check_fates(inventory: Inventory, modality: str, model: str, read: int, fates: dict[str, int]) -> None:
    """Every row a pipeline read ended as exactly one of embedded, errored or already done."""
    if sum(fates.values()) != read:
        ended = ", ".join(f"{n} {fate.replace('_', ' ')}" for fate, n in fates.items())
        raise RowsLostError(
            f"{modality}/{model} over {inventory.source}: {read} rows read but {sum(fates.values())} ended "
            f"({ended}); this is a bug in mmembed, please report it: the job failed, and what it committed stays"
        )


def summary(record: dict) -> dict:
    totals = Counter(dict.fromkeys(("read", "embedded", "errored", "already_done"), 0))
    for c in record["counts"].values():
        totals.update({k: c.get(k, 0) for k in totals})
    return {"job_id": record["job_id"], "status": record["status"], **totals, "skipped_files": record["skipped_files"]}
