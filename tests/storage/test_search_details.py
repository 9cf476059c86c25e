"""storage.search for the search page (jobs/serve): searches with details (source and passthrough columns, always
exact), and a stored row's vector."""

import numpy as np
import pytest

from storage import index
from storage.search import build_index, search, stored_vector
from storage.store import Store


@pytest.fixture
def store(tmp_path, tables, rng):
    """The same ids in two sources (text, model m, dim 8), with passthrough `lang` and `rank`."""
    store = Store(str(tmp_path))
    vectors = tables.unit(rng, 20, 8)
    ids = [f"doc{i:02d}" for i in range(10)]
    shards = [
        store.write_embeddings(
            "text",
            "m",
            tables.embeddings(ids, vectors[a : a + 10], source=src, lang=[src] * 10, rank=list(range(a, a + 10))),
        )
        for a, src in ((0, "a"), (10, "b"))
    ]
    store.commit("job1", shards)
    return store, vectors


def test_details_add_source_and_passthrough_columns(store):
    store, vectors = store
    plain = search(store.root, vectors[13], "text", "m", k=4, use_index=False)
    got = search(store.root, vectors[13], "text", "m", k=4, details=True)
    assert got.column_names == ["id", "uri", "modality", "model", "score", "source", "columns"]
    assert got.select(plain.column_names).equals(plain)
    first = got.slice(0, 1).to_pylist()[0]
    assert (first["id"], first["source"], first["columns"]) == ("doc03", "b", {"lang": "b", "rank": 13})
    assert [c["lang"] for c in got["columns"].to_pylist()] == got["source"].to_pylist()


def test_details_without_passthrough_columns_is_an_empty_struct(tmp_path, tables, rng):
    store = Store(str(tmp_path))
    store.commit("job1", [store.write_embeddings("image", "m", tables.embeddings(["x", "y"], tables.unit(rng, 2, 4)))])
    got = search(store.root, np.ones(4, np.float32), "image", "m", k=2, details=True)
    assert got["columns"].to_pylist() == [{}, {}] and got["source"].to_pylist() == ["src", "src"]


def test_details_search_exactly_even_with_a_fresh_index(store, monkeypatch):
    store, vectors = store
    build_index(store.root)
    monkeypatch.setattr(index.Index, "search", lambda *a, **k: pytest.fail("an index answered a details search"))
    assert search(store.root, vectors[0], "text", "m", k=1, details=True)["id"].to_pylist() == ["doc00"]


def test_stored_vector_is_the_rows_unit_vector(store):
    store, vectors = store
    np.testing.assert_allclose(stored_vector(store.root, "text", "m", "b", "doc04"), vectors[14], atol=1e-6)
    assert stored_vector(store.root, "text", "m", "c", "doc04") is None
