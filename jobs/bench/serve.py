"""The bench's `serve` section: a text search through `mmembed serve`'s HTTP API over rows x 512 vectors, model
warm, timed at the client (an httpx client on loopback, one request at a time), beside the same search through the
library and the query encoding alone, so the HTTP share can be read off."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from storage.search import search

from .. import api
from .baselines import bench_clip
from .plan import TOP_K, BenchError, Plan, log, percentiles, timed
from .vectors import write_vector_store

QUERIES = ("a red circle", "a dog on a beach", "an old train station at night", "two cups of coffee", "a quiet lake")


def measure_serve(plan: Plan, work: Path, rows: int = 100_000, queries: int = 50) -> dict:
    """Client-side latency of POST /search {"text", "modality": "image", "k": 10} over `rows` x 512 vectors, with
    the plan's CLIP (ViT-B/32 dims: its text tower encodes the query): p50/p95 ms, and the library and encoder
    times of the same queries, the query's encoding alone and the search alone (a ready vector, with details)."""
    from ..serve.app import Limits, background, create_app

    bench_clip(plan.clip_name, plan.clip)
    model = plan.clip_name
    dim = api.encoder(model).dim  # 512 for the plan's ViT-B/32 CLIP
    root = work / "stores" / f"serve-{rows}"
    log(f"serve: writing {rows} x {dim} vectors")
    write_vector_store(root, rows, np.random.default_rng(rows), model=model, dim=dim)
    texts = [QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}") for i in range(queries)]
    body = {"modality": "image", "model": model, "k": TOP_K}
    vector = api.encoder(model).encode("text", ["a vector for the search alone"])[0]
    client_s, library_s, encode_s, search_s = [], [], [], []
    with background(create_app(str(root), Limits())) as url, httpx.Client(base_url=url, timeout=60) as client:
        first, _ = timed(lambda: client.post("/search", json={"text": "warm up", **body}).raise_for_status())
        log(f"serve: {queries} text searches through HTTP, the library, the encoder alone and the search alone")
        for text in texts:  # interleaved, so that a busy moment of the machine weighs on each the same
            seconds, response = timed(lambda t=text: client.post("/search", json={"text": t, **body}))
            if response.status_code != 200 or len(response.json()["results"]) != TOP_K:
                raise BenchError(f"POST /search answered {response.status_code}: {response.text[:200]}")
            client_s.append(seconds)
            library_s.append(
                timed(lambda t=text: api.search(str(root), "text", t, "image", model, TOP_K, details=True))[0]
            )
            encode_s.append(timed(lambda t=text: api.encoder(model).encode("text", [t]))[0])
            search_s.append(timed(lambda: search(str(root), vector, "image", model, k=TOP_K, details=True))[0])
    return {
        "rows": rows,
        "dim": dim,
        "k": TOP_K,
        "model": model,
        "queries": queries,
        "first_request_s": round(first, 3),
        **{
            f"{name}_ms": {**percentiles(seconds), "min": round(min(seconds) * 1000, 2)}
            for name, seconds in (
                ("client", client_s),
                ("library", library_s),
                ("encode", encode_s),
                ("search", search_s),
            )
        },
    }
