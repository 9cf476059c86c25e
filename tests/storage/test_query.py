import json

import numpy as np
import pytest

from storage.query import QueryError, ReadOnlyError, connect, run_readonly
from storage.store import Store


def commit(store, job, *shards):
    """Write each (modality, model or None for errors, table) shard and commit them together."""
    files = [
        store.write_errors(m, t) if model is None else store.write_embeddings(m, model, t) for m, model, t in shards
    ]
    store.commit(job, files)


def column_types(con, view):
    return {name: kind for name, kind, *_ in con.sql(f"DESCRIBE {view}").fetchall()}


def fake_embedder(calls):
    """Deterministic vectors from (model, modality, text); records every call."""
    dims = {"clip": 6, "minilm": 4}

    def embed(model, modality, text):
        calls.append((model, modality, text))
        seed = sum(ord(c) for c in f"{model}/{modality}/{text}")
        return np.random.default_rng(seed).standard_normal(dims[model]).astype(np.float32)

    return embed


def cosine(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture
def mixed(tmp_path, tables, rng):
    """Images by clip (dim 6); texts by clip (6) and minilm (4); no audio."""
    store = Store(str(tmp_path))
    vectors = {"img": tables.unit(rng, 8, 6), "clip": tables.unit(rng, 2, 6), "minilm": tables.unit(rng, 3, 4)}
    images = [f"img{i}.png" for i in range(8)]
    commit(
        store,
        "job1",
        ("image", "clip", tables.embeddings(images[:5], vectors["img"][:5], lang=["en", "de", "en", "fr", "en"])),
        ("text", "clip", tables.embeddings(["t0", "t1"], vectors["clip"])),
        ("text", "minilm", tables.embeddings(["t0", "t1", "t2"], vectors["minilm"])),
    )
    commit(
        store,
        "job2",
        ("image", "clip", tables.embeddings(images[5:], vectors["img"][5:], job="job2", lang=["de", "en", "en"])),
    )
    return str(tmp_path), images, vectors


def test_views_round_trip_values(mixed):
    root, images, vectors = mixed
    con = connect(root)
    rows = run_readonly(
        con, "SELECT id, modality, model, dim, embedding, lang, job_id FROM images ORDER BY id"
    ).to_pylist()
    assert [r["id"] for r in rows] == images
    assert {(r["modality"], r["model"], r["dim"]) for r in rows} == {("image", "clip", 6)}
    np.testing.assert_array_equal(np.array([r["embedding"] for r in rows], np.float32), vectors["img"])
    assert [r["lang"] for r in rows] == ["en", "de", "en", "fr", "en", "de", "en", "en"]
    assert [r["job_id"] for r in rows] == ["job1"] * 5 + ["job2"] * 3
    counts = dict(con.sql("SELECT modality || '/' || model, count(*) FROM embeddings GROUP BY ALL").fetchall())
    assert counts == {"image/clip": 8, "text/clip": 2, "text/minilm": 3}
    assert con.sql("SELECT count(*) FROM audio").fetchone() == (0,)


def test_mixed_dims_share_one_padded_array_type(mixed):
    root, _, vectors = mixed
    con = connect(root)
    for view in ("embeddings", "images", "texts", "audio"):
        assert column_types(con, view)["embedding"] == "FLOAT[6]"
    rows = run_readonly(
        con, "SELECT id, dim, embedding, embedding[1:dim] AS own FROM texts WHERE model = 'minilm' ORDER BY id"
    ).to_pylist()
    for r, v in zip(rows, vectors["minilm"]):
        assert r["dim"] == 4
        np.testing.assert_array_equal(r["embedding"], [*v, 0.0, 0.0])
        np.testing.assert_array_equal(r["own"], v)


def test_embed_functions_with_mixed_dims(mixed):
    root, images, vectors = mixed
    calls = []
    embed = fake_embedder(calls)
    con = connect(root, embedder=embed)
    sql = (
        "SELECT id, array_cosine_similarity(embedding, embed_text('clip', 'a red circle')) AS score FROM images "
        "WHERE model = 'clip' ORDER BY score DESC LIMIT 5"
    )
    top = run_readonly(con, sql).to_pylist()
    q = embed("clip", "text", "a red circle")
    expected = sorted(((cosine(v, q), i) for i, v in zip(images, vectors["img"])), reverse=True)[:5]
    assert [r["id"] for r in top] == [i for _, i in expected]
    assert [r["score"] for r in top] == pytest.approx([s for s, _ in expected], abs=1e-6)

    for model, own in (("minilm", vectors["minilm"]), ("clip", vectors["clip"])):
        rows = run_readonly(
            con,
            "SELECT id, array_cosine_similarity(embedding, embed_text(?, ?)) AS score FROM texts "
            "WHERE model = ? ORDER BY id",
            [model, "hello", model],
        ).to_pylist()
        q = embed(model, "text", "hello")
        assert [r["score"] for r in rows] == pytest.approx([cosine(v, q) for v in own], abs=1e-6)


def test_embed_functions_cache_and_pass_modality(mixed):
    root, _, _ = mixed
    calls = []
    con = connect(root, embedder=fake_embedder(calls))
    run_readonly(con, "SELECT array_cosine_similarity(embedding, embed_text(model, 'x')) FROM texts")
    run_readonly(con, "SELECT embed_image('clip', '/q.png'), embed_audio('clip', '/q.wav'), embed_text('clip', 'x')")
    assert sorted(calls) == [
        ("clip", "audio", "/q.wav"),
        ("clip", "image", "/q.png"),
        ("clip", "text", "x"),
        ("minilm", "text", "x"),
    ]


def test_embed_functions_name_the_problem(mixed):
    root, _, _ = mixed
    con = connect(root, embedder=lambda model, modality, text: np.ones(5, np.float32))
    with pytest.raises(QueryError, match="model 'nope' has no embeddings"):
        run_readonly(con, "SELECT embed_text('nope', 'x')")
    with pytest.raises(QueryError, match=r"shape \(5,\) for model 'clip'"):
        run_readonly(con, "SELECT embed_text('clip', 'x')")


def test_newest_row_per_id_and_model(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    old, new, other = tables.unit(rng, 3, 4)
    commit(
        store,
        "job1",
        ("image", "a", tables.embeddings(["x", "y"], [old, old], minute=1)),
        ("image", "b", tables.embeddings(["x"], [other], minute=1)),
    )
    commit(store, "job2", ("image", "a", tables.embeddings(["x"], [new], job="job2", minute=2, version=1)))
    commit(store, "job3", ("image", "a", tables.embeddings(["x"], [old], job="job3", minute=2, source="elsewhere")))
    rows = run_readonly(
        connect(str(tmp_path)),
        "SELECT source, id, model, job_id, content_hash, embedding FROM images ORDER BY source, id, model",
    ).to_pylist()
    assert [(r["source"], r["id"], r["model"], r["job_id"]) for r in rows] == [
        ("elsewhere", "x", "a", "job3"),
        ("src", "x", "a", "job2"),
        ("src", "x", "b", "job1"),
        ("src", "y", "a", "job1"),
    ]
    assert rows[1]["content_hash"] == tables.content_hash("x", version=1)
    np.testing.assert_array_equal(rows[1]["embedding"], new)
    np.testing.assert_array_equal(rows[2]["embedding"], other)


def test_only_committed_files_are_visible(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    commit(store, "job1", ("text", "m", tables.embeddings(["a"], tables.unit(rng, 1, 4))))
    store.write_embeddings("text", "m", tables.embeddings(["b"], tables.unit(rng, 1, 4), job="job2"))
    store.write_errors("text", tables.errors(["c"], job="job2"))
    (tmp_path / "embeddings/modality=text/model=m/job2-x.parquet.1.tmp").write_bytes(b"PAR1")
    con = connect(str(tmp_path))
    assert con.sql("SELECT id FROM texts").fetchall() == [("a",)]
    assert con.sql("SELECT count(*) FROM errors").fetchone() == (0,)


def test_errors_view(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    commit(
        store,
        "job1",
        ("image", None, tables.errors(["bad.png", "fixed.png"], minute=1)),
        ("audio", None, tables.errors(["bad.wav"], minute=1, model="w")),
    )
    commit(
        store,
        "job2",
        ("image", None, tables.errors(["bad.png"], job="job2", minute=2)),
        ("image", "m", tables.embeddings(["fixed.png"], tables.unit(rng, 1, 4), job="job2", minute=2, version=1)),
        ("image", "other", tables.embeddings(["bad.png"], tables.unit(rng, 1, 4), job="job2", minute=3)),
    )
    rows = run_readonly(
        connect(str(tmp_path)), "SELECT modality, id, model, job_id, stage FROM errors ORDER BY id"
    ).to_pylist()
    # bad.png: the newest of its two errors; fixed.png: superseded by its later embedding; an embedding by another model changes nothing
    assert rows == [
        {"modality": "image", "id": "bad.png", "model": "m", "job_id": "job2", "stage": "preprocess"},
        {"modality": "audio", "id": "bad.wav", "model": "w", "job_id": "job1", "stage": "preprocess"},
    ]


def test_jobs_view(tmp_path):
    store = Store(str(tmp_path))
    store.write_job(
        {
            "job_id": "j2",
            "started_at": "2025-01-02T00:00:00+00:00",
            "status": "ok",
            "counts": {"image/m": {"embedded": 3}},
        }
    )
    store.write_job({"job_id": "j1", "started_at": "2025-01-01T00:00:00+00:00", "status": "failed", "error": "boom"})
    con = connect(str(tmp_path))
    rows = run_readonly(
        con, "SELECT job_id, status, error, counts->>'$.\"image/m\".embedded' AS n FROM jobs ORDER BY started_at"
    ).to_pylist()
    assert rows == [
        {"job_id": "j1", "status": "failed", "error": "boom", "n": None},
        {"job_id": "j2", "status": "ok", "error": None, "n": "3"},
    ]


def test_empty_store_gives_empty_views(tmp_path):
    con = connect(str(tmp_path), embedder=lambda *a: np.ones(3, np.float32))
    for view in ("embeddings", "images", "audio", "texts", "errors", "jobs"):
        assert run_readonly(con, f"SELECT count(*) AS n FROM {view}").to_pylist() == [{"n": 0}], view
    assert {"id", "embedding", "modality", "model", "dim"} <= set(column_types(con, "images"))
    assert {"id", "stage", "modality"} <= set(column_types(con, "errors"))
    assert (
        run_readonly(con, "SELECT array_cosine_similarity(embedding, embed_text('m', 'x')) FROM images").num_rows == 0
    )
    with pytest.raises(QueryError, match="model 'm' has no embeddings"):
        run_readonly(con, "SELECT embed_text('m', 'x')")


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(QueryError, match=f"no store at {tmp_path}/nope"):
        connect(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1 AS a",
        "WITH t AS (SELECT 1 AS a) SELECT * FROM t",
        "DESCRIBE images",
        "SHOW TABLES",
        "EXPLAIN SELECT * FROM images",
        "EXPLAIN ANALYZE SELECT 1",
        "SUMMARIZE SELECT 1 AS a",
    ],
)
def test_run_readonly_accepts_reads(tmp_path, sql):
    assert run_readonly(connect(str(tmp_path)), sql).num_rows >= 1


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (1)",
        "COPY (SELECT 1) TO '{out}'",
        "CREATE TABLE t2 AS SELECT 1",
        "CREATE VIEW v AS SELECT 1",
        "ATTACH '{out}' AS other",
        "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'",
        "DROP VIEW images",
        "SET threads = 1",
        "SELECT 1; INSERT INTO t VALUES (1)",
        "INSTALL vss",
        "CALL pragma_version()",
    ],
)
def test_run_readonly_refuses_everything_else(tmp_path, sql):
    con = connect(str(tmp_path))
    con.execute("CREATE TABLE t (a INTEGER)")
    out = tmp_path / "out.file"
    with pytest.raises(ReadOnlyError):
        run_readonly(con, sql.format(out=out))
    assert con.sql("SELECT count(*) FROM t").fetchone() == (0,)
    assert not out.exists()
    assert con.sql("SELECT count(*) FROM duckdb_views() WHERE view_name IN ('v', 'images')").fetchone() == (1,)


def test_run_readonly_parameters_and_errors(mixed):
    root, _, _ = mixed
    con = connect(root)
    assert run_readonly(con, "SELECT count(*) AS n FROM images WHERE lang = ?", ["en"]).to_pylist() == [{"n": 5}]
    with pytest.raises(QueryError, match="imagez"):
        run_readonly(con, "SELECT * FROM imagez")
    with pytest.raises(QueryError, match="syntax error"):
        run_readonly(con, "SELEC 1")


def sql_cli(capsys, root, statement, *extra) -> tuple[int, str, str]:
    from jobs.cli import main

    capsys.readouterr()
    code = main(["sql", root, statement, "--json", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "statement,message",
    [
        ("SELECT * FROM read_text('/etc/hostname')", 'Cannot access file "/etc/hostname"'),
        ("SELECT * FROM read_csv('/etc/passwd')", 'Cannot access file "/etc/passwd"'),
        ("SELECT count(*) FROM glob('/etc/*')", 'Cannot access file "/etc/*"'),
        ("SELECT * FROM read_blob('/etc/hostname')", "Cannot access file"),
        ("SELECT * FROM 'ROOT/_commits/job1-000001.json'", "Cannot access file"),
        ("SELECT * FROM read_parquet('ROOT/embeddings/**/*.parquet')", "Cannot access file"),
        ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "Cannot access file"),
        ("SELECT * FROM parquet_metadata('ROOT/embeddings/**/*.parquet')", "Cannot access file"),
        ("SELECT * FROM duckdb_extensions()", "Cannot access directory"),
        ("SELECT st_point(1, 2)", "exists in the spatial extension"),
        ("FROM query('SET enable_external_access = true')", "Expected a single SELECT statement"),
        ("SET enable_external_access = true", "only SELECT"),
        ("SELECT * FROM images WHERE no_such_column = 1", 'Referenced column "no_such_column" not found'),
    ],
)
def test_sql_reads_only_the_store_and_each_refusal_is_one_line(mixed, capsys, statement, message):
    """A SELECT could read any file or URL (read_text('/etc/...'), read_csv, glob), and DuckDB's Python build
    installs and loads extensions from the network on demand."""
    root, _, _ = mixed
    code, out, err = sql_cli(capsys, root, statement.replace("ROOT", root))
    assert code == 1 and out == "", out
    assert len(err.strip().splitlines()) == 1 and err.startswith("mmembed: error: ") and message in err, err
    assert "LINE 1" not in err


def test_the_locked_connection_still_reads_the_store_and_embeds_files(mixed, tmp_path):
    root, images, _ = mixed
    calls = []
    con = connect(root, embedder=fake_embedder(calls))
    settings = dict(
        con.sql(
            "SELECT name, value FROM duckdb_settings() WHERE name IN ('enable_external_access', "
            "'autoinstall_known_extensions', 'autoload_known_extensions', 'lock_configuration')"
        ).fetchall()
    )
    assert settings == dict.fromkeys(settings, "false") | {"lock_configuration": "true"} and len(settings) == 4
    assert run_readonly(con, "SELECT count(*) AS n FROM images").to_pylist() == [{"n": len(images)}]
    run_readonly(con, "SELECT embed_image('clip', ?) AS e", [str(tmp_path / "query.png")])
    assert calls == [("clip", "image", str(tmp_path / "query.png"))], "embed_image reads the file the user names"


def test_params_bind_the_placeholders_of_sql(mixed, capsys):
    root, _, _ = mixed
    code, out, err = sql_cli(
        capsys,
        root,
        "SELECT count(*) AS n FROM images WHERE lang = $lang AND dim = $dim",
        "--param",
        "lang=en",
        "--param",
        "dim=6",
    )
    assert code == 0 and json.loads(out) == [{"n": 5}], err
    code, _, err = sql_cli(capsys, root, "SELECT count(*) AS n FROM images WHERE lang = $lang")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "lang" in err
    with pytest.raises(SystemExit):
        sql_cli(capsys, root, "SELECT 1", "--param", "no-equals")
    assert "expected NAME=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "where,message",
    [
        ("1=1) OR (1=1", "a ')' closes nothing"),  # once escaped the parentheses put around it
        ("lang = 'en')--", "a ')' closes nothing"),
        ("(lang = 'en'", "a '(' is never closed"),
        ("1=1; SELECT 1", "';' ends a statement"),
        ("", "empty"),
        ("no_such_column = 1", 'Referenced column "no_such_column" not found'),
        ("lang = ", "syntax error"),
        ("id IN (SELECT * FROM read_csv('/etc/passwd'))", 'Cannot access file "/etc/passwd"'),
    ],
)
def test_a_where_predicate_is_one_expression_and_its_error_one_line(mixed, where, message):
    from storage.search import search

    root, _, _ = mixed
    with pytest.raises(QueryError) as e:
        search(root, np.ones(6, np.float32), "image", "clip", where=where)
    text = str(e.value)
    assert "\n" not in text and message in text and "LINE" not in text, text
    assert text.startswith(f"bad predicate {where!r}: "), text


def test_where_predicates_take_comments_parentheses_and_params(mixed):
    from storage.search import search

    root, _, _ = mixed
    query = np.ones(6, np.float32)
    where = "(lang = $lang OR lang = ')(')  -- the ')(' is a string"
    assert search(root, query, "image", "clip", k=10, where=where, params={"lang": "de"}).num_rows == 2
    assert search(root, query, "image", "clip", k=10, where="lang IN ('en', 'fr')").num_rows == 6
