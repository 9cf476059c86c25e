"""An s3:// ROOT end to end against a local S3 server (moto): `mmembed embed` in a subprocess (its own
Ray, whose workers write the shards to the bucket), a re-run that finds everything done, then the
query layer, SQL and the job list reading the bucket through pyarrow.fs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from encoders.registry import load_encoder
from jobs.cli import main
from jobs.samples import SAMPLE_DIR
from pipelines.errors import SourceError
from storage.query import connect, run_readonly
from storage.search import search
from storage.store import Store

BUCKET = "mmembed-test"
TEXTS = ["a red circle on a white background", "the quick brown fox jumps over the lazy dog", "bonjour tout le monde"]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port, the AWS variables that point pyarrow.fs at it, and a bucket."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield env
    server.stop()


def embed(media: str, root: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "embed",
        str(media),
        root,
        "--model",
        "image=shapes-clip",
        "--model",
        "text=minilm-l6",
        "--json",
    ]
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def upload(local: Path, prefix: str) -> str:
    """Copy a local directory into the bucket under `prefix`; -> its s3:// URI."""
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        with fs.open_output_stream(f"{BUCKET}/{prefix}/{path.relative_to(local).as_posix()}") as f:
            f.write(path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def test_an_s3_input_is_listed_and_read_through_pyarrow_fs(s3, tmp_path):
    """An s3:// INPUT was documented, and resolved as a local path ("does not exist")."""
    from pipelines import sources

    media = tmp_path / "media"
    (media / "deep").mkdir(parents=True)
    (media / "a.txt").write_text("hello")
    (media / "deep" / "b.png").write_bytes(b"png bytes")
    (media / "notes.md").write_text("skipped")
    uri = upload(media, "inputs/media")
    inv = sources.open_input(uri + "/", f"s3://{BUCKET}/stage/1", root=f"s3://{BUCKET}/store")
    assert (inv.kind, inv.source, dict(inv.counts), inv.skipped) == ("dir", uri, {"text": 1, "image": 1}, 1)
    listed = pa.concat_tables(
        [pq.read_table(f.removeprefix("s3://"), filesystem=Store(f"s3://{BUCKET}").fs) for f in inv.files]
    )
    assert listed["uri"].to_pylist() == [f"{uri}/a.txt", f"{uri}/deep/b.png"]
    rows = sources.load_rows(
        {"id": np.array(["a.txt", "gone.txt"]), "uri": np.array([f"{uri}/a.txt", f"{uri}/gone"])}, uri
    )
    assert rows["data"][0] == b"hello" and rows["read_error"][0] == "" and "cannot read" in rows["read_error"][1]

    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"id": ["x.txt", "y.txt", "x.txt"], "text": ["1", "2", "3"]}), raw / "part-0.parquet")
    dataset = upload(raw, "inputs/raw")
    inv = sources.open_input(dataset, f"s3://{BUCKET}/stage/2")
    assert (inv.kind, dict(inv.counts), inv.files) == ("parquet", {"text": 3}, [f"{dataset}/part-0.parquet"])
    assert list(inv.duplicates) == [sources.id_digest("x.txt")]
    with pytest.raises(SourceError, match="does not exist"):
        sources.open_input(f"s3://{BUCKET}/inputs/nothing", f"s3://{BUCKET}/stage/3")


def test_an_s3_root_end_to_end(s3, tmp_path, capsys):
    media = tmp_path / "media"
    (media / "shapes").mkdir(parents=True)
    for name in ("red_circle_0.png", "blue_square_0.png"):
        shutil.copy(SAMPLE_DIR / "shapes" / name, media / "shapes" / name)
    (media / "shapes" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for i, text in enumerate(TEXTS):
        (media / f"note{i}.txt").write_text(text)
    media = upload(media, "media")  # the input in the bucket too: the workers read it through pyarrow.fs
    root = f"s3://{BUCKET}/store"

    first = embed(media, root, s3)
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads(first.stdout)
    assert record["status"] == "succeeded" and record["root"] == root
    assert {k: (v["read"], v["embedded"], v["errored"]) for k, v in record["counts"].items()} == {
        "image/shapes-clip": (3, 2, 1),
        "text/minilm-l6": (3, 3, 0),
    }
    assert "locked on this host only" in first.stderr

    again = embed(media, root, s3)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout)
    assert sum(v["embedded"] for v in rerun["counts"].values()) == 0
    assert sum(v.get("already_done", 0) for v in rerun["counts"].values()) == 6

    store = Store(root)
    bucket_files = {
        i.path.removeprefix(f"{BUCKET}/store/")
        for i in store.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/store", recursive=True))
        if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    }
    assert bucket_files == set(store._committed("embeddings")) | set(store._committed("errors")), (
        "no orphan shards in the bucket"
    )

    con = connect(root)
    counts = run_readonly(
        con, "SELECT modality, model, count(*) AS n FROM embeddings GROUP BY ALL ORDER BY ALL"
    ).to_pylist()
    assert counts == [
        {"modality": "image", "model": "shapes-clip", "n": 2},
        {"modality": "text", "model": "minilm-l6", "n": 3},
    ]
    assert run_readonly(con, "SELECT id, stage, uri FROM errors").to_pylist() == [
        {"id": "shapes/broken.png", "stage": "preprocess", "uri": f"{media}/shapes/broken.png"}
    ]
    views = store.fs.open_input_stream(f"{BUCKET}/store/views.sql").read().decode()
    assert f"'{root}/embeddings/modality=text/model=minilm-l6/" in views, "outside readers get the bucket's files"
    vector = load_encoder("minilm-l6").encode("text", [TEXTS[1]])[0]
    hit = search(root, vector, "text", "minilm-l6", k=1).to_pylist()[0]
    assert hit["id"] == "note1.txt" and hit["score"] == pytest.approx(1.0, abs=1e-4)
    stored = run_readonly(con, "SELECT embedding[1:dim] AS e FROM texts WHERE id = 'note1.txt'").to_pylist()[0]["e"]
    assert float(np.dot(stored, vector) / np.linalg.norm(stored) / np.linalg.norm(vector)) >= 0.9999

    capsys.readouterr()
    assert main(["jobs", root, "--json"]) == 0
    assert [j["status"] for j in json.loads(capsys.readouterr().out)] == ["succeeded", "succeeded"]
    assert main(["index", root]) == 1
    assert "not a local store" in capsys.readouterr().err
