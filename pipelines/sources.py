"""Inputs: a directory of media files or a raw-media Parquet dataset, local or behind a `pyarrow.fs` URI (s3://...),
as a stream of rows.

Every source yields rows with `id`, `uri`, `source`, `modality`, `data` (file bytes, or
UTF-8 text), `content_hash` and the requested passthrough columns. A directory is listed
once into Parquet chunks (ROOT/_staging/<job>/listing/), so neither the listing nor the data
ever has to fit in the driver.

Routing is one rule (`route`), used by the listing, the Parquet inventory and the read tasks alike, so what the
driver counts is what the pipelines embed: a row's `modality` column where it has a value, else its id's extension
(the text after the last '.' of its last path component, case-insensitive; a name that only starts with '.', like
`.png`, has none, as `Path.suffix` says). A row no rule routes is skipped, counted and named.

A directory is raw media unless every file in it is Parquet (files named `.*` or `_*`, such as `.DS_Store` or
Spark's `_SUCCESS`, do not count), or the user says `--format parquet`; a Parquet file inside raw media is skipped
and named, and the store itself (ROOT, when it lies inside INPUT) is never read as input.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from encoders.options import FORMATS
from storage.schema import PARTITION_COLUMNS, embedding_schema
from storage.store import DUPLICATE, duckdb_connection, row_key

from .errors import SourceError

EXTENSIONS = {
    "image": ("jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp"),
    "audio": ("wav", "flac", "ogg", "mp3"),
    "text": ("txt",),
}
MODALITY_OF = {ext: modality for modality, exts in EXTENSIONS.items() for ext in exts}
LISTING_CHUNK = 50_000  # paths per listing file: bounds the driver's memory while listing
SKIPPED_NAMED = 100  # skipped files or rows a job record names; the rest are only counted
MAX_FILE_BYTES = 2 << 30  # the most of one file a read task holds: a batch of files is in memory at once
_EXTENSION = r"^.+\.(?P<ext>[^.]+)$"  # of a last path component: `a.tar.gz` -> gz, `.png` -> none (a dotfile)
_EXTS = pa.array(list(MODALITY_OF))
_EXT_MODALITY = pa.array(list(MODALITY_OF.values()))
_MODALITIES = pa.array(list(EXTENSIONS))
NO_IDS = np.empty(0, dtype="S16")


def extensions(ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each id's extension, lower-cased; null where it has none."""
    names = pc.replace_substring_regex(ids, r"^.*/", "")  # the last path component
    return pc.utf8_lower(pc.struct_field(pc.extract_regex(names, _EXTENSION), [0]))


def route(ids: pa.Array | pa.ChunkedArray, stated: pa.Array | pa.ChunkedArray | None = None) -> pa.Array:
    """The one routing rule: each row's modality, or null where it has none (the row is skipped).

    `stated` (a `modality` column) wins where it holds a value; an unknown one (`video`) routes nowhere.
    Elsewhere the id's extension decides (see EXTENSIONS)."""
    by_extension = _EXT_MODALITY.take(pc.index_in(extensions(ids.cast(pa.string())), value_set=_EXTS))
    if stated is None:
        return by_extension
    stated = stated.cast(pa.string())  # from large_string, or null when a file's column holds no value at all
    stated = pc.if_else(pc.equal(stated, ""), pa.scalar(None, pa.string()), stated)
    known = pc.if_else(pc.is_in(stated, value_set=_MODALITIES), stated, pa.scalar(None, pa.string()))
    return pc.if_else(pc.is_valid(stated), known, by_extension)


def modality_of(name: str) -> str | None:
    """`route` for one file name."""
    return route(pa.array([name], pa.string()))[0].as_py()


def skip_reason(id_: str | None, stated: str | None = None) -> str:
    """Why `route` routes a row nowhere, in words."""
    if stated:
        return f"modality {stated!r} is not one of {', '.join(EXTENSIONS)}"
    ext = extensions(pa.array([id_], pa.string()))[0].as_py()
    if ext == "parquet":
        return "a Parquet file among media files (--format parquet reads INPUT as a dataset)"
    return f"unknown extension .{ext}" if ext else "no file extension"


