"""Inputs: a directory of media files or a raw-media Parquet dataset, as a stream of rows.

Every source yields rows with `id`, `uri`, `source`, `modality`, `data` (file bytes, or
UTF-8 text), `content_hash` and the requested passthrough columns. A directory is listed
once into Parquet chunks (ROOT/_staging/<job>/listing/), so neither the listing nor the data
ever has to fit in the driver.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.store import duckdb_connection, row_key

from .errors import SourceError

EXTENSIONS = {
    "image": ("jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp"),
    "audio": ("wav", "flac", "ogg", "mp3"),
    "text": ("txt",),
}
MODALITY_OF = {ext: modality for modality, exts in EXTENSIONS.items() for ext in exts}
LISTING_CHUNK = 50_000  # paths per listing file: bounds the driver's memory while listing


def modality_of(name: str) -> str | None:
    return MODALITY_OF.get(Path(name).suffix.lower().lstrip("."))


@dataclass
class Inventory:
    """What the driver knows about an input before any data moves: row counts per modality."""

    kind: str  # "dir" or "parquet"
    source: str
    files: list[str]  # Parquet files Ray reads (the listing chunks for a directory)
    counts: Counter = field(default_factory=Counter)
    skipped: int = 0
    columns: tuple[str, ...] = ()


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


def remove_dir(path: str) -> None:
    fs, path = filesystem(path)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _write_chunk(rows: list[dict], staging: str, n: int) -> str:
    """Write listing chunk `n`; returns its path or URI (s3://...), as Ray's reader takes it."""
    uri = f"{staging}/listing-{n:05d}.parquet"
    fs, path = filesystem(uri)
    pq.write_table(pa.Table.from_pylist(rows, schema=LISTING_SCHEMA), path, filesystem=fs)
    return uri


LISTING_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("modality", pa.string())])


def list_directory(input_dir: Path, staging: str) -> Inventory:
    """Walk `input_dir` (recursively, in sorted order) into listing chunks under `staging`."""
    fs, dest = filesystem(staging)
    fs.create_dir(dest, recursive=True)
    inv = Inventory("dir", str(input_dir), [])
    rows: list[dict] = []
    for dirpath, dirnames, filenames in os.walk(input_dir):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            modality = modality_of(name)
            if modality is None:
                inv.skipped += 1
                continue
            rows.append({"id": path.relative_to(input_dir).as_posix(), "uri": str(path), "modality": modality})
            inv.counts[modality] += 1
            if len(rows) == LISTING_CHUNK:
                inv.files.append(_write_chunk(rows, staging, len(inv.files)))
                rows = []
    if rows or not inv.files:
        inv.files.append(_write_chunk(rows, staging, len(inv.files)))
    return inv


def inspect_parquet(path: Path, passthrough: tuple[str, ...]) -> Inventory:
    """Check a raw-media dataset's columns and count its rows per modality (DuckDB reads only `id`/`modality`)."""
    try:
        dataset = pads.dataset(path, format="parquet")
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot read Parquet dataset {path}: {e}") from None
    names = set(dataset.schema.names)
    if "id" not in names:
        raise SourceError(f"{path}: a raw-media dataset needs an 'id' column (has: {', '.join(sorted(names))})")
    if not names & {"data", "text"}:
        raise SourceError(f"{path}: a raw-media dataset needs a 'data' or 'text' column")
    missing = [c for c in passthrough if c not in names]
    if missing:
        raise SourceError(f"{path}: passthrough column {missing[0]!r} is not in the dataset")
    files = sorted(dataset.files)
    modality_sql = "modality" if "modality" in names else "NULL"
    ext_sql = r"lower(regexp_extract(id, '\.([^./]+)$', 1))"
    counts = Counter()
    skipped = 0
    query = f"SELECT {modality_sql} AS m, CASE WHEN m IS NULL THEN {ext_sql} END, count(*) FROM read_parquet(?) GROUP BY ALL"
    for modality, ext, n in duckdb_connection().execute(query, [files]).fetchall():
        modality = modality or MODALITY_OF.get(ext or "")
        if modality in EXTENSIONS:
            counts[modality] += n
        else:
            skipped += n
    columns = tuple(c for c in ("id", "uri", "modality", "data", "text") if c in names)
    return Inventory("parquet", str(path), files, counts, skipped, columns)


def open_input(input_path: str, staging: str, passthrough: tuple[str, ...] = ()) -> Inventory:
    path = Path(input_path).expanduser().resolve()
    if not path.exists():
        raise SourceError(f"input {input_path} does not exist")
    if path.is_dir() and not any(path.rglob("*.parquet")):
        if passthrough:
            raise SourceError("passthrough columns need a Parquet input; a directory has none")
        return list_directory(path, staging)
    return inspect_parquet(path, passthrough)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def of_modality(batch: pa.Table, modality: str) -> pa.Table:
    """The rows of `modality` in a batch of listing or raw-media rows (the `modality` column, else the id's
    extension). Arrow in, Arrow out: a numpy round trip would turn an all-null column into floats."""
    ids = batch.column("id").to_pylist()
    stated = "modality" in batch.column_names
    given = batch.column("modality").to_pylist() if stated else [None] * len(ids)
    keep = pa.array([(m if m is not None else modality_of(i)) == modality for m, i in zip(given, ids)], type=pa.bool_())
    return batch.filter(keep).drop_columns(["modality"] if stated else [])


def load_rows(batch: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """A batch of one modality's listing or raw-media rows -> rows with bytes and content hashes.

    A file that cannot be read keeps `data` empty and gets its reason in `read_error`.
    """
    n = len(batch["id"])
    uris = batch["uri"] if "uri" in batch else batch["id"]
    data, errors = [], []
    texts = batch["text"] if "text" in batch else [None] * n
    blobs = batch["data"] if "data" in batch else [None] * n
    for uri, blob, text in zip(uris, blobs, texts):
        error = ""
        if blob is None and text is not None:
            blob = text.encode("utf-8")
        elif blob is None and "data" not in batch and "text" not in batch:
            try:
                blob = Path(uri).read_bytes()
            except OSError as e:
                blob, error = b"", f"cannot read {uri}: {e.strerror}"
        elif blob is None:
            blob, error = b"", "row has no data"
        data.append(blob)
        errors.append(error)
    out = {k: v for k, v in batch.items() if k not in ("data", "text", "uri")}
    out["uri"] = np.asarray(uris, dtype=object)
    out["source"] = np.full(n, source, dtype=object)
    out["data"] = np.array(data + [b""], dtype=object)[:n]
    out["content_hash"] = np.array([sha256(b) for b in data], dtype=object)
    out["read_error"] = np.array(errors, dtype=object)
    return out


def skip_done(batch: dict[str, np.ndarray], done: np.ndarray) -> dict[str, np.ndarray]:
    """Drop the rows whose key is in `done` (sorted S32 row keys: what the store already holds)."""
    if len(done) == 0 or len(batch["id"]) == 0:
        return batch
    keys = np.array(
        [row_key(s, i, h) for s, i, h in zip(batch["source"], batch["id"], batch["content_hash"])], dtype="S32"
    )
    at = np.minimum(np.searchsorted(done, keys), len(done) - 1)
    new = done[at] != keys
    return {k: v[new] for k, v in batch.items()}
