"""Whole jobs over the inputs that once lost rows, miscounted them or broke the job: every row ends embedded,
errored or already done, each counted where it ends, and `read` is their sum or the job fails."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.cli import main
from storage.query import connect, run_readonly
from storage.store import Store

CLIP = "tiny-clip"  # tests/conftest.py: a tiny random CLIP, both towers
MODELS = ["--model", f"image={CLIP}", "--model", f"text={CLIP}"]
FIXTURES = Path(__file__).parents[1] / "fixtures"


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def embed(capsys, *argv: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["embed", *argv, "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out) if out.out.strip() else None, out.err


def fates(record: dict) -> dict[str, tuple[int, int, int, int]]:
    return {k: (c["read"], c["embedded"], c["errored"], c["already_done"]) for k, c in record["counts"].items()}


def raw_table(rows: list[dict]) -> pa.Table:
    schema = pa.schema([("id", pa.string()), ("modality", pa.string()), ("data", pa.binary()), ("text", pa.string())])
    return pa.Table.from_pylist([{"modality": None, "data": None, "text": None} | r for r in rows], schema=schema)


ROWS = [
    {"id": "p/a.png", "data": png((200, 0, 0))},
    {"id": ".hidden.png", "data": png((0, 200, 0))},  # an image: counted as one and embedded as one
    {"id": "a/.png", "data": png((0, 0, 200))},  # no extension (a dotfile): skipped, and named
    {"id": "stated", "modality": "image", "data": png((9, 9, 9))},  # the modality column wins
    {"id": "clip.mp4", "modality": "video", "data": b"x"},  # an unknown modality: skipped, and named
    {"id": "c.txt", "text": "a red circle"},
    {"id": "dup.txt", "text": "first"},
    {"id": "dup.txt", "text": "second"},  # two rows, one id: both are error rows until the input says which
]


def test_every_parquet_row_is_counted_where_it_ends(tmp_path, ray_session, tiny_clip_model, capsys):
    raw, root = tmp_path / "raw.parquet", str(tmp_path / "store")
    pq.write_table(raw_table(ROWS), raw)
    code, record, err = embed(capsys, str(raw), root, *MODELS)
    assert code == 0 and record["status"] == "succeeded", err
    assert fates(record) == {"image/tiny-clip": (3, 3, 0, 0), "text/tiny-clip": (3, 1, 2, 0)}
    assert record["skipped_files"] == 2
    assert [(s["id"], s["reason"]) for s in record["skipped"]] == [
        ("a/.png", "no file extension"),
        ("clip.mp4", "modality 'video' is not one of image, audio, text"),
    ]
    con = connect(root)
    assert run_readonly(con, "SELECT id FROM images ORDER BY id").to_pylist() == [
        {"id": ".hidden.png"},
        {"id": "p/a.png"},
        {"id": "stated"},
    ]
    assert run_readonly(con, "SELECT id FROM texts").to_pylist() == [{"id": "c.txt"}]
    errors = run_readonly(con, "SELECT id, stage, error_type, message FROM errors").to_pylist()
    assert errors == [
        {
            "id": "dup.txt",
            "stage": "read",
            "error_type": "DuplicateId",
            "message": "duplicate id: other rows of this input have the same id",
        }
    ], "the errors view keeps one row per id"

    commits = sorted(p.name for p in (tmp_path / "store" / "_commits").iterdir())
    code, again, _ = embed(capsys, str(raw), root, *MODELS)
    assert code == 0 and fates(again) == {"image/tiny-clip": (3, 0, 0, 3), "text/tiny-clip": (3, 0, 0, 3)}
    assert sorted(p.name for p in (tmp_path / "store" / "_commits").iterdir()) == commits, "nothing new written"

    pq.write_table(raw_table([r for r in ROWS if r.get("text") != "first"]), raw)
    code, fixed, _ = embed(capsys, str(raw), root, *MODELS)
    assert code == 0 and fates(fixed)["text/tiny-clip"] == (2, 1, 0, 1), "an id no longer shared is embedded"
    con = connect(root)
    assert run_readonly(con, "SELECT id FROM texts ORDER BY id").to_pylist() == [{"id": "c.txt"}, {"id": "dup.txt"}]
    assert run_readonly(con, "SELECT id FROM errors").to_pylist() == [], "a newer embedding supersedes the error"


def test_a_media_directory_holding_its_store_and_a_parquet_file(tmp_path, ray_session, tiny_clip_model, capsys):
    """A store kept inside the input directory, and a `classify --out` file saved there, once made the next run
    read the directory as a Parquet dataset (and fail); an audio clip over the length limit is an error row."""
    media = tmp_path / "media"
    media.mkdir()
    for i, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        (media / f"{i}.png").write_bytes(png(colour))
    (media / "note.txt").write_text("a blue square")
    shutil.copy(FIXTURES / "audio" / "fox_8k.wav", media / "fox.wav")
    shutil.copy(FIXTURES / "audio" / "long_8k.ogg", media / "long.ogg")
    config = tmp_path / "job.yaml"
    config.write_text("limits:\n  audio_seconds: 10\n")
    root = str(media / "store")
    argv = [str(media), root, *MODELS, "--model", "audio=whisper-tiny.en", "--config", str(config)]
    code, first, _ = embed(capsys, *argv)
    assert code == 0, first
    assert fates(first) == {
        "audio/whisper-tiny.en": (2, 1, 1, 0),
        "image/tiny-clip": (2, 2, 0, 0),
        "text/tiny-clip": (1, 1, 0, 0),
    }
    (error,) = run_readonly(connect(root), "SELECT id, stage, message FROM errors").to_pylist()
    assert error == {
        "id": "long.ogg",
        "stage": "preprocess",
        "message": "audio is 33.8 s long, over the 10 s limit (a job's limits.audio_seconds)",
    }
    assert main(["classify", root, "--labels", "red,blue", "--out", str(media / "labels.parquet")]) == 0
    code, second, err = embed(capsys, *argv)
    assert code == 0, err
    assert {k: v[1:] for k, v in fates(second).items()} == {k: (0, 0, v[0]) for k, v in fates(first).items()}
    assert [s["id"] for s in second["skipped"]] == ["labels.parquet"], "the store inside INPUT is not input"


def test_an_empty_input_is_a_clean_job(tmp_path, ray_session, tiny_clip_model, capsys):
    """Once a traceback (KeyError: 'embedded'), while the job record said succeeded."""
    media = tmp_path / "media"
    media.mkdir()
    capsys.readouterr()
    assert main(["embed", str(media), str(tmp_path / "store"), *MODELS]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nothing to embed" in err
    (media / "README.md").write_text("no media here")
    code, record, _ = embed(capsys, str(media), str(tmp_path / "store"), *MODELS)
    assert code == 0 and record["status"] == "succeeded" and record["counts"] == {}
    assert record["skipped"] == [{"input": str(media), "id": "README.md", "reason": "unknown extension .md"}]
    assert [j["status"] for j in Store(str(tmp_path / "store")).jobs()] == ["succeeded", "succeeded"]


def test_rows_lost_on_the_way_fail_the_job(tmp_path, ray_session, tiny_clip_model, capsys, monkeypatch):
    """The check that `read` is the sum of the fates: an inventory that claims a row the pipeline never sees."""
    from jobs import run

    media = tmp_path / "media"
    media.mkdir()
    (media / "a.txt").write_text("one")

    def overcounted(*args, **kwargs):
        inventory = run_open_input(*args, **kwargs)
        inventory.counts["text"] += 1
        return inventory

    run_open_input = run.open_input
    monkeypatch.setattr(run, "open_input", overcounted)
    capsys.readouterr()
    assert main(["embed", str(media), str(tmp_path / "store"), *MODELS]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("mmembed: error: text/tiny-clip over"), errors
    err = errors[0]
    assert "2 rows read but 1 ended (1 embedded, 0 errored, 0 already done)" in err
    (job,) = Store(str(tmp_path / "store")).jobs()
    assert job["status"] == "failed" and "RowsLostError" in job["error"]