@dataclass
class Inventory:
    """What the driver knows about an input before any data moves: row counts per modality."""

    kind: str  # "dir" or "parquet"
    source: str
    files: list[str]  # Parquet files Ray reads (the listing chunks for a directory)
    counts: Counter = field(default_factory=Counter)
    skipped: int = 0
    columns: tuple[str, ...] = ()
    skipped_named: list[dict] = field(default_factory=list)  # the first SKIPPED_NAMED: {input, id, reason}
    duplicates: np.ndarray = field(default_factory=lambda: NO_IDS)  # sorted `id_digest`s of the ids rows share

    def skip(self, id_: str, reason: str | None = None) -> None:
        """Count a skipped file (its reason: `skip_reason`'s unless given), naming the first SKIPPED_NAMED."""
        self.skipped += 1
        if len(self.skipped_named) < SKIPPED_NAMED:
            self.skipped_named.append({"input": self.source, "id": id_, "reason": reason or skip_reason(id_)})


def id_digest(id_: str) -> bytes:
    return hashlib.sha256(id_.encode()).digest()[:16]


def _sorted_digests(ids: list[str]) -> np.ndarray:
    return np.sort(np.array([id_digest(i) for i in ids], dtype="S16"))


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), path)


@lru_cache(maxsize=16)
def _filesystem_of(prefix: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(prefix)[0]


class FileTooLarge(SourceError):
    """A file over MAX_FILE_BYTES: its row is an error, and no more of it is read."""


def read_file(uri: str) -> bytes:
    """The bytes of a local path or a `pyarrow.fs` URI (one filesystem per bucket and process); FileTooLarge past
    MAX_FILE_BYTES, known from the file's size before any of it is read."""
    if is_uri(uri):
        scheme, rest = uri.split("://", 1)
        with _filesystem_of(f"{scheme}://{rest.split('/', 1)[0]}").open_input_file(rest) as f:
            _check_size(f.size())
            return f.read()
    with open(uri, "rb") as f:
        _check_size(os.fstat(f.fileno()).st_size)
        return f.read()


def _check_size(size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise FileTooLarge(
            f"the file is {size / 2**30:.1f} GiB, over the {MAX_FILE_BYTES / 2**30:g} GiB a job reads of one file"
        )


def remove_dir(path: str) -> None:
    fs, path = filesystem(path)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


LISTING_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("modality", pa.string())])


def _write_chunk(rows: pa.Table, staging: str, n: int) -> str:
    """Write listing chunk `n`; returns its path or URI (s3://...), as Ray's reader takes it."""
    uri = f"{staging}/listing-{n:05d}.parquet"
    fs, path = filesystem(uri)
    pq.write_table(rows, path, filesystem=fs)
    return uri


class _Listing:
    """A directory's files, in chunks: routed ones into listing files, the others skipped (and named)."""

    def __init__(self, inv: Inventory, staging: str):
        self.inv, self.staging = inv, staging
        self.ids: list[str] = []
        self.uris: list[str] = []
        self.parquet: list[str] = []  # every Parquet file, in case the directory is a dataset
        self.others = 0  # files that make the directory raw media: routed ones, and unrouted ones but Parquet, .*, _*

    def add(self, rel: str, uri: str) -> None:
        name = rel.rsplit("/", 1)[-1]
        if name.lower().endswith(".parquet") and not name.startswith((".", "_")):
            self.parquet.append(uri)
        self.ids.append(rel)
        self.uris.append(uri)
        if len(self.ids) == LISTING_CHUNK:
            self.flush()

    def flush(self, last: bool = False) -> None:
        ids = pa.array(self.ids, pa.string())
        modality = route(ids)
        routed = pc.is_valid(modality)
        table = pa.table({"id": ids, "uri": pa.array(self.uris, pa.string()), "modality": modality}).filter(routed)
        self.others += table.num_rows
        for i in np.flatnonzero(~routed.to_numpy(zero_copy_only=False)):
            name = self.ids[i].rsplit("/", 1)[-1]
            # what does not make a directory raw media: Parquet files, and unrouted names like .DS_Store or _SUCCESS
            self.others += not (name.lower().endswith(".parquet") or name.startswith((".", "_")))
            self.inv.skip(self.ids[i])
        counts = pc.value_counts(table["modality"]).to_pylist()
        self.inv.counts.update({c["values"]: c["counts"] for c in counts})
        if table.num_rows or (last and not self.inv.files):
            self.inv.files.append(_write_chunk(table.cast(LISTING_SCHEMA), self.staging, len(self.inv.files)))
        self.ids, self.uris = [], []


