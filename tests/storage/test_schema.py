import pyarrow as pa
import pytest

from storage.schema import ERROR_SCHEMA, SchemaError, conform, embedding_dim, embedding_schema

BASE = ["id", "uri", "source", "content_hash", "embedding", "model_digest", "job_id", "created_at"]


def test_embedding_schema_columns_then_passthrough():
    schema = embedding_schema(384, pa.schema([("lang", pa.string()), ("rank", pa.int64())]))
    assert schema.names == [*BASE, "lang", "rank"]
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert embedding_dim(schema) == 384


def test_error_schema_columns():
    assert ERROR_SCHEMA.names == [
        "id",
        "uri",
        "source",
        "content_hash",
        "model",
        "stage",
        "error_type",
        "message",
        "job_id",
        "created_at",
    ]


@pytest.mark.parametrize("name", ["id", "embedding", "modality", "model"])
def test_passthrough_cannot_reuse_a_reserved_name(name):
    with pytest.raises(SchemaError, match=f"'{name}'"):
        embedding_schema(4, pa.schema([(name, pa.string())]))


def test_embedding_must_be_fixed_size_float32():
    with pytest.raises(SchemaError, match="fixed_size_list"):
        embedding_dim(pa.schema([("embedding", pa.list_(pa.float32()))]))
    with pytest.raises(SchemaError, match="fixed_size_list"):
        embedding_dim(pa.schema([("embedding", pa.list_(pa.float64(), 4))]))


def test_conform_orders_columns_and_names_the_wrong_one():
    schema = pa.schema([("a", pa.string()), ("b", pa.int64())])
    table = pa.table({"x": [1.0], "b": [2], "a": ["s"]})
    assert conform(table, schema).column_names == ["a", "b", "x"]
    with pytest.raises(SchemaError, match="no 'b' column"):
        conform(table.drop_columns(["b"]), schema)
    with pytest.raises(SchemaError, match="'b' must be int64, not string"):
        conform(pa.table({"a": ["s"], "b": ["2"]}), schema)
    with pytest.raises(SchemaError, match="'model' is a partition"):
        conform(table.append_column("model", pa.array(["m"])), schema)
