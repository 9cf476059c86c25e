"""DuckDB over a store: views of its committed rows, query-embedding SQL functions, fast top-k.

`connect(root)` gives an in-memory DuckDB with these views, built from committed files only:

    embeddings            every model: the file columns, then `modality`, `model` and `dim`
    images, audio, texts  the embeddings of one modality
    errors                error rows, with `modality`
    jobs                  one row per job record (nested fields as JSON text)

`search` (top-k) and `classify` (zero-shot labels) work on a cached, normalised matrix of one
partition instead of SQL, for speed; `search` uses a fresh HNSW index instead when
`build_index` made one (storage/index.py).

`embeddings` and `errors` keep the newest row per (modality, source, id, model), so an input
re-embedded later supersedes its old row; an error is dropped once a newer embedding of the
same input by the same model exists.

Mixed dims: DuckDB's array functions take FLOAT[n] on both sides, with one n, and a column
has one type. So every `embedding` column, and every `embed_*` result, is FLOAT[W] with W the
widest model in the store; a narrower model's vectors are zero-padded to W, which leaves
cosine similarity, inner product and L2 distance exactly as they were. `dim` is the model's
own dim: `embedding[1:dim]` is its vector as stored.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

if TYPE_CHECKING:
    import torch

from . import index
from .schema import ERROR_SCHEMA, embedding_dim, embedding_schema
from .store import MODALITIES, Store, check_modality, check_name, duckdb_connection

VIEWS = {"images": "image", "audio": "audio", "texts": "text"}
EMBED_FUNCTIONS = {"embed_text": "text", "embed_image": "image", "embed_audio": "audio"}
READ_ONLY = "SELECT, WITH, EXPLAIN, DESCRIBE or SHOW"

Embedder = Callable[[str, str, str], np.ndarray]


class QueryError(ValueError):
    """A query could not be built or run: a missing root, modality or model, or a bad statement."""


class ReadOnlyError(QueryError):
    """A statement that could change state was refused where only reading is allowed."""


def connect(root: str, embedder: Embedder | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the store's views; with `embedder`, the `embed_*` SQL functions.

    `embedder(model, modality, text_or_path)` returns a 1-D float32 vector.
    """
    store = _open(root)
    con = duckdb_connection()
    model_dims = _embedding_views(con, store)
    _errors_view(con, store)
    _jobs_view(con, store)
    if embedder is not None:
        _embed_functions(con, store, embedder, model_dims)
    return con


def recorded_inputs(root: str, modality: str) -> list[str]:
    """The inputs (directories or Parquet datasets) the store holds `modality` rows from, embedded or errored."""
    view = {"image": "images", "audio": "audio", "text": "texts"}[modality]
    sql = f"SELECT source FROM {view} UNION SELECT source FROM errors WHERE modality = ? ORDER BY source"
    return [r[0] for r in connect(root).execute(sql, [modality]).fetchall()]


_STORES: dict[str, Store] = {}  # one per root, so commit records and footers are read once per process


def _open(root: str) -> Store:
    store = Store(root)
    store = _STORES.setdefault(store.root, store)
    if not store.exists():
        raise QueryError(f"no store at {store.root}")
    return store


def _newest(*keys: str) -> str:
    return f"QUALIFY row_number() OVER (PARTITION BY {', '.join(keys)} ORDER BY created_at DESC, job_id DESC) = 1"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _union(
    con: duckdb.DuckDBPyConnection, view: str, parts: list[tuple[ds.Dataset | pa.Table, str]], head: list[str]
) -> None:
    """CREATE VIEW `view` as the union of `SELECT <columns> FROM <part>` over (part, columns) pairs;
    its columns are `head`, then the parts' other columns."""
    extra: dict[str, None] = {}
    selects = []
    for i, (data, columns) in enumerate(parts):
        extra.update(dict.fromkeys(n for n in data.schema.names if n not in head))
        con.register(f"_{view}_{i}", data)
        selects.append(f"SELECT {columns} FROM _{view}_{i}")
    names = ", ".join(_ident(c) for c in [*head, *extra])
    con.execute(f"CREATE VIEW {view} AS SELECT {names} FROM ({' UNION ALL BY NAME '.join(selects)})")


