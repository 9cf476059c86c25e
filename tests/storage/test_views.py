"""ROOT/views.sql: a plain DuckDB sees the store as `mmembed sql` does. Read without it, the files showed FLOAT[]
instead of FLOAT[dim], failed to union across models of different dims, and included replaced rows and the files of
jobs that never committed."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from storage.query import connect, run_readonly
from storage.store import Store
from storage.views import VIEWS_FILE


def plain(root: str) -> duckdb.DuckDBPyConnection:
    """What a user outside mmembed does: a new DuckDB, the script, nothing else."""
    con = duckdb.connect()
    con.execute(Path(root, VIEWS_FILE).read_text())
    return con


def rows(con, sql: str) -> list[dict]:
    return con.execute(sql).to_arrow_table().to_pylist()


def test_plain_duckdb_sees_the_views_mmembed_sees(tmp_path, tables, rng):
    store = Store(str(tmp_path / "store"))
    root = store.root
    wide, narrow = tables.unit(rng, 3, 6), tables.unit(rng, 2, 4)
    store.write_job({"job_id": "job1", "started_at": "2025-01-01T00:00:00+00:00", "counts": {"text/a": {"read": 3}}})
    store.commit(
        "job1",
        [
            store.write_embeddings("image", "clip", tables.embeddings(["a", "b", "c"], wide, lang=["en", "de", "en"])),
            store.write_embeddings("text", "mini", tables.embeddings(["t0", "t1"], narrow)),
            store.write_errors("image", tables.errors(["bad.png"], model="clip")),
        ],
    )
    again = tables.embeddings(["a"], tables.unit(rng, 1, 6), job="job2", minute=1, version=1, lang=["fr"])
    store.commit("job2", [store.write_embeddings("image", "clip", again)])
    store.write_embeddings("image", "clip", tables.embeddings(["z"], wide[:1], job="job3"))  # never committed

    outside, inside = plain(root), connect(root)
    for view, order in [("images", "id"), ("texts", "id"), ("embeddings", "modality, id"), ("errors", "id")]:
        sql = f"SELECT * FROM {view} ORDER BY {order}"
        assert rows(outside, sql) == rows(inside, sql), view
    assert outside.sql("SELECT id, lang FROM images ORDER BY id").fetchall() == [("a", "fr"), ("b", "de"), ("c", "en")]
    assert len(rows(outside, "SELECT * FROM images")) == 3 and rows(outside, "SELECT * FROM texts")[0]["dim"] == 4
    types = dict(outside.sql("SELECT column_name, column_type FROM (DESCRIBE embeddings)").fetchall())
    assert types["embedding"] == "FLOAT[6]" and types["dim"] == "INTEGER"
    assert outside.sql("SELECT len(embedding[1:dim]) FROM texts LIMIT 1").fetchone() == (4,)
    query = outside.sql("SELECT embedding FROM images WHERE id = 'b'").fetchone()[0]
    top = outside.execute(
        "SELECT id FROM images ORDER BY array_cosine_similarity(embedding, ?::FLOAT[6]) DESC LIMIT 1", [query]
    ).fetchone()
    assert top == ("b",)
    assert outside.sql("SELECT job_id FROM jobs").fetchall() == [("job1",)]
    frame = outside.sql("SELECT id, embedding FROM images ORDER BY id").df()  # pandas, and pyarrow
    assert list(frame["id"]) == ["a", "b", "c"] and len(frame["embedding"][0]) == 6
    assert outside.sql("SELECT * FROM errors").to_arrow_table().num_rows == 1
    assert run_readonly(inside, "SELECT count(*) AS n FROM images").to_pylist() == [{"n": 3}]
    assert len(pq.read_table(store.committed_files("embeddings")[0])) == 3


def test_an_empty_or_error_only_store_has_views_too(tmp_path, tables):
    store = Store(str(tmp_path))
    store.commit("job1", [store.write_errors("text", tables.errors(["x.txt"]))])
    con = plain(store.root)
    assert con.sql("SELECT count(*) FROM embeddings").fetchone() == (0,)
    assert con.sql("SELECT id FROM errors").fetchall() == [("x.txt",)]
    assert con.sql("SELECT count(*) FROM audio").fetchone() == (0,)
