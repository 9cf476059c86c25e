import numpy as np
import pytest

from encoders.model import softmax_scores
from storage.query import QueryError
from storage.search import classify, search
from storage.store import Store


def brute_force(vectors, ids, query, k):
    scores = vectors @ query / np.linalg.norm(vectors, axis=1) / np.linalg.norm(query)
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], i))[:k]
    return [ids[i] for i in order], scores[order]


@pytest.fixture
def store(tmp_path, tables, rng):
    """300 text rows by model m (dim 16) in three shards over two commits, with passthrough `lang`, `rank`."""
    store = Store(str(tmp_path))
    vectors = tables.unit(rng, 300, 16) * rng.uniform(0.5, 2, (300, 1)).astype(np.float32)  # not all unit length
    ids = [f"doc{i:03d}" for i in range(300)]
    langs = [["en", "de", "fr"][i % 3] for i in range(300)]
    shards = [
        store.write_embeddings(
            "text", "m", tables.embeddings(ids[a:b], vectors[a:b], lang=langs[a:b], rank=list(range(a, b)))
        )
        for a, b in ((0, 100), (100, 250), (250, 300))
    ]
    store.commit("job1", shards[:2])
    store.commit("job1", shards[2:])
    return store, ids, vectors, langs


def test_search_equals_brute_force(store, rng):
    store, ids, vectors, _ = store
    for _ in range(3):
        query = rng.standard_normal(16).astype(np.float32)
        got = search(store.root, query, "text", "m", k=10)
        assert got.column_names == ["id", "uri", "modality", "model", "score"]
        want_ids, want_scores = brute_force(vectors, ids, query, 10)
        assert got["id"].to_pylist() == want_ids
        np.testing.assert_allclose(got["score"].to_numpy(), want_scores, atol=1e-5)
        assert got["uri"].to_pylist() == [f"file:///src/{i}" for i in want_ids]
        assert set(got["modality"].to_pylist()) == {"text"} and set(got["model"].to_pylist()) == {"m"}


def test_the_float16_first_pass_finds_the_exact_top_k(tmp_path, tables, rng, monkeypatch):
    """Large partitions are scanned in float16 first; near-ties at the k-th place must not change the result."""
    monkeypatch.setattr("storage.search.HALF_ROWS", 1)
    store = Store(str(tmp_path))
    vectors = tables.unit(rng, 2000, 32)
    query = vectors[0] + 0.3 * tables.unit(rng, 1, 32)[0]
    # rows around the 10th best score whose scores differ by less than float16 can tell apart (but float32 can)
    near = np.argsort(-(vectors @ query))[5:15]
    vectors[near] = vectors[near[0]] + 3e-3 * tables.unit(rng, len(near), 32)
    ids = [f"v{i:04d}" for i in range(len(vectors))]
    store.commit("job1", [store.write_embeddings("image", "m", tables.embeddings(ids, vectors))])
    for q in (query, vectors[near[0]], tables.unit(rng, 1, 32)[0]):
        got = search(store.root, q, "image", "m", k=10)
        want_ids, want_scores = brute_force(vectors, ids, q, 10)
        assert got["id"].to_pylist() == want_ids
        np.testing.assert_allclose(got["score"].to_numpy(), want_scores, atol=1e-6)
    from storage.search import _PARTITIONS

    assert _PARTITIONS[(store.root, "image", "m")].half is not None, "the float16 pass ran"


def test_k_larger_than_the_partition(store, rng):
    store, ids, vectors, _ = store
    query = rng.standard_normal(16).astype(np.float32)
    got = search(store.root, query, "text", "m", k=1000)
    assert got["id"].to_pylist() == brute_force(vectors, ids, query, 1000)[0]


def test_where_filters_on_passthrough_columns(store, rng):
    store, ids, vectors, langs = store
    query = rng.standard_normal(16).astype(np.float32)
    got = search(store.root, query, "text", "m", k=5, where="lang = ? AND rank >= ?", params=["de", 150])
    keep = [i for i, lang in enumerate(langs) if lang == "de" and i >= 150]
    want_ids, want_scores = brute_force(vectors[keep], [ids[i] for i in keep], query, 5)
    assert got["id"].to_pylist() == want_ids
    np.testing.assert_allclose(got["score"].to_numpy(), want_scores, atol=1e-5)
    assert search(store.root, query, "text", "m", where="lang = 'xx'").num_rows == 0
    with pytest.raises(QueryError, match="bad predicate"):
        search(store.root, query, "text", "m", where="no_such_column = 1")
    with pytest.raises(QueryError):
        search(store.root, query, "text", "m", where="1 = 1); DROP TABLE candidates; SELECT (1")


