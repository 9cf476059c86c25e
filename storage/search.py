"""Fast top-k search and zero-shot classification over one (modality, model) partition: its newest rows, loaded
once into a normalised matrix (and reloaded when a commit changes its files); a fresh HNSW index answers instead
when `build_index` made one (storage/index.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa

from . import index
from .query import QueryError, check_predicate, check_readonly, lock_down, one_line, open_store, predicate_sql
from .schema import embedding_dim
from .store import MODALITIES, Store, check_modality, duckdb_connection
from .views import newest

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class _Partition:
    """One (modality, model) partition's newest rows, loaded for search."""

    files: tuple[str, ...]
    matrix: np.ndarray  # (rows, dim) float32, each row L2-normalised
    labels: pa.Table  # id, uri, source of each matrix row
    con: duckdb.DuckDBPyConnection  # table `candidates`: every file column but the embedding, and `_row`
    half: torch.Tensor | None = None  # the matrix in float16, for the first pass over a large partition
    extra: tuple[str, ...] = ()  # the file columns beyond the store's own (passthrough), for searches with details


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
    details: bool = False,
) -> pa.Table:
    """The `k` rows of one modality and model most cosine-similar to `vector`, best first.

    `where` is a SQL predicate over the table's columns (passthrough ones included) that picks
    the candidate rows; values for its `?` or `$name` placeholders go in `params`.
    A whole-partition search uses the partition's HNSW index when a fresh one exists (see
    `build_index`; approximate, with `ef_search` candidates) unless `use_index` is False;
    otherwise the search is exact.
    Returns columns id, uri, modality, model, score; with `details`, also `source` and `columns`, a struct of
    the row's other file columns (passthrough ones), from the cached partition: an HNSW index keeps only ids and
    uris, so a search with details is always exact.
    """
    if modality not in MODALITIES:
        raise QueryError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    if not 1 <= k <= index.INT32:  # a larger LIMIT was a traceback from inside DuckDB
        raise QueryError(f"k must be from 1 to {index.INT32}, not {k}")
    if ef_search is not None and not 1 <= ef_search <= index.INT32:
        raise QueryError(f"ef_search must be from 1 to {index.INT32}, not {ef_search}")
    store = open_store(root)
    exact = details or where is not None or not use_index
    hnsw = None if exact else index.fresh(store, modality, model, _files(store, modality, model))
    part = None if hnsw else _partition(store, modality, model)
    query = _unit(vector, hnsw.dim if hnsw else part.matrix.shape[1], model)
    if hnsw:
        ids, uris, scores = hnsw.search(query, k, ef_search)
    else:
        top, scores = _best(part, query, k, None if where is None else _candidates(part, where, params))
        ids, uris = part.labels["id"].take(top), part.labels["uri"].take(top)
    n = len(ids)
    table = pa.table(
        {
            "id": ids,
            "uri": uris,
            "modality": pa.array([modality] * n, pa.string()),
            "model": pa.array([model] * n, pa.string()),
            "score": pa.array(scores, pa.float32()),
        }
    )
    return _with_details(part, top, table) if details else table


# -- what the search page needs (jobs/serve): the rows' other columns, a stored row's vector ---------------------

STORED = ("id", "uri", "source", "content_hash", "embedding", "model_digest", "job_id", "created_at", "_row")