def _walk_local(top: Path, exclude: Path | None, listing: _Listing) -> None:
    """Every file under `top`, each directory's files (sorted) before its subdirectories (sorted). Skipped and named:
    directories that cannot be listed or are symlinks (not followed: they may loop), and what is not a file (a
    FIFO would block its read forever); a symlink to a file is read as the file."""
    pending = [top]
    while pending:
        here = pending.pop()
        rel = here.relative_to(top).as_posix()
        try:
            with os.scandir(here) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as e:
            listing.inv.skip(f"{rel}/", f"cannot list directory: {e.strerror}")
            continue
        subdirectories = []
        for entry in entries:
            path = here / entry.name
            name = path.relative_to(top).as_posix()
            if entry.is_dir(follow_symlinks=False):
                if exclude is None or path != exclude:
                    subdirectories.append(path)
            elif entry.is_symlink() and entry.is_dir():
                listing.inv.skip(f"{name}/", "a symlinked directory (not followed)")
            elif entry.is_file() or entry.is_symlink():  # a broken link is listed: its row says it cannot be read
                listing.add(name, str(path))
            else:
                listing.inv.skip(name, "not a regular file")
        pending.extend(reversed(subdirectories))


def _walk_uri(fs: pafs.FileSystem, top: str, scheme: str, exclude: str | None, listing: _Listing) -> None:
    infos = fs.get_file_info(pafs.FileSelector(top, recursive=True))
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        if exclude is not None and (info.path == exclude or info.path.startswith(exclude + "/")):
            continue
        listing.add(info.path[len(top) + 1 :], f"{scheme}://{info.path}")


def list_directory(source: str, staging: str, exclude: str | None = None, fmt: str = "auto") -> Inventory:
    """List the directory `source` (a path or URI; recursively, in sorted order) into listing chunks under `staging`;
    a directory of Parquet files only (or any, with fmt "parquet") becomes a Parquet dataset's inventory instead."""
    fs, dest = filesystem(staging)
    fs.create_dir(dest, recursive=True)
    inv = Inventory("dir", source, [])
    listing = _Listing(inv, staging)
    if is_uri(source):
        src_fs, top = filesystem(source)
        skip = filesystem(exclude)[1].rstrip("/") if exclude and is_uri(exclude) else None
        _walk_uri(src_fs, top.rstrip("/"), source.split("://", 1)[0], skip, listing)
    else:
        _walk_local(Path(source), Path(exclude) if exclude and not is_uri(exclude) else None, listing)
    listing.flush(last=True)
    if fmt == "parquet" or (fmt == "auto" and listing.parquet and not listing.others):
        return _parquet_inventory(source, listing.parquet)
    return inv


def _check_columns(schema: pa.Schema, path: str, passthrough: tuple[str, ...]) -> None:
    names = set(schema.names)
    if "id" not in names:
        raise SourceError(f"{path}: a raw-media dataset needs an 'id' column (has: {', '.join(sorted(names))})")
    if not names & {"data", "text"}:
        raise SourceError(f"{path}: a raw-media dataset needs a 'data' or 'text' column")
    for name in RAW_COLUMNS:
        kind = schema.field(name).type if name in names else pa.null()
        binary = name == "data"
        if not (pa.types.is_null(kind) or (_is_binary(kind) if binary else _is_string(kind))):
            words = "binary (the file bytes)" if binary else "strings"
            raise SourceError(f"{path}: column {name!r} must be {words}, not {kind}")
    missing = [c for c in passthrough if c not in names]
    if missing:
        raise SourceError(f"{path}: passthrough column {missing[0]!r} is not in the dataset")
    taken = [c for c in passthrough if c in RESERVED]
    if taken:
        raise SourceError(
            f"passthrough column {taken[0]!r} is one mmembed reads or writes itself: it cannot pass through"
        )
    if len(set(passthrough)) != len(passthrough):
        raise SourceError(f"a passthrough column is named twice: {', '.join(passthrough)}")


RAW_COLUMNS = ("id", "uri", "modality", "data", "text")  # what a raw-media dataset's own columns mean
# Names a passthrough column cannot have: the raw-media columns, the store's, its partitions' and the views' `dim`.
RESERVED = {*RAW_COLUMNS, *embedding_schema(1).names, *PARTITION_COLUMNS, "dim"}


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


def _route_udf(ids: pa.ChunkedArray, stated: pa.ChunkedArray) -> pa.Array:
    return route(ids, stated)