def _embedding_views(con: duckdb.DuckDBPyConnection, store: Store) -> dict[str, int]:
    """Create `embeddings` and the per-modality views; returns {model: dim}."""
    datasets = {key: store.dataset(files) for key, files in sorted(store.partitions("embeddings").items())}
    dims = {key: embedding_dim(data.schema) for key, data in datasets.items()}
    model_dims: dict[str, int] = {}
    for (modality, model), dim in dims.items():
        check_modality(modality)
        if model_dims.setdefault(check_name("model", model), dim) != dim:
            raise QueryError(
                f"model {model} has {dim}-dim embeddings for {modality} but {model_dims[model]}-dim ones elsewhere"
            )
    width = max(dims.values(), default=1)
    head = [*embedding_schema(width).names, "modality", "model", "dim"]
    parts = []
    for (modality, model), data in datasets.items():
        vector = (
            "embedding"
            if dims[modality, model] == width
            else f"list_resize(embedding::FLOAT[], {width}, 0.0)::FLOAT[{width}]"
        )
        columns = f"'{modality}' AS modality, '{model}' AS model, {dims[modality, model]} AS dim"
        parts.append((data, f"* REPLACE ({vector} AS embedding), {columns}"))
    empty = pa.schema(
        [*embedding_schema(width), ("modality", pa.string()), ("model", pa.string()), ("dim", pa.int32())]
    )
    _union(con, "_embeddings_all", parts or [(empty.empty_table(), "*")], head)
    con.execute(
        f"CREATE VIEW embeddings AS SELECT * FROM _embeddings_all {_newest('modality', 'source', 'id', 'model')}"
    )
    for view, modality in VIEWS.items():
        con.execute(f"CREATE VIEW {view} AS SELECT * FROM embeddings WHERE modality = '{modality}'")
    return model_dims