def test_a_new_commit_invalidates_the_cache(store, tables, rng):
    store, _ids, vectors, _ = store
    query = vectors[7].copy()
    assert search(store.root, query, "text", "m", k=1)["id"].to_pylist() == ["doc007"]
    newer = tables.unit(rng, 2, 16)
    newer[1] = query  # a new row identical to the query
    rel = store.write_embeddings(
        "text", "m", tables.embeddings(["doc007", "new"], newer, job="job2", minute=5, version=1)
    )
    assert search(store.root, query, "text", "m", k=1)["id"].to_pylist() == ["doc007"], "uncommitted rows are invisible"
    store.commit("job2", [rel])
    got = search(store.root, query, "text", "m", k=2)
    assert got["id"].to_pylist()[0] == "new"
    assert "doc007" not in got["id"].to_pylist(), "the re-embedded row superseded the old one"
    assert search(store.root, query, "text", "m", k=1000).num_rows == 301


def test_search_names_the_problem(store):
    store, _, _, _ = store
    with pytest.raises(QueryError, match="no embeddings for modality=image model=m"):
        search(store.root, np.ones(16), "image", "m")
    with pytest.raises(QueryError, match=r"shape \(8,\), but model 'm' has dim 16"):
        search(store.root, np.ones(8), "text", "m")
    with pytest.raises(QueryError, match="zero"):
        search(store.root, np.zeros(16), "text", "m")
    with pytest.raises(QueryError, match="k must be from 1 to"):
        search(store.root, np.ones(16), "text", "m", k=0)
    with pytest.raises(QueryError, match="no store at"):
        search(store.root + "/missing", np.ones(16), "text", "m")


def softmax_50(cosines):
    return softmax_scores(cosines, 50.0)


def test_classify_is_clips_zero_shot_softmax(store, rng, monkeypatch):
    store, ids, vectors, langs = store
    labels = ["alpha", "beta", "gamma"]
    label_vectors = rng.standard_normal((3, 16)).astype(np.float32) * [[1.0], [3.0], [0.5]]  # norms do not matter
    monkeypatch.setattr("storage.search.CLASSIFY_CHUNK", 64)  # several chunks over the 300 rows
    got = classify(store.root, label_vectors, labels, "text", "m", score=softmax_50)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    logits = 50.0 * unit(vectors) @ unit(label_vectors).T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert got.column_names == ["id", "uri", "label", "cosine", "probability"]
    assert sorted(got["id"].to_pylist()) == ids
    row = {i: r for r, i in enumerate(ids)}
    order = [row[i] for i in got["id"].to_pylist()]
    assert got["label"].to_pylist() == [labels[i] for i in p[order].argmax(1)]
    np.testing.assert_allclose(got["probability"].to_numpy(), p[order].max(1), rtol=1e-5)
    cosines = (unit(vectors) @ unit(label_vectors).T)[order]
    np.testing.assert_allclose(got["cosine"].to_numpy(), cosines.max(1), rtol=1e-5)
    assert len(set(got["label"].to_pylist())) > 1
    sigmoid = classify(store.root, label_vectors, labels, "text", "m", score=lambda c: 1 / (1 + np.exp(-10 * c + 2)))
    np.testing.assert_allclose(sigmoid["probability"].to_numpy(), 1 / (1 + np.exp(-10 * cosines.max(1) + 2)), rtol=1e-5)

    de = classify(store.root, label_vectors, labels, "text", "m", score=softmax_50, where="lang = ?", params=["de"])
    keep = {i for i, lang in zip(ids, langs) if lang == "de"}
    assert sorted(de["id"].to_pylist()) == sorted(keep)
    assert de["label"].to_pylist() == [labels[i] for i in p[[row[i] for i in de["id"].to_pylist()]].argmax(1)]
    with pytest.raises(QueryError, match="one vector per label"):
        classify(store.root, label_vectors[:2], labels, "text", "m", score=softmax_50)
    with pytest.raises(QueryError, match="dim 8, but model 'm' has dim 16"):
        classify(store.root, label_vectors[:, :8], labels, "text", "m", score=softmax_50)


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (200, 10), (7, 10)])
def test_top_k_breaks_ties_by_row(rng, n, k):
    from storage.search import _top_k

    for _ in range(20):
        scores = rng.standard_normal(n).astype(np.float32)
        scores[rng.integers(0, n, n // 2)] = 0.5  # many exact ties, some across the k-th place
        assert _top_k(scores, k).tolist() == sorted(range(n), key=lambda i: (-scores[i], i))[:k]
