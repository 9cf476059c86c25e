"""The per-batch work of an embedding pipeline, as plain functions and one callable class.

Each maps a batch dict of numpy arrays to a batch dict and is testable without Ray:
`preprocess` (CPU task) -> `EmbedBatch` (encoder actor) -> `write_shard` (CPU task).
A row that fails at any stage keeps going with `error_*` set, so the writer can put it in
the errors table: no row is ever dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from encoders.model import Encoder, Options
from encoders.registry import load_encoder
from storage.schema import ERROR_SCHEMA, embedding_schema
from storage.store import Store, row_key

ERROR_COLUMNS = ("error_stage", "error_type", "error_message")


@functools.lru_cache(maxsize=4)
def cpu_encoder(model: str, options: Options) -> Encoder:
    """The model as a preprocessing task needs it (settings and tokenizer, no weights); once per worker process."""
    return load_encoder(model, dataclasses.replace(options, device="cpu"), weights=False)


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


def skip_done(batch: dict[str, np.ndarray], done: np.ndarray) -> dict[str, np.ndarray]:
    """Drop the rows whose key is in `done` (sorted S32 row keys: what the store already holds)."""
    if len(done) == 0 or len(batch["id"]) == 0:
        return batch
    keys = np.array([row_key(s, i, h) for s, i, h in zip(batch["source"], batch["id"], batch["content_hash"])], dtype="S32")
    at = np.minimum(np.searchsorted(done, keys), len(done) - 1)
    new = done[at] != keys
    return {k: v[new] for k, v in batch.items()}


def preprocess(batch: dict[str, np.ndarray], model: str, modality: str, options: Options) -> dict[str, np.ndarray]:
    """Raw bytes -> packed model inputs (`features`, `shape`); failures fill the error columns."""
    start = time.perf_counter()
    encoder = cpu_encoder(model, options)
    n = len(batch["id"])
    features, shapes = [b""] * n, [[] for _ in range(n)]
    errors = {c: np.full(n, "", dtype=object) for c in ERROR_COLUMNS}
    for i, (data, read_error) in enumerate(zip(batch["data"], batch["read_error"])):
        try:
            if read_error:
                raise OSError(read_error)
            features[i], shapes[i] = _pack(encoder.preprocess(modality, data))
        except Exception as e:  # any decoder failure is the row's, not the job's
            stage = "read" if read_error else "preprocess"
            errors["error_stage"][i], errors["error_type"][i], errors["error_message"][i] = stage, type(e).__name__, str(e)
    out = {k: v for k, v in batch.items() if k not in ("data", "read_error")}
    out["features"] = np.array(features + [b""], dtype=object)[:n]
    out["shape"] = np.array(shapes + [None], dtype=object)[:n]
    out.update(errors)
    out["preprocess_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
    out["preprocess_node"] = np.full(n, node_id(), dtype=object)
    return out


class EmbedBatch:
    """Encoder actor: loads the model once, embeds each batch's good rows in one forward."""

    def __init__(self, model: str, modality: str, options: Options, threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.modality = modality
        self.encoder = load_encoder(model, options)
        self.node = node_id()

    def _embed_each(self, items, errors, index) -> np.ndarray:
        """Isolate the rows that make a batch fail: embed one by one, record each failure."""
        vectors = np.zeros((len(items), self.encoder.dim), dtype=np.float32)
        for j, (i, item) in enumerate(zip(index, items)):
            try:
                vectors[j] = self.encoder.embed(self.modality, [item])[0]
            except Exception as e:
                errors["error_stage"][i], errors["error_type"][i], errors["error_message"][i] = "encode", type(e).__name__, str(e)
        return vectors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["id"])
        errors = {c: batch[c].copy() for c in ERROR_COLUMNS}
        index = np.flatnonzero(errors["error_type"] == "")
        items = [_unpack(batch["features"][i], batch["shape"][i]) for i in index]
        embeddings = np.zeros((n, self.encoder.dim), dtype=np.float32)
        if len(index):
            try:
                embeddings[index] = self.encoder.embed(self.modality, items)
            except Exception:
                embeddings[index] = self._embed_each(items, errors, index)
        out = {k: v for k, v in batch.items() if k not in ("features", "shape", *ERROR_COLUMNS)}
        out.update(errors)
        out["embedding"] = embeddings
        out["encode_s"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        out["encode_node"] = np.full(n, self.node, dtype=object)
        return out


def write_shard(
    batch: dict[str, np.ndarray], root: str, modality: str, model: str, digest: str, job_id: str, passthrough: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Embedded rows -> one embeddings file, failed rows -> one errors file; returns one row per file."""
    start = time.perf_counter()
    store = Store(root)
    failed = batch["error_type"] != ""
    ok = ~failed
    now = pa.scalar(datetime.now(timezone.utc), pa.timestamp("us", tz="UTC"))
    files = []
    if ok.any():
        emb = np.ascontiguousarray(np.stack(list(batch["embedding"][ok])) if batch["embedding"].dtype == object else batch["embedding"][ok], dtype=np.float32)
        dim = emb.shape[1]
        extra = pa.table({c: pa.array(list(batch[c][ok])) for c in passthrough}) if passthrough else None
        columns = {
            "id": pa.array(list(batch["id"][ok]), pa.string()),
            "uri": pa.array(list(batch["uri"][ok]), pa.string()),
            "source": pa.array(list(batch["source"][ok]), pa.string()),
            "content_hash": pa.array(list(batch["content_hash"][ok]), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
            "model_digest": pa.array([digest] * int(ok.sum()), pa.string()),
            "job_id": pa.array([job_id] * int(ok.sum()), pa.string()),
            "created_at": pa.array([now.value] * int(ok.sum()), pa.timestamp("us", tz="UTC")),
        }
        if extra is not None:
            columns.update({c: extra[c] for c in passthrough})
        schema = embedding_schema(dim, extra.schema if extra is not None else None)
        files.append(("embeddings", store.write_embeddings(modality, model, pa.table(columns, schema=schema)), int(ok.sum())))
    if failed.any():
        k = int(failed.sum())
        errors = pa.table(
            {
                "id": list(batch["id"][failed]),
                "uri": list(batch["uri"][failed]),
                "source": list(batch["source"][failed]),
                "content_hash": list(batch["content_hash"][failed]),
                "model": [model] * k,
                "stage": list(batch["error_stage"][failed]),
                "error_type": list(batch["error_type"][failed]),
                "message": list(batch["error_message"][failed]),
                "job_id": [job_id] * k,
                "created_at": pa.array([now.value] * k, pa.timestamp("us", tz="UTC")),
            },
            schema=ERROR_SCHEMA,
        )
        files.append(("errors", store.write_errors(modality, errors), k))
    nodes = ",".join(sorted(set(batch["preprocess_node"]) | set(batch["encode_node"])))
    write_s = time.perf_counter() - start
    return {
        "kind": np.array([f[0] for f in files], dtype=object),
        "path": np.array([f[1] for f in files], dtype=object),
        "rows": np.array([f[2] for f in files], dtype=np.int64),
        "nodes": np.array([nodes] * len(files), dtype=object),
        "preprocess_s": np.array([batch["preprocess_s"].sum() if i == 0 else 0.0 for i in range(len(files))]),
        "encode_s": np.array([batch["encode_s"].sum() if i == 0 else 0.0 for i in range(len(files))]),
        "write_s": np.array([write_s if i == 0 else 0.0 for i in range(len(files))]),
    }
