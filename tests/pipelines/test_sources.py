import os
import re
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
    assert len(inv.files) >= 2 and all(pq.read_metadata(f).num_rows <= 2 for f in inv.files)  # chunks of 2 paths
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


TRICKY = {  # id -> what the one rule routes it to
    "a/.png": None,  # a dotfile named .png has no extension (Path.suffix), wherever it is counted
    ".hidden.png": "image",
    "x.PNG": "image",
    "a..png": "image",
    "dir.v2/file": None,
    "x.": None,
    "b/c.tar.gz": None,
    "song.Flac": "audio",
    "notes/readme.txt": "text",
    "clip.parquet": None,
}


def test_one_routing_rule_counts_what_the_read_tasks_keep(tmp_path: Path):
    """The driver's count of a modality is the number of rows the pipeline's filter keeps (once: a regex counted
    `a/.png` as an image and `Path.suffix` dropped it, so it was reported as already done)."""
    ids = [*TRICKY, "stated.txt", "stated.png", "odd.png"]
    stated = [None] * len(TRICKY) + ["image", None, "video"]  # the modality column, where it has a value, wins
    table = pa.table({"id": ids, "modality": stated, "data": [b"x"] * len(ids)})
    pq.write_table(table, tmp_path / "raw.parquet")
    inv = sources.open_input(str(tmp_path / "raw.parquet"), str(tmp_path / "s"))
    kept = {m: sources.of_modality(table, m)["id"].to_pylist() for m in ("image", "audio", "text")}
    assert dict(inv.counts) == {m: len(rows) for m, rows in kept.items() if rows}
    assert inv.skipped == len(ids) - sum(map(len, kept.values()))
    assert kept["image"] == [".hidden.png", "x.PNG", "a..png", "stated.txt", "stated.png"]
    large = table.cast(pa.schema([("id", pa.large_string()), ("modality", pa.large_string()), ("data", pa.binary())]))
    assert sources.of_modality(large, "image")["id"].to_pylist() == kept["image"], "large_string columns route alike"
    assert [sources.modality_of(i) for i in TRICKY] == list(TRICKY.values())
    reasons = {s["id"]: s["reason"] for s in inv.skipped_named}
    assert reasons["a/.png"] == "no file extension" and reasons["b/c.tar.gz"] == "unknown extension .gz"
    assert reasons["odd.png"] == "modality 'video' is not one of image, audio, text"

    media = tmp_path / "media"
    for name in TRICKY:
        (media / name).parent.mkdir(parents=True, exist_ok=True)
        (media / name).write_bytes(b"x")
    listed = sources.open_input(str(media), str(tmp_path / "s2"))
    ids = pa.concat_tables([pq.read_table(f) for f in listed.files]).to_pydict()
    assert dict(zip(ids["id"], ids["modality"])) == {i: m for i, m in TRICKY.items() if m}


def test_skipped_files_are_named_up_to_a_cap(tmp_path: Path, monkeypatch):
    media = tmp_path / "m"
    media.mkdir()
    for i in range(5):
        (media / f"notes{i}.md").write_text("x")
    (media / "a.png").write_bytes(b"1")
    monkeypatch.setattr(sources, "SKIPPED_NAMED", 3)
    inv = sources.open_input(str(media), str(tmp_path / "s"))
    assert inv.skipped == 5
    assert inv.skipped_named == [
        {"input": str(media), "id": f"notes{i}.md", "reason": "unknown extension .md"} for i in range(3)
    ]


def test_a_directory_is_media_unless_it_holds_only_parquet(tmp_path: Path):
    """A store kept inside the input, or a `classify --out` file saved there, once made the next run read the
    directory as a Parquet dataset."""
    media = tmp_path / "media"
    (media / "pics").mkdir(parents=True)
    (media / "pics" / "a.png").write_bytes(b"1")
    pq.write_table(pa.table({"id": ["pics/a.png"], "label": ["x"]}), media / "labels.parquet")
    store = media / "store"
    (store / "embeddings" / "modality=image" / "model=m").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"]}), store / "embeddings" / "modality=image" / "model=m" / "j-1.parquet")
    inv = sources.open_input(str(media), str(store / "_staging" / "j"), root=str(store))
    assert inv.kind == "dir" and dict(inv.counts) == {"image": 1}
    assert [(s["id"], s["reason"].split(" (")[0]) for s in inv.skipped_named] == [
        ("labels.parquet", "a Parquet file among media files")
    ], "the store inside INPUT is not read, its files are not even skipped"

    dataset = tmp_path / "dataset"
    (dataset / "part").mkdir(parents=True)
    for i in range(2):
        pq.write_table(pa.table({"id": [f"t{i}.txt"], "text": ["hi"]}), dataset / "part" / f"{i}.parquet")
    (dataset / "_SUCCESS").write_text("")
    (dataset / ".DS_Store").write_text("")
    inv = sources.open_input(str(dataset), str(tmp_path / "s"))
    assert inv.kind == "parquet" and dict(inv.counts) == {"text": 2} and len(inv.files) == 2
    (dataset / "README.md").write_text("a dataset")
    assert sources.open_input(str(dataset), str(tmp_path / "s3")).kind == "dir", "another file: raw media"
    forced = sources.open_input(str(dataset), str(tmp_path / "s4"), fmt="parquet")
    assert forced.kind == "parquet" and dict(forced.counts) == {"text": 2}
    assert sources.open_input(str(media), str(tmp_path / "s5"), fmt="media").kind == "dir"
    with pytest.raises(SourceError, match="is inside the store"):
        sources.open_input(str(store / "embeddings"), str(tmp_path / "s6"), root=str(store))


