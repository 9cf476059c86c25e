"""The JSON API over HTTP, against a server on a free loopback port: searches by text, file and item; items, media,
thumbnails and stats; errors as JSON; the limits; /media refusing anything but a stored item's own file."""

from __future__ import annotations

import io
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from jobs import api
from jobs.samples import SAMPLE_DIR
from jobs.serve.app import Limits, background, create_app

LIMITS = Limits(body_bytes=2 * 1024 * 1024, k=50, text_chars=300, where_chars=300)


def _tree(root: str) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(root).rglob("*"))}


@pytest.fixture(scope="module")
def server(demo_store):
    """The demo store served on a free loopback port: (base URL ending in /, root, the store's files before)."""
    before = _tree(demo_store)
    with background(create_app(demo_store, LIMITS)) as url:
        yield url, demo_store, before


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


def _search(client: httpx.Client, **body) -> dict:
    response = client.post("/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _key_of(client: httpx.Client, id_: str, modality: str, **query) -> str:
    hits = _search(client, modality=modality, k=LIMITS.k, **query)["results"]
    return next(h["key"] for h in hits if h["id"] == id_)


def test_search_by_text_returns_keys_ids_scores_and_what_the_page_shows(client, server):
    got = _search(client, text="a red circle", modality="image", k=5)
    assert (got["model"], got["modality"]) == ("shapes-clip", "image")
    hits = got["results"]
    assert {h["id"] for h in hits} == {f"shapes/red_circle_{n}.png" for n in range(5)}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for h in hits:
        assert h["key"] == api.item_key(h["modality"], h["source"], h["id"])
        assert (h["modality"], h["model"], h["columns"], h["transcript"], h["segment"]) == (
            "image",
            "shapes-clip",
            {},
            None,
            None,
        )
        assert Path(h["uri"]).name == Path(h["id"]).name
    # the same answer as the library's
    _, rows = api.search(server[1], "text", "a red circle", "image", k=5, details=True)
    assert rows["key"].to_pylist() == [h["key"] for h in hits]


def test_search_by_an_uploaded_image_or_clip(client):
    with open(SAMPLE_DIR / "shapes" / "red_circle_0.png", "rb") as f:
        r = client.post("/search", files={"file": ("query.png", f, "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert hits[0]["id"] == "shapes/red_circle_0.png" and hits[0]["score"] == pytest.approx(1, abs=1e-4)
    assert all(h["id"].startswith("shapes/red_circle") for h in hits)
    with open(SAMPLE_DIR / "speech" / "rocket_us.flac", "rb") as f:
        r = client.post("/search", files={"file": ("clip.flac", f, "audio/flac")}, data={"k": "2"})
    assert r.status_code == 200, r.text
    assert [h["id"] for h in r.json()["results"]] == ["speech/rocket_us.flac", "speech/rocket_gb-female.flac"]
    # a text file searches as its text; its modality by content type when the name has no known extension
    r = client.post(
        "/search", files={"file": ("q", b"a red circle", "text/plain")}, data={"modality": "image", "k": "2"}
    )
    assert r.status_code == 200 and all(h["id"].startswith("shapes/red_circle") for h in r.json()["results"])


def test_search_by_a_stored_item(client):
    key = _key_of(client, "shapes/red_circle_3.png", "image", text="a red circle")
    hits = _search(client, item=key, k=3)["results"]
    assert hits[0]["key"] == key and hits[0]["score"] == pytest.approx(1, abs=1e-4)
    # a text item searching images: its stored shapes-clip vector is the query
    caption = _key_of(client, "texts/caption_red_circle.txt", "text", text="a red circle", model="shapes-clip")
    got = _search(client, item=caption, modality="image", k=3)
    assert got["model"] == "shapes-clip" and all(h["id"].startswith("shapes/red_circle") for h in got["results"])
    # a text item in the text partitions: two models hold it, so the model must be named
    r = client.post("/search", json={"item": caption})
    assert r.status_code == 400 and "several models" in r.json()["error"]
    assert _search(client, item=caption, model="minilm-l6", k=1)["results"][0]["key"] == caption


def test_items_media_and_thumbnails(client):
    key = _key_of(client, "shapes/red_circle_0.png", "image", text="a red circle")
    item = client.get(f"/items/{key}").json()
    assert (item["key"], item["id"], item["modality"], item["transcript"]) == (
        key,
        "shapes/red_circle_0.png",
        "image",
        None,
    )
    assert [m["model"] for m in item["models"]] == ["shapes-clip"] and item["models"][0]["dim"] == 64
    media = client.get(f"/media/{key}")
    assert media.status_code == 200 and media.headers["content-type"] == "image/png"
    assert media.content == (SAMPLE_DIR / "shapes" / "red_circle_0.png").read_bytes()
    assert media.headers["x-content-type-options"] == "nosniff"
    part = client.get(f"/media/{key}", headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == media.content[:10]
    thumb = client.get(f"/thumbs/{key}", params={"size": 48})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 48
    assert client.get(f"/thumbs/{key}", params={"size": 48}).content == thumb.content  # from the cache
    assert client.get(f"/thumbs/{key}", params={"size": 5000}).status_code == 400

    text = _key_of(client, "texts/photo_coffee.txt", "text", text="coffee", model="minilm-l6")
    r = client.get(f"/media/{text}")
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == (SAMPLE_DIR / "texts" / "photo_coffee.txt").read_text()
    assert client.get(f"/thumbs/{text}").status_code == 404

    with open(SAMPLE_DIR / "speech" / "cat_us.flac", "rb") as f:
        clip = client.post("/search", files={"file": ("c.flac", f)}, data={"k": "1"}).json()["results"][0]
    assert clip["id"] == "speech/cat_us.flac"
    assert client.get(f"/media/{clip['key']}").headers["content-type"] in ("audio/flac", "audio/x-flac")


def test_stats_counts_partitions_and_errors(client, server):
    stats = client.get("/stats").json()
    assert stats["root"] == str(Path(server[1]))
    counts = {(e["modality"], e["model"]): e["rows"] for e in stats["embeddings"]}
    assert counts == {
        ("image", "shapes-clip"): 10,
        ("audio", "whisper-tiny.en"): 3,
        ("text", "minilm-l6"): 3,
        ("text", "shapes-clip"): 3,
    }
    assert stats["errors"]["total"] == 1
    (row,) = stats["errors"]["rows"]
    assert (row["id"], row["modality"], row["stage"]) == ("photos/broken.png", "image", row["stage"])
    assert row["message"] and row["created_at"]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({}, 400, "exactly one of text, item or a file"),
        ({"text": "a", "item": "0123456789abcdef"}, 400, "exactly one"),
        ({"text": "a", "colour": "red"}, 400, "unknown field 'colour'"),
        ({"text": 3}, 400, "text must be a string"),
        ({"text": "a", "modality": "smell"}, 400, "modality must be one of"),
        ({"text": "a", "modality": "image", "model": "nope"}, 400, "no image embeddings from model 'nope'"),
        ({"text": "a", "modality": "audio"}, 400, "can encode a text query"),
        ({"text": "a", "modality": "image", "k": 0}, 400, "k must be a whole number from 1 to 50"),
        ({"text": "a", "modality": "image", "k": 51}, 400, "k must be"),
        ({"text": "a", "modality": "image", "k": "many"}, 400, "k must be"),
        ({"text": "a", "modality": "image", "k": True}, 400, "k must be"),
        # the read-only rules of `query --where` (storage.query), whatever their wording
        ({"text": "a", "modality": "image", "where": "1=1; DROP TABLE candidates"}, 400, ""),
        ({"text": "a", "modality": "image", "where": "1=1) ; DROP TABLE candidates; SELECT (1"}, 400, ""),
        ({"text": "a", "modality": "image", "where": "nosuch = 1"}, 400, "bad predicate 'nosuch = 1'"),
        ({"text": "x" * 301, "modality": "image"}, 400, "over 300 characters"),
        ({"text": "a", "modality": "image", "where": "id = 'x' OR " * 30}, 400, "where is over 300"),
        ({"item": "0123456789abcdef"}, 404, "no item with key '0123456789abcdef'"),
        ({"item": "../../etc/passwd"}, 404, "no item with key"),
    ],
)
def test_bad_searches_are_json_errors(client, body, status, says):
    r = client.post("/search", json=body)
    assert (r.status_code, r.headers["content-type"]) == (status, "application/json")
    assert says in r.json()["error"] and r.json()["status"] == status
    assert "Traceback" not in r.text


def test_malformed_requests_and_unknown_routes(client):
    for r, status in (
        (client.post("/search", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (client.post("/search", content=b"[1, 2]", headers={"content-type": "application/json"}), 400),
        (client.post("/search", content=b"text=a", headers={"content-type": "text/plain"}), 400),
        (client.post("/search", files={"file": ("q.bin", b"\x00\x01", "application/octet-stream")}), 400),
        (client.post("/search", files={"file": ("q.png", b"not a png", "image/png")}), 400),
        (client.get("/search"), 405),
        (client.get("/nowhere"), 404),
        (client.get("/items/0123456789abcdef"), 404),
    ):
        assert r.status_code == status, (r.status_code, r.text)
        assert r.json()["status"] == status and r.json()["error"]


def test_an_unexpected_failure_is_a_500_without_details(client, monkeypatch, caplog):
    def broken(root):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api, "stats", broken)
    r = client.get("/stats")
    assert r.status_code == 500 and r.json() == {
        "error": "internal server error (the server's log has the details)",
        "status": 500,
    }
    assert "secret" not in r.text
    assert any("secret internals" in str(rec.exc_info) for rec in caplog.records if rec.exc_info)


def test_request_bodies_over_the_cap_are_refused(client):
    big = b"x" * (LIMITS.body_bytes + 1)
    r = client.post("/search", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "over" in r.json()["error"]

    def chunks():  # no Content-Length: the cap applies as the body streams in
        for _ in range(3):
            yield b"x" * (LIMITS.body_bytes // 2)

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["status"] == 413


def _raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (no client normalising dots or escapes): status, body."""
    host, port = urlsplit(base).hostname, urlsplit(base).port
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_media_serves_only_stored_items(client, server):
    base = server[0]
    key = _key_of(client, "shapes/red_circle_0.png", "image", text="a red circle")
    uri = client.get(f"/items/{key}").json()["uri"]
    for path in (
        "/media/0000000000000000",
        "/media/ffffffffffffffff",
        f"/media/{key[:-1]}",
        f"/media/{key}0",
        "/media/../../../../etc/passwd",
        "/media/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/media/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/media/%2Fetc%2Fpasswd",
        f"/media/{key}%2F..%2F..%2Fetc%2Fpasswd",
        f"/media/{key}/../../etc/passwd",
        f"/media/{uri}",
        f"/media/{uri.replace('/', '%2F')}",
        "/static/../app.py",
        "/static/..%2Fapp.py",
        "/static/%2e%2e/routes.py",
        "/thumbs/..%2F..%2Fetc%2Fpasswd",
        "/items/..%2F..%2Fetc%2Fpasswd",
    ):
        status, body = _raw_get(base, path)
        assert status in (400, 404), (path, status)
        assert b"root:" not in body and b"import" not in body and b"\x89PNG" not in body, path
    assert _raw_get(base, f"/media/{key}")[0] == 200


@pytest.fixture(scope="module")
def notes(notes_store):
    with background(create_app(notes_store, LIMITS, warm=False)) as url, httpx.Client(base_url=url) as c:
        yield c


def test_passthrough_columns_and_keys_unique_across_sources(notes):
    hits = _search(notes, text="a red circle", modality="text", k=3)["results"]
    assert (hits[0]["id"], hits[0]["source"]) == ("note-1", "source-a")
    assert {h["source"]: h["columns"] for h in hits if h["id"] == "note-1"} == {
        "source-a": {"text": "a red circle on a wall", "stars": 5},
        "source-b": {"text": "a green star in the sky", "stars": 3},
    }
    keys = {h["key"] for h in hits}
    assert len(keys) == 3
    same_id = [h["key"] for h in hits if h["id"] == "note-1"]
    items = [notes.get(f"/items/{k}").json() for k in same_id]
    assert sorted(i["source"] for i in items) == ["source-a", "source-b"]
    # no file behind these uris: a text item serves its text column; the search by item uses its stored vector
    assert {notes.get(f"/media/{k}").text for k in same_id} == {"a red circle on a wall", "a green star in the sky"}
    assert _search(notes, item=same_id[0], k=1)["results"][0]["key"] == same_id[0]


def test_concurrent_searches_get_the_answers_of_sequential_ones(client):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"text": t, "modality": "image", "k": 3} for t in ("a red circle", "a blue square", "a green star")] * 3
    alone = [[h["key"] for h in _search(client, **b)["results"]] for b in bodies[:3]]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: [h["key"] for h in _search(client, **b)["results"]], bodies))
    assert together == alone * 3


def test_serving_wrote_nothing_to_the_store(client, server):
    assert client.get("/stats").status_code == 200
    assert _tree(server[1]) == server[2]
