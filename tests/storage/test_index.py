import duckdb
import numpy as np
import pytest

from storage import index
from storage.query import QueryError
from storage.search import build_index, search
from storage.store import Store, StoreError


def clustered(rng, n, dim, clusters=12):
    """Unit vectors around a few centres, shaped like real embeddings (HNSW's worst case is uniform noise)."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    v = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path, tables, rng):
    """400 image rows by model m (dim 32) over two commits; the second re-embeds doc000..doc049 with new content."""
    store = Store(str(tmp_path))
    vectors = clustered(rng, 400, 32)
    ids = [f"doc{i:03d}" for i in range(400)]
    store.commit("job1", [store.write_embeddings("image", "m", tables.embeddings(ids, vectors))])
    vectors[:50] = clustered(rng, 50, 32)
    store.commit(
        "job2",
        [
            store.write_embeddings(
                "image", "m", tables.embeddings(ids[:50], vectors[:50], job="job2", minute=1, version=1)
            )
        ],
    )
    return store, ids, vectors


def files(store):
    return store.partitions("embeddings")[("image", "m")]


def test_a_fresh_index_answers_search_with_the_hnsw_scan(store, rng, monkeypatch):
    store, _ids, vectors = store
    built = build_index(store.root)
    assert [{k: v for k, v in b.items() if k != "seconds"} for b in built] == [
        {"modality": "image", "model": "m", "rows": 400, "status": "built"}
    ]
    hnsw = index.fresh(store, "image", "m", files(store))
    assert hnsw is not None and hnsw.rows == 400, "the newest row per id only"
    plan = hnsw.con.execute("EXPLAIN " + hnsw.sql(10), [[0.0] * 32]).fetchall()[0][1]
    assert "HNSW_INDEX_SCAN" in plan
    with pytest.raises(duckdb.Error, match="disabled by configuration"):  # the attached file reads, nothing else
        hnsw.con.execute("SELECT * FROM read_text('/etc/hostname')")

    exact = [search(store.root, q, "image", "m", k=10, use_index=False) for q in vectors[:20:2]]
    monkeypatch.setattr(
        "storage.search._partition", lambda *a: pytest.fail("a fresh index must not load the partition")
    )
    found = 0
    for q, want in zip(vectors[:20:2], exact):
        got = search(store.root, q * 3, "image", "m", k=10)
        assert got.column_names == ["id", "uri", "modality", "model", "score"]
        assert got["id"][0].as_py() == want["id"][0].as_py() and got["score"][0].as_py() == pytest.approx(1.0, abs=1e-5)
        scores = dict(zip(want["id"].to_pylist(), want["score"].to_pylist()))
        for i, s in zip(got["id"].to_pylist(), got["score"].to_pylist()):
            if i in scores:
                found += 1
                assert s == pytest.approx(scores[i], abs=1e-5)
        assert got["uri"].to_pylist() == [f"file:///src/{i}" for i in got["id"].to_pylist()]
    assert found / 100 >= 0.95, f"recall@10 {found / 100}"
    assert len(search(store.root, vectors[0], "image", "m", k=1000)) == 400


def test_a_later_commit_makes_the_index_stale_until_rebuilt(store, tables, rng):
    store, _ids, _vectors = store
    build_index(store.root)
    new = clustered(rng, 1, 32)
    store.commit("job3", [store.write_embeddings("image", "m", tables.embeddings(["late"], new, job="job3", minute=2))])
    assert index.state(store, "image", "m", files(store)) == "stale"
    assert search(store.root, new[0], "image", "m", k=1)["id"].to_pylist() == ["late"], "a stale index is not used"
    assert [r["status"] for r in build_index(store.root)] == ["built"]
    assert index.state(store, "image", "m", files(store)) == "fresh"
    assert [r["status"] for r in build_index(store.root)] == ["fresh"]
    assert [r["status"] for r in build_index(store.root, options={"M": 8})] == ["built"], "new options rebuild"
    assert index.fresh(store, "image", "m", files(store)).options == {"M": 8, "ef_construction": 128}
    assert search(store.root, new[0], "image", "m", k=1, ef_search=200)["id"].to_pylist() == ["late"]


def test_where_and_use_index_false_search_exactly(store, monkeypatch):
    store, _ids, vectors = store
    build_index(store.root)
    monkeypatch.setattr(index.Index, "search", lambda *a: pytest.fail("the index was used"))
    assert search(store.root, vectors[7], "image", "m", k=1, use_index=False)["id"].to_pylist() == ["doc007"]
    assert search(store.root, vectors[7], "image", "m", k=1, where="id <> 'doc007'")["id"][0].as_py() != "doc007"


def test_a_failed_build_leaves_no_file_and_the_next_cleans_leftovers(store, monkeypatch):
    store, *_ = store
    path = index.index_path(store, "image", "m")
    path.parent.mkdir(parents=True)
    (path.parent / f"{path.name}.dead{index.TMP_SUFFIX}").write_bytes(b"a killed build")
    monkeypatch.setattr("storage.index.os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        build_index(store.root)
    assert list(path.parent.iterdir()) == [], "neither the leftover nor the failed build's file remains"
    assert index.state(store, "image", "m", files(store)) == "none"
    monkeypatch.undo()
    build_index(store.root)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_index_errors_name_the_problem(store, tmp_path):
    store, *_ = store
    with pytest.raises(QueryError, match="no embeddings for modality=audio"):
        build_index(store.root, modality="audio")
    for bad in ({"M": 1}, {"ef_construction": 0}, {"M": 2**31}):  # M = 1 was a traceback from inside vss
        with pytest.raises(StoreError, match="must be integers from 2"):
            build_index(store.root, options=bad)
    with pytest.raises(StoreError, match="unknown HNSW options"):
        build_index(store.root, options={"ef": 3})
    for ef_search in (0, 10**20):  # 10**20 was a traceback from inside DuckDB
        with pytest.raises(QueryError, match="ef_search must be from 1 to"):
            search(store.root, np.ones(32), "image", "m", ef_search=ef_search)
    for k in (0, 10**20):  # so was k = 10**20 through a fresh index (its LIMIT)
        with pytest.raises(QueryError, match="k must be from 1 to"):
            search(store.root, np.ones(32), "image", "m", k=k)
    with pytest.raises(StoreError, match="not a local store"):
        index.index_path(Store("s3://bucket/store"), "image", "m")
    assert index.state(Store("s3://bucket/store"), "image", "m", ()) == "none"
    path = index.index_path(store, "image", "m")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a database")
    with pytest.raises(StoreError, match="rebuild it with `mmembed index --force`"):
        search(store.root, np.ones(32), "image", "m")
