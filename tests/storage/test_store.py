import json
import os
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.schema import SchemaError
from storage.store import Store, StoreError


def test_write_commit_read_back(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    vectors = tables.unit(rng, 5, 8)
    first = tables.embeddings(["a", "b", "c"], vectors[:3], lang=["en", "de", "fr"])
    second = tables.embeddings(["d", "e"], vectors[3:], lang=["en", "en"])
    files = [store.write_embeddings("image", "clip", t) for t in (first, second)]
    assert all(f.startswith("embeddings/modality=image/model=clip/job1-") and f.endswith(".parquet") for f in files)
    assert store.committed_files("embeddings") == []
    record = store.commit("job1", files, {"rows": 5})
    assert record == "_commits/job1-000001.json"
    committed = store.committed_files("embeddings")
    assert committed == sorted(f"{tmp_path}/{f}" for f in files)
    back = pa.concat_tables([pq.read_table(p) for p in committed]).sort_by("id")
    assert back.equals(pa.concat_tables([first, second]))
    assert json.loads((tmp_path / record).read_text())["stats"] == {"rows": 5}


def test_commit_sequence_per_job(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    write = lambda job: store.write_embeddings("text", "m", tables.embeddings(["a"], tables.unit(rng, 1, 4), job=job))  # noqa: E731
    assert store.commit("job1", [write("job1")]) == "_commits/job1-000001.json"
    assert store.commit("job2", [write("job2")]) == "_commits/job2-000001.json"
    assert store.commit("job1", [write("job1")]) == "_commits/job1-000002.json"
    assert Store(str(tmp_path)).commit("job1", []) == "_commits/job1-000003.json"
    assert len(store.committed_files("embeddings")) == 3


def test_uncommitted_and_temporary_files_are_invisible_then_cleaned(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    kept = store.write_embeddings("image", "clip", tables.embeddings(["a"], tables.unit(rng, 1, 4)))
    kept_error = store.write_errors("image", tables.errors(["bad"]))
    store.commit("job1", [kept, kept_error])
    orphan = store.write_embeddings("image", "clip", tables.embeddings(["b"], tables.unit(rng, 1, 4), job="job2"))
    orphan_error = store.write_errors("audio", tables.errors(["worse"], job="job2"))
    half = tmp_path / "embeddings/modality=image/model=clip/job2-x.parquet.123.tmp"
    half.write_bytes(b"PAR1 half a file")
    commit_tmp = tmp_path / "_commits/job2-000001.json.456.tmp"
    commit_tmp.write_text("{")
    assert store.committed_files("embeddings") == [f"{tmp_path}/{kept}"]
    assert store.committed_files("errors") == [f"{tmp_path}/{kept_error}"]

    assert store.clean_uncommitted() == 4
    assert not (tmp_path / orphan).exists() and not (tmp_path / orphan_error).exists()
    assert not half.exists() and not commit_tmp.exists()
    assert (tmp_path / kept).exists() and (tmp_path / kept_error).exists()
    assert store.clean_uncommitted() == 0


def test_no_temporary_file_is_left_after_a_write(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    rel = store.write_embeddings("text", "m", tables.embeddings(["a"], tables.unit(rng, 1, 4)))
    assert os.listdir(tmp_path / rel.rsplit("/", 1)[0]) == [rel.rsplit("/", 1)[1]]


def test_commit_refuses_missing_or_foreign_files(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    with pytest.raises(StoreError, match="no such file"):
        store.commit("job1", ["embeddings/modality=image/model=m/job1-nope.parquet"])
    with pytest.raises(StoreError, match="not a data file path"):
        store.commit("job1", ["../elsewhere.parquet"])
    with pytest.raises(StoreError, match="job name"):
        store.commit("../job", [])
    assert store.committed_files("embeddings") == []


def test_writes_check_names_and_tables(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    table = tables.embeddings(["a"], tables.unit(rng, 1, 4))
    with pytest.raises(StoreError, match="modality"):
        store.write_embeddings("video", "m", table)
    with pytest.raises(StoreError, match="model name"):
        store.write_embeddings("image", "a/b", table)
    with pytest.raises(SchemaError, match="no 'source' column"):
        store.write_embeddings("image", "m", table.drop_columns(["source"]))
    with pytest.raises(SchemaError, match="'embedding'"):
        store.write_embeddings("image", "m", table.set_column(4, "embedding", pa.array([[1.0, 2.0]])))
    two_jobs = pa.concat_tables([table, tables.embeddings(["b"], tables.unit(rng, 1, 4), job="job2")])
    with pytest.raises(StoreError, match="exactly one job"):
        store.write_embeddings("image", "m", two_jobs)
    with pytest.raises(SchemaError, match="'stage'"):
        store.write_errors("image", tables.errors(["x"]).drop_columns(["stage"]))


def test_store_pickles_as_its_root(tmp_path, tables, rng):
    store = Store(str(tmp_path / "sub" / ".." / "root"))
    assert store.root == str(tmp_path / "root")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.root == store.root
    rel = copy.write_embeddings("audio", "w", tables.embeddings(["a"], tables.unit(rng, 1, 4)))
    store.commit("job1", [rel])
    assert copy.committed_files("embeddings") == [f"{store.root}/{rel}"]


def test_file_uri_root(tmp_path, tables, rng):
    store = Store(f"file://{tmp_path}/")
    rel = store.write_embeddings("text", "m", tables.embeddings(["a"], tables.unit(rng, 1, 4)))
    store.commit("job1", [rel])
    assert store.committed_files("embeddings") == [f"file://{tmp_path}/{rel}"]
    assert (tmp_path / rel).exists()


def test_done_keys(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    h = tables.content_hash
    committed = store.write_embeddings("image", "clip", tables.embeddings(["a", "b"], tables.unit(rng, 2, 4)))
    other_model = store.write_embeddings("image", "vit", tables.embeddings(["c"], tables.unit(rng, 1, 4)))
    store.commit("job1", [committed, other_model])
    store.write_embeddings(
        "image", "clip", tables.embeddings(["d"], tables.unit(rng, 1, 4), job="job2")
    )  # never committed
    query = [h("a"), h("c"), h("d"), h("b"), h("a", version=1)]
    assert store.done_keys("clip", query).tolist() == [True, False, False, True, False]
    assert store.done_keys("clip", pa.array(query)).tolist() == [True, False, False, True, False]
    assert store.done_keys("vit", pa.chunked_array([query[:2], query[2:]])).tolist() == [
        False,
        True,
        False,
        False,
        False,
    ]
    assert store.done_keys("nobody", query).tolist() == [False] * 5
    assert store.done_keys("clip", []).tolist() == []


def test_done_keys_spans_modalities_and_passthrough_schemas(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    h = tables.content_hash
    files = [
        store.write_embeddings("image", "clip", tables.embeddings(["a"], tables.unit(rng, 1, 4), lang=["en"])),
        store.write_embeddings("text", "clip", tables.embeddings(["t"], tables.unit(rng, 1, 4), rank=[3])),
    ]
    store.commit("job1", files)
    assert store.done_keys("clip", [h("t"), h("a"), h("x")]).tolist() == [True, True, False]


def test_job_records(tmp_path):
    store = Store(str(tmp_path))
    assert store.jobs() == []
    late = {"job_id": "job-b", "started_at": "2025-01-02T00:00:00+00:00", "status": "running", "counts": {"image": 3}}
    early = {"job_id": "job-a", "started_at": "2025-01-01T00:00:00+00:00", "status": "ok"}
    store.write_job(late)
    store.write_job(early)
    store.write_job(late | {"status": "ok"})
    assert store.jobs() == [early, late | {"status": "ok"}]
    assert sorted(os.listdir(tmp_path / "_jobs")) == ["job-a.json", "job-b.json"]
    with pytest.raises(StoreError, match="started_at"):
        store.write_job({"job_id": "job-c"})
    with pytest.raises(StoreError, match="not plain JSON"):
        store.write_job({"job_id": "job-c", "started_at": "2025", "when": object()})


def test_a_root_that_cannot_be_reached_is_a_clear_error():
    """An object store that refuses (no access, no such bucket) raised pyarrow's OSError through every command."""

    class Refusing:
        def get_file_info(self, path):
            raise OSError("When getting information for key 'store' in bucket 'b': AWS Error ACCESS_DENIED\nmore")

    store = Store("s3://b/store")
    store.__dict__["_fs"] = (Refusing(), "b/store")
    with pytest.raises(StoreError, match=r"^cannot reach the store s3://b/store: .*ACCESS_DENIED$"):
        store.exists()