def _with_details(part: _Partition, top: np.ndarray, table: pa.Table) -> pa.Table:
    """`table` (the rows `top` of `part`) with their `source` and a struct `columns` of the passthrough ones."""
    columns = pa.array([{}] * len(top), pa.struct([]))
    if part.extra:
        with part.con.cursor() as cursor:
            found = cursor.execute(
                f"SELECT _row, {', '.join(_ident(n) for n in part.extra)} FROM candidates "
                "WHERE _row IN (SELECT unnest(?::BIGINT[]))",
                [top.tolist()],
            ).to_arrow_table()
        at = dict(zip(found["_row"].to_pylist(), range(found.num_rows)))
        found = found.take(pa.array([at[int(r)] for r in top], pa.int64()))
        columns = pa.StructArray.from_arrays([found[n].combine_chunks() for n in part.extra], names=list(part.extra))
    return table.append_column("source", part.labels["source"].take(top)).append_column("columns", columns)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def stored_vector(root: str, modality: str, model: str, source: str, id_: str) -> np.ndarray | None:
    """The unit vector of the newest row (source, id) of one partition, from the cached matrix; None if none."""
    part = _partition(open_store(root), modality, model)
    with part.con.cursor() as cursor:
        rows = cursor.execute("SELECT _row FROM candidates WHERE source = ? AND id = ?", [source, id_]).fetchall()
    return part.matrix[rows[0][0]].copy() if rows else None


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
    store = open_store(root)
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
    score: Callable[[np.ndarray], np.ndarray],
    where: str | None = None,
    params: Sequence | dict | None = None,
) -> pa.Table:
    """Zero-shot classification of one modality and model's rows: each row's best label, its cosine similarity
    to that label, and its probability by the model's own rule, `score(cosines (rows, labels)) -> probabilities`
    (CLIP: a softmax over the labels; SigLIP: a sigmoid per label).

    `label_vectors` is (labels, dim), as the model's text tower embeds the labels; `where` as for `search`.
    Returns columns id, uri, label, cosine, probability, in the partition's row order.
    """
    check_modality(modality)
    vectors = np.asarray(label_vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(labels) or not len(labels):
        raise QueryError(f"need one vector per label: {len(labels)} labels, vectors of shape {vectors.shape}")
    part = _partition(open_store(root), modality, model)
    if vectors.shape[1] != part.matrix.shape[1]:
        raise QueryError(
            f"label vectors have dim {vectors.shape[1]}, but model '{model}' has dim {part.matrix.shape[1]}"
        )
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.finfo(np.float32).tiny)
    rows = np.arange(len(part.matrix)) if where is None else _candidates(part, where, params)
    best = np.empty(len(rows), dtype=np.int64)
    cosine = np.empty(len(rows), dtype=np.float32)
    probability = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), CLASSIFY_CHUNK):
        cosines = part.matrix[rows[start : start + CLASSIFY_CHUNK]] @ vectors.T
        p = score(cosines)
        chunk = slice(start, start + len(p))
        best[chunk] = p.argmax(1)
        cosine[chunk] = np.take_along_axis(cosines, best[chunk, None], 1)[:, 0]
        probability[chunk] = p.max(1)
    return pa.table(
        {
            "id": part.labels["id"].take(rows),
            "uri": part.labels["uri"].take(rows),
            "label": pa.array(labels, pa.string()).take(best),
            "cosine": pa.array(cosine, pa.float32()),
            "probability": pa.array(probability, pa.float32()),
        }
    )


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first (ties: lower index first)."""
    n = len(scores)
    best = np.flatnonzero(scores >= np.partition(scores, n - k)[n - k]) if k < n else np.arange(n)
    return best[np.lexsort((best, -scores[best]))][:k]


def _candidates(part: _Partition, where: str, params: Sequence | dict | None) -> np.ndarray:
    sql = predicate_sql("SELECT _row FROM candidates", check_predicate(where))
    check_readonly(sql)
    try:
        with part.con.cursor() as cursor:
            rows = cursor.execute(sql, params).fetchnumpy()["_row"]
    except duckdb.Error as e:
        raise QueryError(f"bad predicate {where!r}: {one_line(e)}") from None
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
    keep = con.sql(f"SELECT _row FROM _meta {newest('source', 'id')} ORDER BY _row").fetchnumpy()["_row"]
    con.unregister("_meta")
    if len(keep) < len(matrix):
        matrix, meta = matrix[keep], meta.take(keep)
    meta = meta.set_column(meta.schema.get_field_index("_row"), "_row", pa.array(np.arange(len(keep))))
    con.register("_meta", meta)
    con.execute("CREATE TABLE candidates AS SELECT * FROM _meta")
    con.unregister("_meta")
    lock_down(con)
    half = None
    if len(matrix) >= HALF_ROWS:
        import torch

        half = torch.from_numpy(matrix).half()
    extra = tuple(n for n in meta.column_names if n not in STORED)
    return _Partition(files, matrix, meta.select(["id", "uri", "source"]), con, half, extra)