def _parquet_inventory(source: str, files: list[str] | str, passthrough: tuple[str, ...] = ()) -> Inventory:
    """Check a raw-media dataset's columns, count its rows per modality by `route`, find the ids several rows share,
    and name the rows it skips (a DuckDB scan of `id` and `modality` only, through pyarrow.fs)."""
    fs, _ = filesystem(source)
    paths = [filesystem(f)[1] for f in files] if isinstance(files, list) else filesystem(files)[1]
    try:
        dataset = pads.dataset(paths, format="parquet", filesystem=fs)
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot read Parquet dataset {source}: {str(e).splitlines()[0]}") from None
    if not dataset.files:
        raise SourceError(f"{source} holds no Parquet files")
    _check_columns(dataset.schema, source, passthrough)
    names = set(dataset.schema.names)
    scheme = source.split("://", 1)[0] + "://" if is_uri(source) else ""
    inv = Inventory("parquet", source, sorted(scheme + f for f in dataset.files))
    inv.columns = tuple(c for c in RAW_COLUMNS if c in names)
    con = duckdb_connection()
    varchar = duckdb.sqltypes.VARCHAR
    con.create_function("route", _route_udf, [varchar, varchar], varchar, type="arrow", null_handling="special")
    con.register("input", dataset)
    stated = "modality" if "modality" in names else "NULL::VARCHAR"
    con.execute(f"CREATE VIEW routed AS SELECT id, {stated} AS stated, route(id, {stated}) AS m FROM input")
    try:
        counts = con.execute("SELECT m, count(*), count(*) FILTER (id IS NULL OR id = '') FROM routed GROUP BY m")
        for modality, n, no_id in counts.fetchall():
            if no_id:
                raise SourceError(f"{source}: {no_id} row(s) have no id (null or empty); every row needs a unique id")
            if modality is None:
                inv.skipped = n
            else:
                inv.counts[modality] = n
        if inv.skipped:
            named = con.execute(f"SELECT id, stated FROM routed WHERE m IS NULL LIMIT {SKIPPED_NAMED}").fetchall()
            inv.skipped_named = [{"input": source, "id": i, "reason": skip_reason(i, s)} for i, s in named]
        shared = con.execute("SELECT id FROM routed WHERE m IS NOT NULL GROUP BY id HAVING count(*) > 1").fetchall()
        inv.duplicates = _sorted_digests([i for (i,) in shared])
    except (duckdb.Error, pa.ArrowException) as e:
        raise SourceError(f"cannot read Parquet dataset {source}: {str(e).splitlines()[0]}") from None
    finally:
        con.close()
    return inv


