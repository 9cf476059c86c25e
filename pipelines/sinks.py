"""The last step of an embedding pipeline: a batch of embedded or failed rows -> Parquet files in the store."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from storage.schema import ERROR_SCHEMA, embedding_schema
from storage.store import Store

from .sources import tallies

ERROR_COLUMNS = ("error_stage", "error_type", "error_message")
# What the writer reports per batch, and the job record's count of each: a file of embeddings, a file of error rows,
# and the rows the store held already (no file: the tally rows of sources.skip_done).
FATES = {"embeddings": "embedded", "errors": "errored", "done": "already_done"}


def write_shard(
    batch: dict[str, np.ndarray],
    root: str,
    modality: str,
    model: str,
    digest: str,
    job_id: str,
    passthrough: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """Embedded rows -> one embeddings file, failed rows -> one errors file; returns one row per file, and one more
    (kind "done", no path) for the rows the batch's tally rows stand for."""
    start = time.perf_counter()
    store = Store(root)
    tally = tallies(batch)
    failed = (batch["error_type"] != "") & ~tally
    ok = ~failed & ~tally
    now = pa.scalar(datetime.now(UTC), pa.timestamp("us", tz="UTC"))
    files = []
    if ok.any():
        emb = np.ascontiguousarray(
            np.stack(list(batch["embedding"][ok])) if batch["embedding"].dtype == object else batch["embedding"][ok],
            dtype=np.float32,
        )
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
        files.append(
            ("embeddings", store.write_embeddings(modality, model, pa.table(columns, schema=schema)), int(ok.sum()))
        )
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
    if tally.any():
        files.append(("done", "", int(batch["done_rows"][tally].sum())))
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