def _errors_view(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    parts = [
        (store.dataset(files), f"*, '{check_modality(modality)}' AS modality")
        for (modality,), files in sorted(store.partitions("errors").items())
    ]
    empty = ERROR_SCHEMA.append(pa.field("modality", pa.string()))
    _union(con, "_errors_all", parts or [(empty.empty_table(), "*")], empty.names)
    con.execute(f"""
        CREATE VIEW errors AS
        WITH embedded AS (SELECT modality, source, id, model, max(created_at) AS at FROM _embeddings_all GROUP BY ALL)
        SELECT e.* FROM _errors_all e
        WHERE NOT EXISTS (SELECT 1 FROM embedded x WHERE x.modality = e.modality AND x.source = e.source
                          AND x.id = e.id AND x.model = e.model AND x.at > e.created_at)
        {_newest("modality", "source", "id", "model")}""")


def _jobs_view(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    records = store.jobs()
    names = list(dict.fromkeys(["job_id", "started_at", *(k for r in records for k in r)]))
    table = pa.table({n: _column([r.get(n) for r in records]) for n in names})
    con.register("_jobs", table)
    con.execute("CREATE VIEW jobs AS SELECT * FROM _jobs")


def _column(values: list) -> pa.Array:
    """Scalars as they are, nested values (and columns of mixed types) as JSON text."""
    if any(isinstance(v, (dict, list)) for v in values):
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    return array.cast(pa.string()) if pa.types.is_null(array.type) else array


def _embed_functions(
    con: duckdb.DuckDBPyConnection, store: Store, embedder: Embedder, model_dims: dict[str, int]
) -> None:
    width = max(model_dims.values(), default=1)
    cache: dict[tuple[str, str, str], list[float]] = {}

    def function(modality: str) -> Callable[[str, str], list[float]]:
        def embed(model: str, arg: str) -> list[float]:
            key = (model, modality, arg)
            if key not in cache:
                if model not in model_dims:
                    raise QueryError(f"model '{model}' has no embeddings in {store.root}")
                vector = np.asarray(embedder(model, modality, arg), dtype=np.float32)
                if vector.shape != (model_dims[model],):
                    raise QueryError(
                        f"the embedder gave shape {vector.shape} for model '{model}', whose embeddings have dim {model_dims[model]}"
                    )
                cache[key] = np.pad(vector, (0, width - len(vector))).tolist()
            return cache[key]

        return embed

    varchar = duckdb.sqltypes.VARCHAR
    for name, modality in EMBED_FUNCTIONS.items():
        con.create_function(
            name, function(modality), [varchar, varchar], duckdb.array_type(duckdb.sqltypes.FLOAT, width)
        )


# -- read-only statements -----------------------------------------------------------------


def run_readonly(con: duckdb.DuckDBPyConnection, sql: str, params: Sequence | dict | None = None) -> pa.Table:
    """Run one SELECT/WITH/EXPLAIN/DESCRIBE/SHOW statement; anything else raises ReadOnlyError."""
    check_readonly(sql)
    try:
        return con.execute(sql, params).to_arrow_table()
    except duckdb.Error as e:
        raise QueryError(str(e)) from None


def check_readonly(sql: str) -> None:
    """Raise ReadOnlyError unless `sql` is exactly one statement that only reads."""
    statements = _parse(sql)
    if len(statements) != 1:
        raise ReadOnlyError(f"expected exactly one {READ_ONLY} statement, got {len(statements)} statements")
    _check(statements[0])


def _parse(sql: str) -> list[duckdb.Statement]:
    try:
        return duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(str(e)) from None


def _check(statement: duckdb.Statement) -> None:
    # WITH, DESCRIBE, SHOW, SUMMARIZE, VALUES and FROM-first queries all parse as SELECT.
    if statement.type == duckdb.StatementType.SELECT:
        return
    if statement.type == duckdb.StatementType.EXPLAIN:
        return _check(_explained(statement.query))  # EXPLAIN ANALYZE runs what it explains
    raise ReadOnlyError(f"only {READ_ONLY} statements may run here, not {statement.type.name}")


def _explained(sql: str) -> duckdb.Statement:
    """The statement an EXPLAIN [ANALYZE] [(options)] wraps: the first token suffix that parses."""
    for offset, _ in duckdb.tokenize(sql)[1:]:
        try:
            statements = duckdb.extract_statements(sql[offset:])
        except duckdb.Error:
            continue
        if len(statements) == 1:
            return statements[0]
    raise ReadOnlyError("cannot tell which statement this EXPLAIN wraps")


# -- fast top-k search --------------------------------------------------------------------


@dataclass(frozen=True)
class _Partition:
    """One (modality, model) partition's newest rows, loaded for search."""

    files: tuple[str, ...]
    matrix: np.ndarray  # (rows, dim) float32, each row L2-normalised
    labels: pa.Table  # id, uri of each matrix row
    con: duckdb.DuckDBPyConnection  # table `candidates`: every file column but the embedding, and `_row`
    half: torch.Tensor | None = None  # the matrix in float16, for the first pass over a large partition


HALF_ROWS = 200_000  # from this many rows, a search scans a float16 copy first: the scan is bound by memory traffic
# |float16 score - exact score| for unit vectors: both roundings (2 ** -11 each, relative), float32 sums, and room
HALF_ERROR = 1.5e-3

_PARTITIONS: dict[tuple[str, str, str], _Partition] = {}
_LOADING = threading.Lock()


def search(
    root: str,
    vector: np.ndarray,
    modality: str,
    model: str,
    k: int = 10,
    where: str | None = None,
    params: Sequence | dict | None = None,
    use_index: bool = True,
    ef_search: int | None = None,
) -> pa.Table:
    """The `k` rows of one modality and model most cosine-similar to `vector`, best first.

    `where` is a SQL predicate over the table's columns (passthrough ones included) that picks
    the candidate rows; values for its `?` or `$name` placeholders go in `params`.
    A whole-partition search uses the partition's HNSW index when a fresh one exists (see
    `build_index`; approximate, with `ef_search` candidates) unless `use_index` is False;
    otherwise the search is exact.
    Returns columns id, uri, modality, model, score.
    """
    if modality not in MODALITIES:
        raise QueryError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    if k < 1:
        raise QueryError(f"k must be positive, not {k}")
    if ef_search is not None and ef_search < 1:
        raise QueryError(f"ef_search must be positive, not {ef_search}")
    store = _open(root)
    hnsw = index.fresh(store, modality, model, _files(store, modality, model)) if use_index and where is None else None
    part = None if hnsw else _partition(store, modality, model)
    query = _unit(vector, hnsw.dim if hnsw else part.matrix.shape[1], model)
    if hnsw:
        ids, uris, scores = hnsw.search(query, k, ef_search)
    else:
        top, scores = _best(part, query, k, None if where is None else _candidates(part, where, params))
        ids, uris = part.labels["id"].take(top), part.labels["uri"].take(top)
    n = len(ids)
    return pa.table(
        {
            "id": ids,
            "uri": uris,
            "modality": pa.array([modality] * n, pa.string()),
            "model": pa.array([model] * n, pa.string()),
            "score": pa.array(scores, pa.float32()),
        }
    )


def _unit(vector: np.ndarray, dim: int, model: str) -> np.ndarray:
    query = np.asarray(vector, dtype=np.float32)
    if query.shape != (dim,):
        raise QueryError(f"query vector has shape {query.shape}, but model '{model}' has dim {dim}")
    norm = np.linalg.norm(query)
    if not norm > 0:
        raise QueryError("query vector has zero or non-finite norm")
    return query / norm


def build_index(
    root: str,
    modality: str | None = None,
    model: str | None = None,
    force: bool = False,
    options: dict[str, int] | None = None,
) -> list[dict]:
    """Build the HNSW index of every partition (or those of `modality` / `model`) that has no fresh one
    with these `options` (every one with `force`); returns per partition: modality, model, rows, status
    (built or fresh), seconds."""
    store = _open(root)
    index.local_root(store)  # before loading any partition
    wanted = {**index.OPTIONS, **(options or {})}
    done = []
    for (mod, name), files in sorted(store.partitions("embeddings").items()):
        if modality not in (None, mod) or model not in (None, name):
            continue
        start = time.perf_counter()
        hnsw = None if force else index.fresh(store, mod, name, files)
        hnsw = hnsw if hnsw and hnsw.options == wanted else None
        if hnsw is None:
            part = _partition(store, mod, name)
            index.write(store, mod, name, part.files, part.matrix, part.labels, options)
        rows = hnsw.rows if hnsw else len(part.matrix)
        done.append(
            {
                "modality": mod,
                "model": name,
                "rows": rows,
                "status": "fresh" if hnsw else "built",
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
    if not done:
        raise QueryError(
            f"no embeddings{f' for modality={modality}' if modality else ''}{f' from model {model}' if model else ''} in {store.root}"
        )
    return done


def _best(part: _Partition, query: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best matches to the unit vector `query` among `rows` (default: the whole partition): rows, scores.

    A whole large partition is scanned in float16 first, then only the rows that the scan's error bound
    leaves in reach of the top k are scored exactly: the same rows and scores as an exact scan, at half
    the traffic."""
    if rows is None and part.half is None:
        scores = part.matrix @ query
        top = _top_k(scores, k)
        return top, scores[top]
    if rows is None:
        import torch

        approx = torch.mv(part.half, torch.from_numpy(query).half()).float().numpy()
        kth = np.partition(approx, len(approx) - k)[len(approx) - k] if k < len(approx) else approx.min()
        rows = np.flatnonzero(approx >= kth - 2 * HALF_ERROR)  # every row whose exact score can reach the k-th best
    exact = part.matrix[rows] @ query
    best = _top_k(exact, k)
    return rows[best], exact[best]


CLASSIFY_CHUNK = 65_536  # rows scored at a time: bounds the (rows, labels) score matrix


def classify(
    root: str,
    label_vectors: np.ndarray,
    labels: Sequence[str],
    modality: str,
    model: str,
    scale: float,
    where: str | None = None,
    params: Sequence | dict | None = None,
) -> pa.Table:
    """Zero-shot classification of one modality and model's rows: each row's best label and its probability,
    a softmax over `scale` x the cosine similarity to every label vector (CLIP's zero-shot rule).

    `label_vectors` is (labels, dim), as the model's text tower embeds the labels; `where` as for `search`.
    Returns columns id, uri, label, probability, in the partition's row order.
    """
    check_modality(modality)
    vectors = np.asarray(label_vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(labels) or not len(labels):
        raise QueryError(f"need one vector per label: {len(labels)} labels, vectors of shape {vectors.shape}")
    part = _partition(_open(root), modality, model)
    if vectors.shape[1] != part.matrix.shape[1]:
        raise QueryError(
            f"label vectors have dim {vectors.shape[1]}, but model '{model}' has dim {part.matrix.shape[1]}"
        )
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    rows = np.arange(len(part.matrix)) if where is None else _candidates(part, where, params)
    best = np.empty(len(rows), dtype=np.int64)
    probability = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), CLASSIFY_CHUNK):
        logits = scale * (part.matrix[rows[start : start + CLASSIFY_CHUNK]] @ vectors.T)
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        best[start : start + len(p)] = p.argmax(1)
        probability[start : start + len(p)] = p.max(1)
    return pa.table(
        {
            "id": part.labels["id"].take(rows),
            "uri": part.labels["uri"].take(rows),
            "label": pa.array(labels, pa.string()).take(best),
            "probability": pa.array(probability, pa.float32()),
        }
    )


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first (ties: lower index first)."""
    n = len(scores)
    best = np.flatnonzero(scores >= np.partition(scores, n - k)[n - k]) if k < n else np.arange(n)
    return best[np.lexsort((best, -scores[best]))][:k]


def _candidates(part: _Partition, where: str, params: Sequence | dict | None) -> np.ndarray:
    sql = f"SELECT _row FROM candidates WHERE ({where})"
    check_readonly(sql)
    try:
        with part.con.cursor() as cursor:
            rows = cursor.execute(sql, params).fetchnumpy()["_row"]
    except duckdb.Error as e:
        raise QueryError(f"bad where predicate {where!r}: {e}") from None
    return np.unique(rows[(rows >= 0) & (rows < len(part.matrix))]).astype(np.int64)


def _files(store: Store, modality: str, model: str) -> tuple[str, ...]:
    files = tuple(store.partitions("embeddings").get((modality, model), ()))
    if not files:
        raise QueryError(f"no embeddings for modality={modality} model={model} in {store.root}")
    return files


def _partition(store: Store, modality: str, model: str) -> _Partition:
    """The cached partition, reloaded whenever its committed files change."""
    files = _files(store, modality, model)
    key = (store.root, modality, model)
    with _LOADING:
        part = _PARTITIONS.get(key)
        if part is None or part.files != files:
            _PARTITIONS.pop(key, None)  # free the stale matrix before building its successor
            part = _PARTITIONS[key] = _load(store, files)
    return part


def _load(store: Store, files: tuple[str, ...]) -> _Partition:
    table = store.dataset(list(files)).to_table()
    dim = embedding_dim(table.schema)
    matrix = np.empty((table.num_rows, dim), dtype=np.float32)
    start = 0
    for chunk in table["embedding"].chunks:
        values = chunk.flatten().to_numpy()
        if len(values) != len(chunk) * dim:
            raise QueryError(f"null embeddings among {', '.join(store.uri(f) for f in files)}")
        block = values.reshape(-1, dim)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        np.divide(block, np.maximum(norms, np.finfo(np.float32).tiny)[:, None], out=matrix[start : start + len(chunk)])
        start += len(chunk)
    meta = table.drop_columns(["embedding"]).append_column("_row", pa.array(np.arange(table.num_rows)))
    del table
    con = duckdb_connection()
    con.register("_meta", meta)
    keep = con.sql(f"SELECT _row FROM _meta {_newest('source', 'id')} ORDER BY _row").fetchnumpy()["_row"]
    con.unregister("_meta")
    if len(keep) < len(matrix):
        matrix, meta = matrix[keep], meta.take(keep)
    meta = meta.set_column(meta.schema.get_field_index("_row"), "_row", pa.array(np.arange(len(keep))))
    con.register("_meta", meta)
    con.execute("CREATE TABLE candidates AS SELECT * FROM _meta")
    con.unregister("_meta")
    half = None
    if len(matrix) >= HALF_ROWS:
        import torch

        half = torch.from_numpy(matrix).half()
    return _Partition(files, matrix, meta.select(["id", "uri"]), con, half)
