"""The SQL of a store's views, for mmembed's own connections (storage/query.py) and for readers outside it.

ROOT/views.sql, rewritten at each commit, holds the statements that make the same views in a plain DuckDB:

    import duckdb
    con = duckdb.connect()
    con.execute(open("ROOT/views.sql").read())
    con.sql("SELECT id, embedding FROM images WHERE model = 'shapes-clip'").df()     # or .arrow(), .fetchall()

(`duckdb -init ROOT/views.sql` in the DuckDB shell). They read only the committed files, listed by their absolute
paths or URIs (an s3:// ROOT needs DuckDB's httpfs and the AWS variables), type each embedding FLOAT[dim], padded with
zeros to the widest model's as in `mmembed sql`, and keep the newest row per (modality, source, id, model), so a
re-embedded item shows once and a half-written job not at all. It is written after the commit record it reflects,
so a job killed between the two leaves it one commit behind (never ahead) until the next commit; a store moved
elsewhere gets a fresh one at its next commit too.
"""

from __future__ import annotations

import pyarrow as pa

from .schema import ERROR_SCHEMA, embedding_schema

VIEWS_FILE = "views.sql"
MODALITY_VIEWS = {"images": "image", "audio": "audio", "texts": "text"}
_TYPES = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ"}


def newest(*keys: str) -> str:
    """The clause that keeps the newest row per `keys` (created last, then by the later job)."""
    return f"QUALIFY row_number() OVER (PARTITION BY {', '.join(keys)} ORDER BY created_at DESC, job_id DESC) = 1"


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def embedding_columns(modality: str, model: str, dim: int, width: int) -> str:
    """A partition's columns in the `embeddings` view: its own, the vector as FLOAT[width] (zero-padded from dim),
    and modality, model and dim."""
    vector = (
        f"embedding::FLOAT[{width}]"
        if dim == width
        else f"list_resize(embedding::FLOAT[], {width}, 0.0)::FLOAT[{width}]"
    )
    return (
        f"* REPLACE ({vector} AS embedding), {literal(modality)} AS modality, {literal(model)} AS model, {dim} AS dim"
    )


def embeddings_schema(width: int) -> pa.Schema:
    return pa.schema([*embedding_schema(width), ("modality", pa.string()), ("model", pa.string()), ("dim", pa.int32())])


ERRORS_SCHEMA = ERROR_SCHEMA.append(pa.field("modality", pa.string()))


def derived_views() -> list[str]:
    """The views over `_embeddings_all` and `_errors_all` (every committed row): embeddings, one per modality, and
    errors, which drops an error once a newer embedding of the same item by the same model exists."""
    return [
        f"CREATE VIEW embeddings AS SELECT * FROM _embeddings_all {newest('modality', 'source', 'id', 'model')}",
        *(f"CREATE VIEW {v} AS SELECT * FROM embeddings WHERE modality = '{m}'" for v, m in MODALITY_VIEWS.items()),
        f"""CREATE VIEW errors AS
        WITH embedded AS (SELECT modality, source, id, model, max(created_at) AS at FROM _embeddings_all GROUP BY ALL)
        SELECT e.* FROM _errors_all e
        WHERE NOT EXISTS (SELECT 1 FROM embedded x WHERE x.modality = e.modality AND x.source = e.source
                          AND x.id = e.id AND x.model = e.model AND x.at > e.created_at)
        {newest("modality", "source", "id", "model")}""",
    ]


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(t):
        return f"FLOAT[{t.list_size}]"
    return _TYPES[t]


def _nothing(schema: pa.Schema) -> str:
    """A SELECT of no rows with `schema`'s columns."""
    return "SELECT " + ", ".join(f"NULL::{_duck_type(f.type)} AS {f.name}" for f in schema) + " WHERE false"


def _read(uris: list[str]) -> str:
    return f"read_parquet([{', '.join(map(literal, uris))}], union_by_name = true, hive_partitioning = false)"


def script(
    embeddings: dict[tuple[str, str], list[str]],
    dims: dict[tuple[str, str], int],
    errors: dict[str, list[str]],
    jobs: str | None,
) -> str:
    """ROOT/views.sql: `embeddings` are the committed files' URIs per (modality, model), `dims` their dims, `errors`
    the committed error files per modality, `jobs` a glob of the job records (None when there are none yet)."""
    width = max(dims.values(), default=1)
    parts = [
        f"SELECT {embedding_columns(modality, model, dims[modality, model], width)} FROM {_read(uris)}"
        for (modality, model), uris in sorted(embeddings.items())
    ]
    failed = [
        f"SELECT *, {literal(modality)} AS modality FROM {_read(uris)}" for modality, uris in sorted(errors.items())
    ]
    statements = [
        f"CREATE OR REPLACE VIEW _embeddings_all AS {' UNION ALL BY NAME '.join(parts) or _nothing(embeddings_schema(width))}",
        f"CREATE OR REPLACE VIEW _errors_all AS {' UNION ALL BY NAME '.join(failed) or _nothing(ERRORS_SCHEMA)}",
        *(s.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1) for s in derived_views()),
    ]
    if jobs is not None:  # nested fields as JSON, as in `mmembed sql`
        statements.append(
            f"CREATE OR REPLACE VIEW jobs AS SELECT * FROM read_json({literal(jobs)}, union_by_name = true, "
            "maximum_depth = 2) ORDER BY started_at"
        )
    head = "-- The views of an mmembed store for plain DuckDB (see storage/views.py); rewritten at each commit.\n"
    return head + ";\n".join(statements) + ";\n"
