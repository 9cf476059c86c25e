"""The stores and the server the serve tests share: a demo-like store embedded once per session through the real
pipeline (a subset of the bundled sample media, and one broken file for the errors table), and a small store
written directly with passthrough columns, two sources sharing an id, and media only some rows can reach."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs import api, config
from jobs.samples import SAMPLE_DIR
from storage.schema import TIMESTAMP, embedding_schema
from storage.store import Store

SHAPES = [f"red_circle_{n}" for n in range(5)] + ["blue_square_0", "blue_square_1", "green_star_0", "yellow_triangle_0"]
SPEECH = ["rocket_us", "rocket_gb-female", "cat_us"]
TEXTS = ["caption_red_circle", "photo_coffee", "speech_cat"]


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory, request) -> str:
    """The sample subset (9 shapes, 1 photo, 3 clips, 3 texts, 1 broken PNG) embedded by the default models; or the
    store MMEMBED_TEST_DEMO_STORE names (the whole demo's: only the page tests hold there)."""
    if os.environ.get("MMEMBED_TEST_DEMO_STORE"):
        return str(Path(os.environ["MMEMBED_TEST_DEMO_STORE"]).resolve())
    request.getfixturevalue("ray_session")
    media = tmp_path_factory.mktemp("serve-media")
    for folder, names, ext in (("shapes", SHAPES, "png"), ("speech", SPEECH, "flac"), ("texts", TEXTS, "txt")):
        (media / folder).mkdir()
        for name in names:
            shutil.copy(SAMPLE_DIR / folder / f"{name}.{ext}", media / folder / f"{name}.{ext}")
    (media / "photos").mkdir()
    shutil.copy(SAMPLE_DIR / "photos" / "coffee.jpg", media / "photos" / "coffee.jpg")
    (media / "photos" / "broken.png").write_bytes(b"\x89PNG not really")
    root = tmp_path_factory.mktemp("serve-store") / "store"
    api.run_job(config.load(overrides={"input": str(media), "root": str(root)}))
    return str(root)


@pytest.fixture(scope="session")
def notes_store(tmp_path_factory) -> str:
    """Texts written straight into a store under text/shapes-clip: the same id in two sources, passthrough columns
    `text` and `stars`, and uris that are no file (so /media serves the `text` column)."""
    root = tmp_path_factory.mktemp("serve-notes") / "store"
    store = Store(str(root))
    rows = [
        ("note-1", "source-a", "a red circle on a wall", 5),
        ("note-1", "source-b", "a green star in the sky", 3),
        ("note-2", "source-a", "a blue square", 1),
    ]
    clip = api.encoder("shapes-clip")
    vectors = clip.encode("text", [r[2] for r in rows]).astype(np.float32)
    now = datetime.now(UTC)
    schema = embedding_schema(clip.dim, pa.schema([("text", pa.string()), ("stars", pa.int64())]))
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "uri": [f"memo://{r[1]}/{r[0]}" for r in rows],
            "source": [r[1] for r in rows],
            "content_hash": [f"{i:064x}" for i in range(len(rows))],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), clip.dim),
            "model_digest": [clip.digest] * len(rows),
            "job_id": ["notes"] * len(rows),
            "created_at": pa.array([now] * len(rows), TIMESTAMP),
            "text": [r[2] for r in rows],
            "stars": [r[3] for r in rows],
        },
        schema=schema,
    )
    store.commit("notes", [store.write_embeddings("text", "shapes-clip", table)])
    return str(root)
