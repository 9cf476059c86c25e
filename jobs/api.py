"""The library the CLI, the demo, the bench and the server call: open a store, encode a query, search, classify, run
SQL, run a job, and address a stored item by its key. Nothing here prints; each function raises an `MmembedError`
for what its caller can fix."""

from __future__ import annotations

import hashlib
import mimetypes
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from encoders.model import Encoder
from encoders.registry import load_encoder
from storage import index
from storage.query import QueryError, connect, open_store, run_readonly
from storage.search import STORED as STORED_COLUMNS
from storage.search import classify as classify_rows
from storage.search import search as search_rows
from storage.search import stored_vector
from storage.store import KEY_SEP, Store

if TYPE_CHECKING:
    from .config import JobConfig


@lru_cache(maxsize=8)
def encoder(name: str) -> Encoder:
    """A model, loaded once per process."""
    return load_encoder(name)


def embed_query(model: str, modality: str, value: str | bytes) -> np.ndarray:
    """A query's embedding: a text, or an image or audio file's path (str) or bytes. The embedder behind `query` and
    SQL's embed_text / embed_image / embed_audio."""
    if modality == "text" or isinstance(value, bytes):
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
    details: bool = False,
    params: Sequence | dict | None = None,
) -> tuple[str, pa.Table]:
    """Top-k of a query (a text, or an image or audio file's path or bytes) over one modality's partition (default:
    the query's own modality): -> (the model searched, rows id, uri, modality, model, score). With `details` (what
    the search page shows; always exact), each row also has its `key`, `source`, `columns` (passthrough),
    `transcript` and `segment`. `where` is one SQL expression over the partition's columns, its placeholders
    bound to `params`."""
    if not 1 <= k <= index.INT32:  # before the query is encoded
        raise QueryError(f"k must be from 1 to {index.INT32}, not {k}")
    store = open_store(root)
    modality = modality or query_modality
    model = pick_model(store, modality, query_modality, model)
    vector = embed_query(model, query_modality, value)
    rows = search_rows(
        root,
        vector,
        modality,
        model,
        k=k,
        where=where,
        params=params,
        use_index=not exact,
        ef_search=ef_search,
        details=details,
    )
    return model, _keyed(store, rows) if details else rows


def classify(
    root: str,
    labels: Sequence[str],
    modality: str = "image",
    model: str | None = None,
    where: str | None = None,
    params: Sequence | dict | None = None,
) -> tuple[pa.Table, Counter]:
    """Each item's best label by the model's text tower and its own zero-shot score (`Encoder.score`): -> (rows id,
    uri, label, cosine, probability; the count of each label)."""
    labels = list(dict.fromkeys(label.strip() for label in labels if label.strip()))
    if len(labels) < 2:
        raise QueryError(f"classification needs at least two labels, got {labels}")
    store = open_store(root)
    model = pick_model(store, modality, "text", model)
    text_encoder = encoder(model)
    vectors = text_encoder.encode("text", labels)
    result = classify_rows(root, vectors, labels, modality, model, text_encoder.score, where=where, params=params)
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


# -- stored items by key: what `mmembed serve` addresses --------------------------------------------------------

KEY_CHARS = 16  # hex digits of sha256: 64 bits, so a collision among 10^8 items has odds of about 1 in 4000
_KEY = re.compile(f"[0-9a-f]{{{KEY_CHARS}}}")
_ITEMS: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, str, str]]]] = {}
_CONNECTIONS: dict[str, tuple[tuple[str, ...], duckdb.DuckDBPyConnection]] = {}
_ITEMS_LOCK = threading.Lock()


class ItemNotFound(QueryError):
    """No item of the store has this key, or its media cannot be read."""


def item_key(modality: str, source: str, id_: str) -> str:
    """The key of a stored item, unique in its store (an id is unique only within its source): the first
    KEY_CHARS hex digits of sha256 over modality, source and id."""
    return hashlib.sha256(KEY_SEP.join((modality, source, id_)).encode()).hexdigest()[:KEY_CHARS]


def _keyed(store: Store, rows: pa.Table) -> pa.Table:
    """Search rows (with details) -> key first, then the rows' columns, then the transcript hook's columns."""
    keys = [item_key(m, s, i) for m, s, i in zip(*(rows[c].to_pylist() for c in ("modality", "source", "id")))]
    return transcripts(store, rows.add_column(0, "key", pa.array(keys, pa.string())))


def transcripts(store: Store, rows: pa.Table) -> pa.Table:
    """Rows with `transcript` (the text of the row's audio) and `segment` (start and end seconds of the part that
    matched): null until the store holds transcripts (ROOT/transcripts/, DESIGN.md). The hook the transcripts
    issue fills in: the page shows whatever these columns hold."""
    n = rows.num_rows
    segment = pa.struct([("start", pa.float32()), ("end", pa.float32())])
    return rows.append_column("transcript", pa.nulls(n, pa.string())).append_column("segment", pa.nulls(n, segment))


def _read(store: Store, statement: str, params: list | None = None) -> pa.Table:
    """A read-only statement on one connection per store, rebuilt when a commit changes the store; statements on
    it run one at a time (a DuckDB connection is not for concurrent use, and its views do not reach its cursors)."""
    version = tuple(store.committed_files("embeddings")) + tuple(store.committed_files("errors"))
    with _ITEMS_LOCK:
        cached = _CONNECTIONS.get(store.root)
        if cached is None or cached[0] != version:
            cached = _CONNECTIONS[store.root] = (version, connect(store.root))
        return run_readonly(cached[1], statement, params)