def test_duplicate_ids_are_found_and_their_rows_become_errors(tmp_path: Path):
    table = pa.table({"id": ["a.txt", "b.txt", "a.txt", "c.txt", "x.md", "x.md"], "text": list("123456")})
    pq.write_table(table, tmp_path / "raw.parquet")
    inv = sources.open_input(str(tmp_path / "raw.parquet"), str(tmp_path / "s"))
    assert dict(inv.counts) == {"text": 4} and inv.skipped == 2
    assert list(inv.duplicates) == [sources.id_digest("a.txt")], "skipped rows share no id that matters"
    rows = sources.load_rows({"id": np.array(["a.txt", "b.txt", "a.txt"]), "text": np.array(list("123"))}, "SRC")
    out = sources.skip_done(rows, np.empty(0, "S32"), inv.duplicates)
    assert list(out["read_error_type"]) == ["DuplicateId", "", "DuplicateId"]
    assert "duplicate id" in out["read_error"][0] and list(out["done_rows"]) == [0, 0, 0]


def test_rows_done_before_leave_a_tally_row_counting_them(tmp_path: Path):
    from storage.store import DUPLICATE, row_key

    rows = sources.load_rows({"id": np.array(list("abcd")), "text": np.array(list("1234"))}, "SRC")
    keys = [row_key("SRC", i, h) for i, h in zip(rows["id"], rows["content_hash"])]
    done = np.sort(np.array([keys[0], keys[2], keys[3]], dtype="S32"))
    out = sources.skip_done(rows, done)
    assert list(out["id"]) == ["a", "b"] and list(out["done_rows"]) == [3, 0] and out["data"][0] == b""
    assert list(sources.tallies(out)) == [True, False]
    assert sources.skip_done(rows, np.empty(0, "S32"))["done_rows"].tolist() == [0] * 4
    # a row whose id is shared is done under its duplicate key, so it is embedded once the id is no longer shared
    shared = np.array([row_key("SRC", "b", DUPLICATE + rows["content_hash"][1])], "S32")
    assert list(sources.skip_done(rows, shared)["id"]) == list("abcd")
    both = sources.skip_done(rows, shared, np.array([sources.id_digest("b")], "S16"))
    assert list(both["done_rows"]) == [0, 1, 0, 0]


@pytest.mark.parametrize(
    "table,message",
    [
        (pa.table({"id": [1, 2], "text": ["a", "b"]}), "column 'id' must be strings, not int64"),
        (pa.table({"id": ["a.png"], "data": ["not bytes"]}), "column 'data' must be binary"),
        (pa.table({"id": ["a.txt", None, ""], "text": ["a", "b", "c"]}), "2 row(s) have no id"),
    ],
)
def test_parquet_inputs_that_would_break_a_job_are_refused(tmp_path: Path, table, message):
    pq.write_table(table, tmp_path / "raw.parquet")
    with pytest.raises(SourceError, match=re.escape(message)):
        sources.open_input(str(tmp_path / "raw.parquet"), str(tmp_path / "s"))


def test_unlistable_and_symlinked_directories_are_skipped_and_named(tmp_path: Path, monkeypatch):
    media = tmp_path / "m"
    (media / "locked").mkdir(parents=True)
    (media / "locked" / "x.png").write_bytes(b"1")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "y.png").write_bytes(b"1")
    (media / "link").symlink_to(tmp_path / "elsewhere")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    os.mkfifo(media / "pipe.wav")  # reading it would block the read task forever
    inv = sources.open_input(str(media), str(tmp_path / "s"))
    assert inv.skipped == 3 and not inv.counts
    assert {s["id"]: s["reason"] for s in inv.skipped_named} == {
        "link/": "a symlinked directory (not followed)",
        "locked/": "cannot list directory: Permission denied",
        "pipe.wav": "not a regular file",
    }


def test_passthrough_columns_that_would_break_a_job_are_refused(tmp_path: Path):
    """`--passthrough modality` (or text, or one named twice) once reached Ray as a traceback."""
    table = pa.table(
        {"id": ["a.txt"], "text": pa.array(["hi"], pa.large_string()), "modality": ["text"], "lang": ["en"]}
    )
    pq.write_table(table, tmp_path / "raw.parquet")
    assert dict(sources.open_input(str(tmp_path / "raw.parquet"), str(tmp_path / "s"), ("lang",)).counts) == {"text": 1}
    for columns, message in [
        (("modality",), "passthrough column 'modality' is one mmembed reads or writes itself"),
        (("text",), "passthrough column 'text' is one"),
        (("lang", "lang"), "a passthrough column is named twice"),
    ]:
        with pytest.raises(SourceError, match=message):
            sources.open_input(str(tmp_path / "raw.parquet"), str(tmp_path / "s"), columns)
    (tmp_path / "photo.png").write_bytes(b"1")
    with pytest.raises(SourceError, match="is a file: give the directory of media files that holds it"):
        sources.open_input(str(tmp_path / "photo.png"), str(tmp_path / "s"))


def test_a_file_over_the_read_limit_is_its_rows_error_and_is_not_read_whole(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 1 << 30)
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(3 << 29)  # sparse: costs no disk, and is never read
    (tmp_path / "small.txt").write_text("fine")
    rows = sources.load_rows(
        {"id": np.array(["big.txt", "small.txt"]), "uri": np.array([str(big), str(tmp_path / "small.txt")])}, "S"
    )
    assert rows["read_error_type"][0] == "FileTooLarge" and "is 1.5 GiB, over the 1 GiB" in rows["read_error"][0]
    assert rows["data"][1] == b"fine" and rows["read_error"][1] == ""
