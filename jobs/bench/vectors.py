"""Stores of synthetic unit vectors for the retrieval sections: random, or clustered around centres as real embeddings
are. Seeded."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.store import Store

from .plan import INDEX_NOISE, RETRIEVAL_DIM


def write_vector_store(
    root: Path,
    rows: int,
    rng: np.random.Generator,
    model: str = "bench-vectors",
    centres: np.ndarray | None = None,
    dim: int = RETRIEVAL_DIM,
) -> str:
    """A committed store of `rows` random unit vectors of `dim` under modality=image/model=`model`: uniform, or
    scattered around `centres` (see `around`; their dim)."""
    import hashlib

    from storage.schema import TIMESTAMP, embedding_schema

    shutil.rmtree(root, ignore_errors=True)
    store = Store(str(root))
    job, files, chunk = "bench-vectors", [], 100_000
    now = datetime.now(UTC)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        vectors = rng.standard_normal((n, dim), dtype=np.float32) if centres is None else around(centres, n, rng)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"v{i:08d}" for i in range(start, start + n)]
        table = pa.table(
            {
                "id": ids,
                "uri": [f"bench://{i}" for i in ids],
                "source": ["bench"] * n,
                "content_hash": [hashlib.sha256(i.encode()).hexdigest() for i in ids],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
                "model_digest": ["random"] * n,
                "job_id": [job] * n,
                "created_at": pa.array([now] * n, TIMESTAMP),
            },
            schema=embedding_schema(vectors.shape[1]),
        )
        files.append(store.write_embeddings("image", model, table))
    store.commit(job, files)
    return model


def around(centres: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` points, each a random centre plus Gaussian noise (not normalised)."""
    picked = centres[rng.integers(0, len(centres), n)]
    return picked + INDEX_NOISE * rng.standard_normal(picked.shape, dtype=np.float32)
