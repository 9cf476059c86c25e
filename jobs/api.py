"""The library the CLI, the demo and the bench call: open a store, encode a query, search, classify, run SQL, run
a job. Nothing here prints; each function raises an `MmembedError` for what its caller can fix."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from encoders.model import Encoder
from encoders.registry import load_encoder
from storage import index
from storage.query import QueryError, connect, open_store, run_readonly
from storage.search import classify as classify_rows
from storage.search import search as search_rows
from storage.store import Store

if TYPE_CHECKING:
    from .config import JobConfig

DEFAULT_LOGIT_SCALE = 100.0  # CLIP's trained temperature, for a model that stores none (a sentence encoder)


@lru_cache(maxsize=8)
def encoder(name: str) -> Encoder:
    """A model, loaded once per process."""
    return load_encoder(name)


def embed_query(model: str, modality: str, value: str) -> np.ndarray:
    """A query's embedding: a text, or the path of an image or audio file. The embedder behind `query` and SQL's
    embed_text / embed_image / embed_audio."""
    if modality == "text":
        raw = value
    else:
        try:
            raw = Path(value).read_bytes()
        except OSError as e:
            raise QueryError(f"cannot read the query {modality} {value}: {e.strerror}") from None
    model_encoder = encoder(model)
    model_encoder.check_modality(modality)
    return model_encoder.encode(modality, [raw])[0]


def pick_model(store: Store, modality: str, query_modality: str, model: str | None) -> str:
    """The model whose `modality` partition a `query_modality` query searches: `model` if the store has it, else
    the only one there that can encode such a query."""
    models = sorted({m for mod, m in store.partitions("embeddings") if mod == modality})
    if model:
        if model not in models:
            raise QueryError(
                f"no {modality} embeddings from model {model!r} in {store.root} (models there: {', '.join(models) or 'none'})"
            )
        return model
    able = [m for m in models if query_modality in encoder(m).modalities]
    if not able:
        raise QueryError(
            f"no {modality} embeddings in {store.root} from a model that can encode a {query_modality} query"
        )
    if len(able) > 1:
        raise QueryError(f"several models hold {modality} embeddings ({', '.join(able)}): choose one with --model")
    return able[0]


def index_state(store: Store, modality: str, model: str) -> str:
    """'fresh', 'stale' or 'none': the HNSW index of a partition (see storage.index)."""
    return index.state(store, modality, model, store.partitions("embeddings").get((modality, model), ()))


def search(
    root: str,
    query_modality: str,
    value: str,
    modality: str | None = None,
    model: str | None = None,
    k: int = 10,
    where: str | None = None,
    exact: bool = False,
    ef_search: int | None = None,
    params: Sequence | dict | None = None,
) -> tuple[str, pa.Table]:
    """Top-k of a query (a text, or an image or audio file's path) over one modality's partition (default: the
    query's own modality): -> (the model searched, rows id, uri, modality, model, score). `where` is one SQL
    expression over the partition's columns, its placeholders bound to `params`."""
    if k < 1:
        raise QueryError(f"k must be positive, not {k}")
    store = open_store(root)
    modality = modality or query_modality
    model = pick_model(store, modality, query_modality, model)
    vector = embed_query(model, query_modality, value)
    rows = search_rows(
        root, vector, modality, model, k=k, where=where, params=params, use_index=not exact, ef_search=ef_search
    )
    return model, rows


def classify(
    root: str,
    labels: Sequence[str],
    modality: str = "image",
    model: str | None = None,
    where: str | None = None,
    params: Sequence | dict | None = None,
) -> tuple[pa.Table, Counter]:
    """Each item's best label by the model's text tower and its zero-shot score: -> (rows id, uri, label,
    probability; the count of each label)."""
    labels = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
    if len(labels) < 2:
        raise QueryError(f"classification needs at least two labels, got {labels}")
    store = open_store(root)
    model = pick_model(store, modality, "text", model)
    text_encoder = encoder(model)
    scale = getattr(text_encoder, "logit_scale", DEFAULT_LOGIT_SCALE)
    vectors = text_encoder.encode("text", labels)
    result = classify_rows(root, vectors, labels, modality, model, scale, where=where, params=params)
    counts = Counter(result["label"].to_pylist())
    return result, Counter({label: counts[label] for label in labels})


def sql(root: str, statement: str, params: Sequence | dict | None = None) -> pa.Table:
    """One read-only statement over the store's views, with the embed_* functions and its placeholders bound to
    `params`; it reads nothing outside the store (storage.query.lock_down)."""
    open_store(root)
    return run_readonly(connect(root, embedder=embed_query), statement, params)


def run_job(cfg: JobConfig, **kwargs) -> dict:
    """Run a job (see jobs.run.run_job) -> its record; Ray loads only here."""
    from .run import run_job as run

    return run(cfg, **kwargs)