def open_input(
    input_path: str, staging: str, passthrough: tuple[str, ...] = (), root: str | None = None, fmt: str = "auto"
) -> Inventory:
    """The inventory of INPUT (a directory, a Parquet file or dataset; a local path or a URI), never reading `root`
    (the store) as part of it."""
    if fmt not in FORMATS:
        raise SourceError(f"input format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    source = input_path.rstrip("/") if is_uri(input_path) else str(Path(input_path).expanduser().resolve())
    try:
        fs, path = filesystem(source)
        kind = fs.get_file_info(path).type
    except (OSError, pa.ArrowException) as e:
        raise SourceError(f"cannot open input {input_path}: {str(e).splitlines()[0]}") from None
    if kind == pafs.FileType.NotFound:
        raise SourceError(f"input {input_path} does not exist")
    if root is not None:
        inside = _inside(root, source)
        if inside is not None:
            raise SourceError(f"input {input_path} {inside} the store {root}: give an input outside it")
    if kind != pafs.FileType.Directory:
        if fmt == "media" or modality_of(source) is not None:
            raise SourceError(f"input {input_path} is a file: give the directory of media files that holds it")
        return _parquet_inventory(source, source, passthrough)
    inv = list_directory(source, staging, root, fmt)
    if inv.kind == "dir" and passthrough:
        raise SourceError("passthrough columns need a Parquet input; a directory of media files has none")
    if inv.kind == "parquet":
        _check_columns(pads.dataset([filesystem(f)[1] for f in inv.files], filesystem=fs).schema, source, passthrough)
    return inv


def _inside(root: str, source: str) -> str | None:
    """'is' or 'is inside' when INPUT is the store ROOT or lies within it; None otherwise."""
    root = root.rstrip("/")
    if root == source:
        return "is"
    return "is inside" if source.startswith(root + "/") else None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def of_modality(batch: pa.Table, modality: str) -> pa.Table:
    """The rows of `modality` in a batch of listing or raw-media rows, by `route`. Arrow in, Arrow out: a numpy round
    trip would turn an all-null column into floats."""
    stated = batch.column("modality") if "modality" in batch.column_names else None
    keep = pc.fill_null(pc.equal(route(batch.column("id"), stated), modality), False)
    return batch.filter(keep).drop_columns(["modality"] if stated is not None else [])


def load_rows(batch: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """A batch of one modality's listing or raw-media rows -> rows with bytes and content hashes.

    A file that cannot be read keeps `data` empty and gets its reason in `read_error` (its kind in
    `read_error_type`)."""
    n = len(batch["id"])
    uris = batch["uri"] if "uri" in batch else batch["id"]
    data, errors, kinds = [], [], []
    texts = batch["text"] if "text" in batch else [None] * n
    blobs = batch["data"] if "data" in batch else [None] * n
    for uri, blob, text in zip(uris, blobs, texts):
        error = kind = ""
        if blob is None and text is not None:
            blob = text.encode("utf-8")
        elif blob is None and "data" not in batch and "text" not in batch:
            try:
                blob = read_file(uri)
            except (OSError, FileTooLarge) as e:  # the file's own failure (gone, unreadable, too large), not the job's
                reason = getattr(e, "strerror", None) or e
                blob, error, kind = b"", f"cannot read {uri}: {reason}", type(e).__name__
        elif blob is None:
            blob, error, kind = b"", "row has no data", "MissingData"
        data.append(blob)
        errors.append(error)
        kinds.append(kind)
    out = {k: v for k, v in batch.items() if k not in ("data", "text", "uri")}
    out["uri"] = np.asarray(uris, dtype=object)
    out["source"] = np.full(n, source, dtype=object)
    out["data"] = np.array(data + [b""], dtype=object)[:n]
    out["content_hash"] = np.array([sha256(b) for b in data], dtype=object)
    out["read_error"] = np.array(errors, dtype=object)
    out["read_error_type"] = np.array(kinds, dtype=object)
    return out


def _in(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    if len(sorted_values) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return sorted_values[at] == values


def tallies(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Which rows of a batch are tally rows (see `skip_done`): they stand for rows done before, and are not embedded."""
    return batch["done_rows"] > 0 if "done_rows" in batch else np.zeros(len(batch["id"]), dtype=bool)


def skip_done(batch: dict[str, np.ndarray], done: np.ndarray, duplicates: np.ndarray = NO_IDS) -> dict[str, np.ndarray]:
    """Mark the rows whose id other input rows share (`duplicates`: sorted `id_digest`s) as errors, and drop the
    rows the store already holds (`done`: sorted S32 row keys, `storage.store.row_key`).

    The dropped rows are counted where they are dropped: the first of them stays, without its bytes, as the batch's
    tally row, whose `done_rows` says how many it stands for (every other row has 0); the steps after it pass it on
    untouched, and the writer reports the count (see `sinks.write_shard`)."""
    n = len(batch["id"])
    batch = dict(batch)
    duplicate = _in(duplicates, np.array([id_digest(i) for i in batch["id"]], dtype="S16"))
    batch.setdefault("read_error_type", np.where(batch["read_error"] != "", "OSError", "").astype(object))
    if duplicate.any():
        batch["read_error"] = batch["read_error"].copy()
        batch["read_error_type"] = batch["read_error_type"].copy()
        batch["read_error"][duplicate] = "duplicate id: other rows of this input have the same id"
        batch["read_error_type"][duplicate] = "DuplicateId"
    hashes = [DUPLICATE + h if d else h for h, d in zip(batch["content_hash"], duplicate)]
    keys = np.array([row_key(s, i, h) for s, i, h in zip(batch["source"], batch["id"], hashes)], dtype="S32")
    old = _in(done, keys)
    batch["done_rows"] = np.zeros(n, dtype=np.int64)
    if not old.any():
        return batch
    keep = ~old
    tally = int(np.flatnonzero(old)[0])
    keep[tally] = True
    batch["done_rows"][tally] = int(old.sum())
    for column, empty in (("data", b""), ("read_error", ""), ("read_error_type", "")):
        batch[column] = batch[column].copy()
        batch[column][tally] = empty
    return {k: v[keep] for k, v in batch.items()}
