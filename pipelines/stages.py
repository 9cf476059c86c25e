"""The model's part of an embedding pipeline: `preprocess` (CPU task) -> `EmbedBatch` (encoder actor, or
`embed_in_task` for an input of one encoder call).

Each maps a batch dict of numpy arrays to a batch dict and is testable without Ray. A row
that fails keeps going with `error_*` set, so the writer (`sinks.write_shard`) can put it in
the errors table: no row is ever dropped. Only the encoder actor imports torch; the
preprocessing, read and write steps do not, so their worker processes start in a fraction
of the time and memory.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from encoders.errors import MmembedError
from encoders.model import Inputs
from encoders.options import Options
from encoders.registry import load_encoder, load_inputs

from .errors import EncoderLoadError
from .sinks import ERROR_COLUMNS
from .sources import tallies


@functools.lru_cache(maxsize=4)
def cpu_inputs(model: str, options: Options) -> Inputs:
    """The model's preprocessing (its settings, no weights); once per worker process."""
    return load_inputs(model, options)


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _pack(item: np.ndarray | str) -> tuple[bytes, list[int]]:
    if isinstance(item, str):
        return item.encode("utf-8"), []
    return np.ascontiguousarray(item, dtype=np.float32).tobytes(), list(item.shape)


def _unpack(features: bytes, shape) -> np.ndarray | str:
    if len(shape) == 0:
        return features.decode("utf-8")
    return np.frombuffer(features, dtype=np.float32).reshape(tuple(shape))


def _lowest_priority() -> None:
    if hasattr(os, "SCHED_IDLE"):  # Linux; per thread, and an unprivileged thread cannot take it back
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


@functools.cache
def idle_thread() -> ThreadPoolExecutor:
    """This process's one thread at the lowest CPU priority (Linux SCHED_IDLE): work there runs only on CPU
    time nothing else wants. Decoding beside a CPU encoder at equal priority cut a 2-thread encoder's speed by more than half: its
    OpenMP threads wait at every barrier for the one the decoder preempted (BENCHMARKS.md)."""
    return ThreadPoolExecutor(1, thread_name_prefix="idle-priority", initializer=_lowest_priority)


def preprocess(
    batch: dict[str, np.ndarray], model: str, modality: str, options: Options, yield_cpu: bool = False
) -> dict[str, np.ndarray]:
    """Raw bytes -> packed model inputs (`features`, `shape`); failures fill the error columns.

    yield_cpu: run in `idle_thread`, for encoders on the same CPUs (they are the pipeline's bottleneck, and
    decoding keeps up on what they leave)."""
    if yield_cpu:
        return idle_thread().submit(preprocess, batch, model, modality, options).result()
    start = time.thread_time()  # CPU seconds: at idle priority, the wall time also counts the waits for a CPU
    inputs = cpu_inputs(model, options)
    n = len(batch["id"])
    features, shapes = [b""] * n, [[] for _ in range(n)]
    errors = {c: np.full(n, "", dtype=object) for c in ERROR_COLUMNS}
    read_types = batch.get("read_error_type", np.where(batch["read_error"] != "", "OSError", "").astype(object))
    for i, (data, read_error, tally) in enumerate(zip(batch["data"], batch["read_error"], tallies(batch))):
        if tally:  # stands for rows the store holds already (sources.skip_done): nothing to do
            continue
        if read_error:
            errors["error_stage"][i], errors["error_type"][i], errors["error_message"][i] = (
                "read",
                read_types[i],
                read_error,
            )
            continue
        try:
            features[i], shapes[i] = _pack(inputs(modality, data))
        except Exception as e:  # any decoder failure is the row's, not the job's
            errors["error_stage"][i], errors["error_type"][i], errors["error_message"][i] = (
                "preprocess",
                type(e).__name__,
                str(e),
            )
    out = {k: v for k, v in batch.items() if k not in ("data", "read_error", "read_error_type")}
    out["features"] = np.array(features + [b""], dtype=object)[:n]
    out["shape"] = np.array(shapes + [None], dtype=object)[:n]
    out.update(errors)
    out["preprocess_s"] = np.full(n, (time.thread_time() - start) / max(n, 1))
    out["preprocess_node"] = np.full(n, node_id(), dtype=object)
    return out


class EmbedBatch:
    """Encoder actor: loads the model once, embeds each batch's good rows in one forward.

    A model that fails to load here (a store the driver's checks passed, memory that runs out) is raised by the
    first batch, as `load_failure` says: from `__init__` it would reach the driver as Ray's text about a dead actor."""

    def __init__(self, model: str, modality: str, options: Options, threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.modality = modality
        self.node = node_id()
        self.failure: Exception | None = None
        try:
            self.encoder = load_encoder(model, options)
        except Exception as e:
            self.failure = load_failure(model, e)

    def _embed_each(self, items, errors, index) -> np.ndarray:
        """Isolate the rows that make a batch fail: embed one by one, record each failure."""
        vectors = np.zeros((len(items), self.encoder.dim), dtype=np.float32)
        for j, (i, item) in enumerate(zip(index, items)):
            try:
                vectors[j] = self.encoder.embed(self.modality, [item])[0]
            except Exception as e:
                errors["error_stage"][i], errors["error_type"][i], errors["error_message"][i] = (
                    "encode",
                    type(e).__name__,
                    str(e),
                )
        return vectors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.failure is not None:
            raise self.failure
        start = time.perf_counter()
        n = len(batch["id"])
        errors = {c: batch[c].copy() for c in ERROR_COLUMNS}
        index = np.flatnonzero((errors["error_type"] == "") & ~tallies(batch))
        items = [_unpack(batch["features"][i], batch["shape"][i]) for i in index]
        embeddings = np.zeros((n, self.encoder.dim), dtype=np.float32)
        if len(index):
            try:
                embeddings[index] = self.encoder.embed(self.modality, items)
            except Exception:
                embeddings[index] = self._embed_each(items, errors, index)
        broken = ~np.isfinite(embeddings).all(axis=1) & (errors["error_type"] == "")
        for i in np.flatnonzero(broken):  # a vector of NaN or inf is no embedding (a 16-bit overflow, say)
            errors["error_stage"][i], errors["error_type"][i], errors["error_message"][i] = (
                "encode",
                "NonFiniteEmbedding",
                f"the encoder gave a vector with {int((~np.isfinite(embeddings[i])).sum())} NaN or infinite values",
            )
            embeddings[i] = 0
        out = {k: v for k, v in batch.items() if k not in ("features", "shape", *ERROR_COLUMNS)}
        out.update(errors)
        out["embedding"] = embeddings
        out["encode_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        out["encode_node"] = np.full(n, self.node, dtype=object)
        return out


def load_failure(model: str, e: Exception) -> Exception:
    """What an encoder whose model did not load raises: one line naming the model and the cause (EncoderLoadError)
    when the user can act on it (the store does not load, memory ran out); any other exception as itself."""
    import torch

    out_of_memory = isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)
    if not (out_of_memory or isinstance(e, MmembedError)):
        return e
    cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if not isinstance(e, MmembedError):
        cause = f"{type(e).__name__}: {cause}" if cause else f"{type(e).__name__} (out of memory)"
    return EncoderLoadError(f"model {model!r} cannot load in its encoder: {cause}")


def embed_in_task(
    batch: dict[str, np.ndarray], model: str, modality: str, options: Options, threads: int = 0
) -> dict[str, np.ndarray]:
    """`EmbedBatch` for a single call, in a task (see `pipelines.embed.one_call`); the model is not kept after it."""
    return EmbedBatch(model, modality, options, threads)(batch)
