"""Arrow schemas of the store's tables, and the check every written table passes.

`modality` and `model` are hive partition directories (`modality=image/model=clip`), not
file columns: the query layer adds them as view columns, so no file column may use them.
"""

from __future__ import annotations

import pyarrow as pa

from encoders.errors import MmembedError

TIMESTAMP = pa.timestamp("us", tz="UTC")
PARTITION_COLUMNS = ("modality", "model")

_HEAD = [("id", pa.string()), ("uri", pa.string()), ("source", pa.string()), ("content_hash", pa.string())]
_TAIL = [("model_digest", pa.string()), ("job_id", pa.string()), ("created_at", TIMESTAMP)]

ERROR_SCHEMA = pa.schema(
    [
        *_HEAD,
        ("model", pa.string()),  # the model whose preprocessing or encoding failed; null when no model was involved
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("job_id", pa.string()),
        ("created_at", TIMESTAMP),
    ]
)


class SchemaError(MmembedError):
    """A table lacks a store column, has one of the wrong type, or reuses a reserved column name."""


def embedding_schema(dim: int, passthrough: pa.Schema | None = None) -> pa.Schema:
    """The embedding table's columns, then the passthrough columns."""
    if dim < 1:
        raise SchemaError(f"embedding dim must be positive, not {dim}")
    base = pa.schema([*_HEAD, ("embedding", pa.list_(pa.float32(), dim)), *_TAIL])
    extra = list(passthrough or [])
    reserved = [f.name for f in extra if f.name in base.names or f.name in PARTITION_COLUMNS]
    if reserved:
        raise SchemaError(f"passthrough column '{reserved[0]}' reuses a reserved column name")
    return pa.schema([*base, *extra])


def embedding_dim(schema: pa.Schema) -> int:
    """The dim of a schema's `embedding` column, which must be a fixed-size list of float32."""
    if "embedding" not in schema.names:
        raise SchemaError("table has no 'embedding' column")
    t = schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(t) and t.value_type == pa.float32()):
        raise SchemaError(f"column 'embedding' must be fixed_size_list<float32>[dim], not {t}")
    return t.list_size


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns first (each present with its type), then its others."""
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaError(f"table has no '{field.name}' column")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise SchemaError(f"column '{field.name}' must be {field.type}, not {actual}")
    others = [n for n in table.column_names if n not in schema.names]
    reserved = [n for n in others if n in PARTITION_COLUMNS]
    if reserved:
        raise SchemaError(f"column '{reserved[0]}' is a partition directory and cannot be a file column")
    return table.select([*schema.names, *others])