def _items(store: Store) -> dict[str, tuple[str, str, str]]:
    """key -> (modality, source, id) of every item with an embedding, rebuilt when a commit changes the store."""
    version = tuple(store.committed_files("embeddings"))
    cached = _ITEMS.get(store.root)
    if cached is None or cached[0] != version:
        found = _read(store, "SELECT DISTINCT modality, source, id FROM embeddings").to_pylist()
        rows = [(r["modality"], r["source"], r["id"]) for r in found]
        cached = _ITEMS[store.root] = (version, {item_key(*row): row for row in rows})
    return cached[1]


def item(root: str, key: str) -> dict:
    """The stored item `key`: key, id, uri, source, modality, content_hash, its `models` (model, dim, job_id,
    created_at), `columns` (passthrough) and `transcript`; ItemNotFound if the store has no such item."""
    store = open_store(root)
    found = _items(store).get(key) if _KEY.fullmatch(key) else None
    if found is None:
        raise ItemNotFound(f"no item with key {key[:40]!r} in {store.root}")
    rows = _read(
        store,
        "SELECT * EXCLUDE (embedding) FROM embeddings WHERE modality = ? AND source = ? AND id = ? "
        "ORDER BY created_at DESC, model",
        list(found),
    ).to_pylist()
    if not rows:
        raise ItemNotFound(f"item {key} is no longer in {store.root}")
    newest = rows[0]
    own = {*STORED_COLUMNS, "modality", "model", "dim"}
    return {
        "key": key,
        **{c: newest[c] for c in ("id", "uri", "source", "modality", "content_hash")},
        "models": [{c: r[c] for c in ("model", "dim", "job_id", "created_at")} for r in rows],
        "columns": {c: v for c, v in newest.items() if c not in own},
        "transcript": transcripts(store, pa.table({"id": [key]}))["transcript"][0].as_py(),
    }


def search_like(
    root: str, key: str, modality: str | None = None, model: str | None = None, k: int = 10, where: str | None = None
) -> tuple[str, pa.Table]:
    """Search by a stored item (`key`), as `search` with details does by a query: over `modality` (default the
    item's own) with `model` (default: the one model both the item and that partition have). The item's stored
    vector is the query where the model embedded it; otherwise the model encodes the item's media."""
    store = open_store(root)
    found = item(root, key)
    modality = modality or found["modality"]
    own = {m["model"] for m in found["models"]}
    if model is None:
        shared = sorted(own & {m for mod, m in store.partitions("embeddings") if mod == modality})
        if len(shared) > 1:
            raise QueryError(f"several models hold {modality} embeddings ({', '.join(shared)}): choose one with model")
        model = shared[0] if shared else None
    model = pick_model(store, modality, found["modality"], model)
    vector = stored_vector(root, found["modality"], model, found["source"], found["id"]) if model in own else None
    if vector is None:  # a model that did not embed the item: encode its media
        vector = embed_query(model, found["modality"], media(root, key).read())
    rows = search_rows(root, vector, modality, model, k=k, where=where, details=True)
    return model, _keyed(store, rows)


@dataclass(frozen=True)
class Media:
    """A stored item's bytes: a local file (`path`) or bytes read from its URI or its text (`data`)."""

    media_type: str
    path: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        return self.path.read_bytes() if self.path else self.data


def media(root: str, key: str) -> Media:
    """The media of the stored item `key`, found only through its row's uri (a text item: its text); ItemNotFound
    if the store has no such item or its uri cannot be read."""
    found = item(root, key)
    uri, text = found["uri"], found["columns"].get("text")
    media_type = mimetypes.guess_type(uri or "")[0] or "application/octet-stream"
    if found["modality"] == "text":
        media_type = "text/plain; charset=utf-8"
    if uri and "://" not in uri and Path(uri).is_absolute() and Path(uri).is_file():
        return Media(media_type, path=Path(uri))
    if found["modality"] == "text" and isinstance(text, str):
        return Media(media_type, data=text.encode())
    if uri and "://" in uri:
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
            with fs.open_input_stream(path) as f:
                return Media(media_type, data=f.read())
        except (pa.ArrowInvalid, OSError):
            pass
    raise ItemNotFound(f"the media of item {key} cannot be read from its uri {uri!r}")


def stats(root: str, errors: int = 200) -> dict:
    """Embedding counts per modality and model, error counts per modality, model, stage and type, and the newest
    `errors` error rows."""
    store = open_store(root)
    embeddings = _read(
        store,
        "SELECT modality, model, any_value(dim) AS dim, count(*) AS rows FROM embeddings GROUP BY ALL ORDER BY ALL",
    ).to_pylist()
    counts = _read(
        store, "SELECT modality, model, stage, error_type, count(*) AS rows FROM errors GROUP BY ALL ORDER BY ALL"
    ).to_pylist()
    newest = _read(
        store,
        "SELECT id, uri, source, modality, model, stage, error_type, message, job_id, created_at FROM errors "
        "ORDER BY created_at DESC, id LIMIT ?",
        [int(errors)],
    ).to_pylist()
    total = sum(r["rows"] for r in counts)
    return {"root": store.root, "embeddings": embeddings, "errors": {"total": total, "counts": counts, "rows": newest}}
