from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import sources
from pipelines.errors import SourceError


def test_directory_listing_routes_by_extension_and_counts_skipped(tmp_path: Path, monkeypatch):
    media = tmp_path / "m"
    (media / "a" / "b").mkdir(parents=True)
    for name in ("x.JPG", "a/y.png", "a/b/z.flac", "t.txt", "a/notes.md", "a/b/.DS_Store"):
        (media / name).write_bytes(b"1")
    monkeypatch.setattr(sources, "LISTING_CHUNK", 2)
    inv = sources.open_input(str(media), str(tmp_path / "staging"))
    assert inv.kind == "dir" and inv.skipped == 2
    assert dict(inv.counts) == {"image": 2, "audio": 1, "text": 1}
    listed = pa.concat_tables([pq.read_table(f) for f in inv.files])
    assert len(inv.files) == 2  # chunks of 2 rows
    assert sorted(listed["id"].to_pylist()) == ["a/b/z.flac", "a/y.png", "t.txt", "x.JPG"]
    assert all(Path(u).is_absolute() for u in listed["uri"].to_pylist())


def test_parquet_inventory_infers_modality_from_id(tmp_path: Path):
    t = pa.table(
        {
            "id": ["a.png", "b.wav", "c.txt", "d.xyz", "e"],
            "modality": [None, None, None, None, "text"],
            "text": [None, None, "hi", None, "yo"],
            "data": [b"1", b"2", None, b"3", None],
        }
    )
    pq.write_table(t, tmp_path / "raw.parquet")
    inv = sources.open_input(str(tmp_path / "raw.parquet"), str(tmp_path / "s"))
    assert dict(inv.counts) == {"image": 1, "audio": 1, "text": 2} and inv.skipped == 1


def test_parquet_errors(tmp_path: Path):
    pq.write_table(pa.table({"name": ["a"]}), tmp_path / "noid.parquet")
    with pytest.raises(SourceError, match="needs an 'id' column"):
        sources.open_input(str(tmp_path / "noid.parquet"), str(tmp_path / "s"))
    pq.write_table(pa.table({"id": ["a.txt"], "text": ["x"]}), tmp_path / "ok.parquet")
    with pytest.raises(SourceError, match="passthrough column 'lang'"):
        sources.open_input(str(tmp_path / "ok.parquet"), str(tmp_path / "s"), ("lang",))
    with pytest.raises(SourceError, match="does not exist"):
        sources.open_input(str(tmp_path / "nope"), str(tmp_path / "s"))


def test_of_modality_then_load_rows_reads_files_hashes_and_keeps_unreadable_rows(tmp_path: Path):
    (tmp_path / "a.txt").write_text("hello")
    listing = pa.table(
        {
            "id": ["a.txt", "gone.txt", "x.png"],
            "uri": [str(tmp_path / "a.txt"), str(tmp_path / "gone.txt"), "x.png"],
            "modality": ["text", "text", "image"],
            "data": pa.nulls(3, pa.binary()),
        }
    )
    texts = sources.of_modality(listing, "text")
    assert texts["id"].to_pylist() == ["a.txt", "gone.txt"] and "modality" not in texts.column_names
    assert texts.schema.field("data").type == pa.binary(), "types kept: an all-null column must not turn into floats"
    assert sources.of_modality(listing.drop_columns(["modality"]), "image")["id"].to_pylist() == ["x.png"], (
        "the extension says"
    )
    batch = {c: np.array(texts[c].to_pylist(), dtype=object) for c in ("id", "uri")}
    out = sources.load_rows(batch, "SRC")
    assert list(out["id"]) == ["a.txt", "gone.txt"]
    assert out["data"][0] == b"hello" and out["read_error"][0] == ""
    assert out["content_hash"][0] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert "cannot read" in out["read_error"][1]
    assert list(out["source"]) == ["SRC", "SRC"]
