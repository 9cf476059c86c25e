"""Builders for small embedding and error tables, handed to tests by the `tables` fixture."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from storage.schema import ERROR_SCHEMA, TIMESTAMP, embedding_schema

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def content_hash(id_: str, version: int = 0) -> str:
    return hashlib.sha256(f"{id_}:{version}".encode()).hexdigest()


def embeddings(ids, vectors, job="job1", minute=0, source="src", version=0, **passthrough) -> pa.Table:
    """An embeddings table; `minute` sets created_at, `version` the content of each id."""
    vectors = np.asarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    extra = pa.table(passthrough) if passthrough else None
    columns = {
        "id": ids,
        "uri": [f"file:///{source}/{i}" for i in ids],
        "source": [source] * n,
        "content_hash": [content_hash(i, version) for i in ids],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        "model_digest": ["d1"] * n,
        "job_id": [job] * n,
        "created_at": pa.array([T0 + timedelta(minutes=minute)] * n, TIMESTAMP),
        **passthrough,
    }
    return pa.table(columns, schema=embedding_schema(dim, extra.schema if extra is not None else None))


def errors(ids, job="job1", minute=0, model="m", source="src") -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "id": ids,
            "uri": [f"file:///{source}/{i}" for i in ids],
            "source": [source] * n,
            "content_hash": [content_hash(i) for i in ids],
            "model": [model] * n,
            "stage": ["preprocess"] * n,
            "error_type": ["ImageValidationError"] * n,
            "message": [f"cannot decode {i}" for i in ids],
            "job_id": [job] * n,
            "created_at": pa.array([T0 + timedelta(minutes=minute)] * n, TIMESTAMP),
        },
        schema=ERROR_SCHEMA,
    )


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def tables() -> SimpleNamespace:
    return SimpleNamespace(embeddings=embeddings, errors=errors, unit=unit, content_hash=content_hash, T0=T0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
