"""DuckDB over a store: views of its committed rows, query-embedding SQL functions, read-only statements.

`connect(root)` gives an in-memory DuckDB with these views, built from committed files only:

    embeddings            every model: the file columns, then `modality`, `model` and `dim`
    images, audio, texts  the embeddings of one modality
    errors                error rows, with `modality`
    jobs                  one row per job record (nested fields as JSON text)

Top-k search and zero-shot classification work on a cached matrix instead of SQL, for speed: storage/search.py.

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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

if TYPE_CHECKING:
    pass

from encoders.errors import MmembedError

from .schema import embedding_dim
from .store import Store, check_modality, check_name, duckdb_connection
from .views import ERRORS_SCHEMA, derived_views, embedding_columns, embeddings_schema
from .views import newest as newest  # where storage.search and others have taken it from

EMBED_FUNCTIONS = {"embed_text": "text", "embed_image": "image", "embed_audio": "audio"}
READ_ONLY = "SELECT, WITH, EXPLAIN, DESCRIBE or SHOW"

Embedder = Callable[[str, str, str], np.ndarray]


class QueryError(MmembedError):
    """A query could not be built or run: a missing root, modality or model, or a bad statement."""


class ReadOnlyError(QueryError):
    """A statement that could change state was refused where only reading is allowed."""


def connect(root: str, embedder: Embedder | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the store's views; with `embedder`, the `embed_*` SQL functions.

    `embedder(model, modality, text_or_path)` returns a 1-D float32 vector.
    """
    store = open_store(root)
    con = duckdb_connection()
    model_dims = _embedding_views(con, store)
    _errors_view(con, store)
    _jobs_view(con, store)
    if embedder is not None:
        _embed_functions(con, store, embedder, model_dims)
    return lock_down(con)


def lock_down(con: duckdb.DuckDBPyConnection, configuration: bool = True) -> duckdb.DuckDBPyConnection:
    """Once a connection's views and tables are set up, it reads nothing but them: no file, URL or database
    (`read_csv`, `glob`, `ATTACH`...), no extension installed or loaded on demand, and (`configuration`) no setting
    changed back. The Arrow datasets registered before still read the store through pyarrow, and the embed_* SQL
    functions still read the files they are given: the one way a statement names a file."""
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET enable_external_access = false")
    if configuration:
        con.execute("SET lock_configuration = true")
    return con


def one_line(e: duckdb.Error) -> str:
    """DuckDB's message without the lines after it (the statement quoted back, a caret, hints): one line."""
    lines = []
    for line in str(e).splitlines():
        if line.startswith("LINE ") or line.startswith("Please try"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)


def check_predicate(where: str) -> str:
    """`where` if it is one SQL expression, which `WHERE (...)` keeps whole; QueryError naming it otherwise.

    Parentheses must balance inside it, so that it cannot close the one put around it (`1=1) OR (1=1`), and it may
    not end a statement (`;`)."""
    if not where.strip():
        raise QueryError(f"bad predicate {where!r}: it is empty")
    try:
        tokens = duckdb.tokenize(where)
    except duckdb.Error as e:
        raise QueryError(f"bad predicate {where!r}: {one_line(e)}") from None
    depth = 0
    for offset, kind in tokens:  # '(', ')' and ';' are tokens of their own; in a string or comment they are none
        char = where[offset] if kind == duckdb.token_type.operator else ""
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise QueryError(f"bad predicate {where!r}: a ')' closes nothing; give one expression")
        if char == ";":
            raise QueryError(f"bad predicate {where!r}: ';' ends a statement; give one expression")
    if depth:
        raise QueryError(f"bad predicate {where!r}: a '(' is never closed")
    try:
        duckdb.extract_statements(predicate_sql("SELECT 1", where))
    except duckdb.Error as e:
        raise QueryError(f"bad predicate {where!r}: {one_line(e)}") from None
    return where


def predicate_sql(select: str, where: str) -> str:
    """`select` filtered by the predicate `where`, on lines of its own: a `--` comment in it ends with its line."""
    return f"{select} WHERE (\n{where}\n)"


def recorded_inputs(root: str, modality: str) -> list[str]:
    """The inputs (directories or Parquet datasets) the store holds `modality` rows from, embedded or errored."""
    view = {"image": "images", "audio": "audio", "text": "texts"}[modality]
    sql = f"SELECT source FROM {view} UNION SELECT source FROM errors WHERE modality = ? ORDER BY source"
    return [r[0] for r in connect(root).execute(sql, [modality]).fetchall()]


_STORES: dict[str, Store] = {}  # one per root, so commit records and footers are read once per process


def open_store(root: str) -> Store:
    """The store at ROOT for reading, one per root and process; QueryError if there is none."""
    store = Store(root)
    store = _STORES.setdefault(store.root, store)
    if not store.exists():
        raise QueryError(f"{store.root} is a file, not a store" if store.is_file() else f"no store at {store.root}")
    return store


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
    parts = [(data, embedding_columns(*key, dims[key], width)) for key, data in datasets.items()]
    empty = embeddings_schema(width)
    _union(con, "_embeddings_all", parts or [(empty.empty_table(), "*")], empty.names)
    return model_dims


def _errors_view(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    parts = [
        (store.dataset(files), f"*, '{check_modality(modality)}' AS modality")
        for (modality,), files in sorted(store.partitions("errors").items())
    ]
    _union(con, "_errors_all", parts or [(ERRORS_SCHEMA.empty_table(), "*")], ERRORS_SCHEMA.names)
    for statement in derived_views():
        con.execute(statement)


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
        raise QueryError(one_line(e)) from None


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
        raise QueryError(one_line(e)) from None


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
