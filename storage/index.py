"""Optional HNSW indexes (DuckDB's `vss` extension) beside a store, one DuckDB file per partition.

    ROOT/_index/modality=<m>/model=<name>.duckdb
        vectors(id, uri, embedding FLOAT[dim])    the partition's newest rows, L2-normalised,
                                                  under an HNSW index with metric cosine
        meta(files, rows, dim, options, built_at) the committed files it was built from

An index is fresh while its partition's committed files are the ones it was built from;
`fresh` returns only such an index, so a search never misses rows a later job committed.
Each file is built under a temporary name and renamed into place complete, then only ever
opened read-only: vss's experimental persistence (no WAL recovery for the index) cannot
lose what is never written after the build's checkpoint.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from .query import lock_down
from .store import TMP_SUFFIX, Store, StoreError, duckdb_connection

INDEX_DIR = "_index"
OPTIONS = {"M": 16, "ef_construction": 128}  # vss's build defaults; M0 follows M
EF_SEARCH = 64  # vss's default candidates per query
INT32 = 2**31 - 1  # the largest value vss takes for its options


def _valid(name: str, value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (2 if name == "M" else 1) <= value <= INT32


def local_root(store: Store) -> Path:
    if "://" in store.root:
        raise StoreError(f"an HNSW index is a local DuckDB file, and {store.root} is not a local store")
    return Path(store.root)


def index_path(store: Store, modality: str, model: str) -> Path:
    return local_root(store) / INDEX_DIR / f"modality={modality}" / f"model={model}.duckdb"


def _connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """A DuckDB with vss loaded and the file at `path` attached as database `hnsw`.

    Attached to a new in-memory instance rather than opened: `duckdb.connect(path)` would hand back
    a still-open instance of the same path, which is the replaced file after a rebuild."""
    import duckdb_extension_vss

    found = sorted(
        (Path(duckdb_extension_vss.__file__).parent / "extensions").glob(f"v{duckdb.__version__}/vss.duckdb_extension")
    )
    if not found:
        raise StoreError(
            f"duckdb-extension-vss has no vss build for duckdb {duckdb.__version__}: install the matching version"
        )
    con = duckdb_connection()
    con.load_extension(str(found[0]))
    literal = "'" + str(path).replace("'", "''") + "'"  # ATTACH takes no parameters
    con.execute(f"ATTACH {literal} AS hnsw{' (READ_ONLY)' if read_only else ''}")
    # what searches it reads nothing else; its settings stay open, for hnsw_ef_search
    return lock_down(con, configuration=False) if read_only else con


def write(
    store: Store,
    modality: str,
    model: str,
    files: tuple[str, ...],
    matrix: np.ndarray,
    labels: pa.Table,
    options: dict[str, int] | None = None,
) -> Path:
    """Build the index file of one partition from its unit-row `matrix` and the id/uri `labels` of its rows."""
    options = {**OPTIONS, **(options or {})}
    if unknown := set(options) - set(OPTIONS):
        raise StoreError(f"unknown HNSW options {sorted(unknown)}; known: {', '.join(OPTIONS)}")
    if bad := {name: value for name, value in options.items() if not _valid(name, value)}:
        raise StoreError(f"HNSW options must be integers from 2 (M) or 1 (ef_construction) to {INT32}, not {bad}")
    path = index_path(store, modality, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f"{path.name}.*{TMP_SUFFIX}*"):  # a killed build's file and WAL
        leftover.unlink()
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    dim = matrix.shape[1]
    rows = labels.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim))
    try:
        con = _connect(tmp, read_only=False)
        try:
            con.execute("SET hnsw_enable_experimental_persistence = true")
            con.register("_rows", rows)
            con.execute(f"CREATE TABLE hnsw.vectors AS SELECT id, uri, embedding::FLOAT[{dim}] AS embedding FROM _rows")
            con.unregister("_rows")
            settings = ", ".join(f"{name} = {value}" for name, value in options.items())
            con.execute(
                f"CREATE INDEX vectors_hnsw ON hnsw.vectors USING HNSW (embedding) WITH (metric = 'cosine', {settings})"
            )
            con.execute(
                "CREATE TABLE hnsw.meta AS SELECT ?::VARCHAR[] AS files, ?::BIGINT AS rows, ?::INTEGER AS dim, "
                "?::VARCHAR AS options, now() AS built_at",
                [sorted(files), len(matrix), dim, json.dumps(options)],
            )
            con.execute("CHECKPOINT hnsw")
        finally:
            con.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class Index:
    """One partition's index file, open read-only."""

    files: tuple[str, ...]  # sorted
    rows: int
    dim: int
    options: dict[str, int]
    con: duckdb.DuckDBPyConnection

    def sql(self, k: int) -> str:
        """The top-k statement over one query vector parameter; vss plans it as an HNSW_INDEX_SCAN only in
        this shape (ORDER BY the distance, LIMIT a constant; the score computed outside)."""
        return (
            f"SELECT id, uri, 1 - distance AS score FROM (SELECT id, uri, array_cosine_distance(embedding, "
            f"?::FLOAT[{self.dim}]) AS distance FROM hnsw.vectors ORDER BY distance LIMIT {int(k)})"
        )

    def search(self, query: np.ndarray, k: int, ef_search: int | None = None) -> tuple[pa.Array, pa.Array, np.ndarray]:
        """The (approximately) k nearest rows to the unit vector `query`: ids, uris, cosine similarities.
        `ef_search` (default 64) trades latency for recall."""
        with self.con.cursor() as cursor:
            cursor.execute(f"SET hnsw_ef_search = {int(ef_search or EF_SEARCH)}")
            table = cursor.execute(self.sql(k), [query.tolist()]).to_arrow_table()
        return table["id"].combine_chunks(), table["uri"].combine_chunks(), table["score"].to_numpy().astype(np.float32)


_OPEN: dict[Path, tuple[tuple[int, int, int], Index]] = {}
_OPENING = threading.Lock()


def state(store: Store, modality: str, model: str, files: list[str] | tuple[str, ...]) -> str:
    """'fresh' if the partition has an index built from exactly `files` (its committed files now),
    'stale' if it has one built from others, 'none' if it has none."""
    found = None if "://" in store.root else read(index_path(store, modality, model))
    return "none" if found is None else "fresh" if found.files == tuple(sorted(files)) else "stale"


def fresh(store: Store, modality: str, model: str, files: list[str] | tuple[str, ...]) -> Index | None:
    """The partition's index if it is fresh (see `state`)."""
    return read(index_path(store, modality, model)) if state(store, modality, model, files) == "fresh" else None


def read(path: Path) -> Index | None:
    """The index file at `path`, opened once per version of the file; None if there is none."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    version = (st.st_ino, st.st_mtime_ns, st.st_size)
    with _OPENING:
        cached = _OPEN.get(path)
        if cached is None or cached[0] != version:
            try:
                con = _connect(path, read_only=True)
                files, rows, dim, options = con.execute("SELECT files, rows, dim, options FROM hnsw.meta").fetchone()
            except duckdb.Error as e:
                raise StoreError(
                    f"cannot read the index {path} ({e}): rebuild it with `mmembed index --force`"
                ) from None
            cached = _OPEN[path] = (version, Index(tuple(files), rows, dim, json.loads(options), con))
    return cached[1]
