"""The embedding store: Parquet shards under ROOT, made visible by commit records.

    ROOT/embeddings/modality=<m>/model=<name>/<job>-<uuid>.parquet
    ROOT/errors/modality=<m>/<job>-<uuid>.parquet
    ROOT/_commits/<job>-<seq>.json       {"job_id", "seq", "committed_at", "files", "stats"}
    ROOT/_jobs/<job_id>.json             job records

Workers write shards; the driver commits a batch of them by writing one commit record.
Readers see only the files some commit lists, so a job killed at any moment leaves nothing
half-visible, and `clean_uncommitted` removes what it left behind. ROOT is a local path
(made absolute) or a URI; all file I/O goes through pyarrow.fs.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from encoders.errors import MmembedError

from . import views
from .schema import ERROR_SCHEMA, conform, embedding_dim, embedding_schema

TABLES = ("embeddings", "errors")  # the data tables under ROOT, each a tree of partitioned Parquet files
MODALITIES = ("image", "audio", "text")
COMMITS, JOBS = "_commits", "_jobs"
TMP_SUFFIX = ".tmp"
# Model and job names become path components and SQL literals, so they are kept this plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


KEY_SEP = "\x1f"  # joins source, id and content_hash into a row key; no path or hash holds it
KEY_COLUMNS = ("source", "id", "content_hash")
# An error row for an id that several rows of one input share is done under its content hash with this prefix, so
# that the row is embedded once the input no longer shares its id (and skipped while it still does).
DUPLICATE = "duplicate:"
DUPLICATE_ERROR = "DuplicateId"


def row_key(source: str, id_: str, content_hash: str) -> bytes:
    """The identity of an input row: sha256 of its source, id and content hash (32 bytes)."""
    return hashlib.sha256(f"{source}{KEY_SEP}{id_}{KEY_SEP}{content_hash}".encode()).digest()


def canonical_root(root: str) -> str:
    """The one spelling of a store ROOT: a local path absolute, `~` expanded and symlinks resolved; a URI without a
    trailing '/'. The store, its lock and the scheduler all name a ROOT by it, so `s3://b/x/` and `s3://b/x`, or
    `~/store` and its expansion, are one store with one lock."""
    if "://" in root:
        scheme, rest = root.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}"
    return str(Path(root).expanduser().resolve())


def duckdb_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB without its progress bar, which prints to stdout (into `--json` output)
    whenever a query runs for more than two seconds."""
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    return con


class StoreError(MmembedError):
    """The store, one of its files or records, or a name or table given to it is missing or invalid."""


def check_name(what: str, name: str) -> str:
    """`name` if it is a plain model or job name (letters, digits, '.', '_', '-')."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StoreError(f"{what} name {name!r} must be letters, digits, '.', '_' or '-'")
    return name


def check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise StoreError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    return modality


def partition_of(rel: str) -> dict[str, str]:
    """The hive partition values in a data file's path: {'modality': 'image', 'model': 'clip'}."""
    parts = rel.split("/")[1:-1]
    values = dict(p.split("=", 1) for p in parts if "=" in p)
    if len(values) != len(parts):
        raise StoreError(f"{rel} is not a partitioned data file path")
    return values


class Store:
    """One store ROOT; cheap to build and to pickle (only the root string travels)."""

    def __init__(self, root: str):
        self.root = canonical_root(root)
        self._commits: dict[str, dict] = {}
        self._schemas: dict[str, pa.Schema] = {}

    def __reduce__(self):
        return (Store, (self.root,))

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    @cached_property
    def _fs(self) -> tuple[pafs.FileSystem, str]:
        try:
            return pafs.FileSystem.from_uri(self.root)
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"cannot open store root {self.root}: {e}") from None

    @property
    def fs(self) -> pafs.FileSystem:
        return self._fs[0]

    def path(self, rel: str) -> str:
        """The filesystem path of a ROOT-relative path (what `fs` takes)."""
        return f"{self._fs[1]}/{rel}"

    def uri(self, rel: str) -> str:
        """The absolute path or URI of a ROOT-relative path."""
        return f"{self.root}/{rel}"

    def exists(self) -> bool:
        return self._kind() == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._kind() == pafs.FileType.File

    def _kind(self) -> pafs.FileType:
        try:
            return self.fs.get_file_info(self._fs[1]).type
        except OSError as e:  # an object store that refuses (no such bucket, no access), a path with no permission
            raise StoreError(f"cannot reach the store {self.root}: {str(e).splitlines()[0]}") from None

    # -- writing (in workers) ---------------------------------------------------------

    def write_embeddings(self, modality: str, model: str, table: pa.Table) -> str:
        """Write one uncommitted embeddings shard (an `embedding_schema` table); returns its ROOT-relative path."""
        check_modality(modality)
        check_name("model", model)
        table = conform(table, embedding_schema(embedding_dim(table.schema)))
        return self._write_shard(f"embeddings/modality={modality}/model={model}", table)

    def write_errors(self, modality: str, table: pa.Table) -> str:
        """Write one uncommitted errors shard (an `ERROR_SCHEMA` table); returns its ROOT-relative path."""
        check_modality(modality)
        return self._write_shard(f"errors/modality={modality}", conform(table, ERROR_SCHEMA))

    def _write_shard(self, directory: str, table: pa.Table) -> str:
        jobs = pc.unique(table["job_id"]).to_pylist()
        if len(jobs) != 1:
            raise StoreError(f"a shard needs rows of exactly one job, got job ids {jobs[:3]}")
        rel = f"{directory}/{check_name('job', jobs[0])}-{uuid.uuid4().hex}.parquet"
        # Dictionary-encoding vectors only wastes a page before Parquet falls back to plain.
        dictionary = [n for n in table.column_names if n != "embedding"]
        self._atomic(rel, lambda f: pq.write_table(table, f, compression="zstd", use_dictionary=dictionary))
        return rel

    def _atomic(self, rel: str, write: Callable) -> None:
        """Write `rel` so that it never exists half-written: a temporary name, then a rename.

        Object stores publish an object only once its upload completes, so there the file is
        written in place (their "rename" is a copy).
        """
        final = self.path(rel)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        local = isinstance(self.fs, pafs.LocalFileSystem)
        target = f"{final}.{uuid.uuid4().hex}{TMP_SUFFIX}" if local else final
        try:
            with self.fs.open_output_stream(target) as f:
                write(f)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot write {self.uri(rel)}: {e}") from None
        if local:
            self.fs.move(target, final)

    # -- commits (in the driver) ------------------------------------------------------

    def commit(self, job_id: str, files: list[str], stats: dict | None = None) -> str:
        """Make `files` (ROOT-relative, as the writers returned them) visible in one step."""
        check_name("job", job_id)
        for rel in files:
            if rel.split("/", 1)[0] not in TABLES or ".." in rel.split("/") or not rel.endswith(".parquet"):
                raise StoreError(f"{rel!r} is not a data file path in the store")
        missing = [i.path for i in self.fs.get_file_info([self.path(f) for f in files]) if i.type != pafs.FileType.File]
        if missing:
            raise StoreError(f"cannot commit {missing[0]}: no such file")
        seqs = [r["seq"] for r in self._records() if r["job_id"] == job_id]
        seq = max(seqs, default=0) + 1
        record = {
            "job_id": job_id,
            "seq": seq,
            "committed_at": datetime.now(UTC).isoformat(),
            "files": list(files),
            "stats": stats or {},
        }
        rel = f"{COMMITS}/{job_id}-{seq:06d}.json"
        self._write_json(rel, record)
        self._commits[rel] = record
        self.write_views()
        return rel

    def write_views(self) -> None:
        """ROOT/views.sql: the views of the committed files now, for plain DuckDB (storage/views.py)."""
        embedded = self.partitions("embeddings")
        embeddings = {key: [self.uri(f) for f in files] for key, files in embedded.items()}
        dims = {key: embedding_dim(self.schema(files[0])) for key, files in embedded.items()}
        errors = {modality: [self.uri(f) for f in files] for (modality,), files in self.partitions("errors").items()}
        jobs = self.uri(f"{JOBS}/*.json") if any(i.base_name.endswith(".json") for i in self._list(JOBS)) else None
        text = views.script(embeddings, dims, errors, jobs).encode()
        self._atomic(views.VIEWS_FILE, lambda f: f.write(text))

    def _records(self) -> list[dict]:
        """Every commit record; each is read once, since a record never changes once written."""
        names = [f"{COMMITS}/{i.base_name}" for i in self._list(COMMITS) if i.base_name.endswith(".json")]
        self._commits = {rel: self._commits.get(rel) or self._read_json(rel) for rel in names}
        return list(self._commits.values())

    def _committed(self, kind: str) -> list[str]:
        if kind not in TABLES:
            raise StoreError(f"kind must be one of {', '.join(TABLES)}, not {kind!r}")
        return sorted({f for r in self._records() for f in r["files"] if f.startswith(f"{kind}/")})

    def committed_files(self, kind: str) -> list[str]:
        """Absolute paths (or URIs) of the committed files of `kind` ('embeddings' or 'errors')."""
        return [self.uri(f) for f in self._committed(kind)]

    def partitions(self, kind: str) -> dict[tuple[str, ...], list[str]]:
        """Committed ROOT-relative files of `kind` by partition: (modality, model) or (modality,)."""
        out: dict[tuple[str, ...], list[str]] = {}
        for rel in self._committed(kind):
            out.setdefault(tuple(partition_of(rel).values()), []).append(rel)
        return out

    def clean_uncommitted(self) -> int:
        """Delete data files no commit lists and leftover temporary files; returns how many.

        Only a job holding the ROOT lock may call this: another job's shards are uncommitted
        until that job commits them.
        """
        keep = set(self._committed("embeddings")) | set(self._committed("errors"))
        doomed = [
            i.path
            for kind in TABLES
            for i in self._list(kind, recursive=True)
            if i.type == pafs.FileType.File and i.path.removeprefix(self._fs[1] + "/") not in keep
        ]
        doomed += [i.path for d in (COMMITS, JOBS) for i in self._list(d) if i.base_name.endswith(TMP_SUFFIX)]
        for path in doomed:
            self.fs.delete_file(path)
        return len(doomed)

    # -- reading ----------------------------------------------------------------------

    def schema(self, rel: str) -> pa.Schema:
        """A data file's schema (its footer is read once)."""
        if rel not in self._schemas:
            try:
                self._schemas[rel] = pq.read_schema(self.path(rel), filesystem=self.fs)
            except (OSError, pa.ArrowException) as e:
                raise StoreError(f"cannot read committed file {self.uri(rel)}: {e}") from None
        return self._schemas[rel]

    def dataset(self, files: list[str], schema: pa.Schema | None = None) -> ds.Dataset:
        """The given data files as one dataset; columns missing from a file read as null.

        Without `schema`, it is the union of the files' own schemas.
        """
        if schema is None:
            try:
                schema = pa.unify_schemas([self.schema(f) for f in files])
            except pa.ArrowException as e:
                raise StoreError(
                    f"files in {self.uri(files[0].rsplit('/', 1)[0])} have clashing columns: {e}"
                ) from None
        return ds.dataset([self.path(f) for f in files], schema=schema, filesystem=self.fs, format="parquet")

    def done_keys(self, model: str, content_hashes: Iterable[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Which of `content_hashes` already have a committed embedding by `model`: a bool mask.

        DuckDB scans only the `content_hash` column of that model's committed files.
        """
        check_name("model", model)
        hashes = (
            content_hashes
            if isinstance(content_hashes, (pa.Array, pa.ChunkedArray))
            else pa.array(content_hashes, pa.string())
        )
        files = [f for (_, m), part in self.partitions("embeddings").items() if m == model for f in part]
        if not files or len(hashes) == 0:
            return np.zeros(len(hashes), dtype=bool)
        committed = self.dataset(files, pa.schema([("content_hash", pa.string())]))
        wanted = pa.table({"h": hashes})
        con = duckdb_connection()
        try:
            con.register("committed", committed)
            con.register("wanted", wanted)
            done = con.sql(
                "SELECT DISTINCT content_hash FROM committed WHERE content_hash IN (SELECT h FROM wanted)"
            ).to_arrow_table()
        finally:
            con.close()
        return pc.is_in(hashes, value_set=done["content_hash"]).to_numpy(zero_copy_only=False)

    def done_index(self, modality: str, model: str) -> np.ndarray:
        """Sorted row keys (`row_key`, dtype S32) of every `modality` row `model` has committed, embedded or
        errored: what an incremental run skips. DuckDB reads only the key columns, 32 bytes a row come back."""
        check_modality(modality)
        check_name("model", model)
        duplicate = (
            f"CASE WHEN error_type = '{DUPLICATE_ERROR}' THEN '{DUPLICATE}' || content_hash ELSE content_hash END"
        )
        sources = [
            ("embedded", self.partitions("embeddings").get((modality, model), []), KEY_COLUMNS, "content_hash", "", []),
            (
                "errored",
                self.partitions("errors").get((modality,), []),
                (*KEY_COLUMNS, "model", "error_type"),
                duplicate,
                " WHERE model = ?",
                [model],
            ),
        ]
        con = duckdb_connection()
        try:
            selects, params = [], []
            for name, files, columns, hashed, where, values in sources:
                if (
                    files
                ):  # an Arrow dataset reads through pyarrow.fs, so an object-store ROOT needs no DuckDB extension
                    con.register(name, self.dataset(files, pa.schema([(c, pa.string()) for c in columns])))
                    key = f"unhex(sha256(concat_ws(chr({ord(KEY_SEP)}), source, id, {hashed})))"
                    selects.append(f"SELECT {key} AS k FROM {name}{where}")
                    params += values
            if not selects:
                return np.empty(0, dtype="S32")
            keys = con.execute(" UNION ".join(selects), params).to_arrow_table()["k"].combine_chunks()
        finally:
            con.close()
        fixed = keys.cast(pa.binary(32))
        return np.sort(np.frombuffer(fixed.buffers()[1], dtype="S32", count=len(fixed), offset=fixed.offset * 32))

    # -- job records ------------------------------------------------------------------

    def write_job(self, record: dict) -> None:
        """Write (or replace) ROOT/_jobs/<job_id>.json in one step; needs `job_id` and ISO `started_at`."""
        if not isinstance(record.get("started_at"), str):
            raise StoreError("a job record needs 'started_at' as an ISO-8601 string")
        self._write_json(f"{JOBS}/{check_name('job', record.get('job_id'))}.json", record)

    def jobs(self) -> list[dict]:
        """Every job record, oldest start first."""
        records = [self._read_json(f"{JOBS}/{i.base_name}") for i in self._list(JOBS) if i.base_name.endswith(".json")]
        return sorted(records, key=lambda r: (r["started_at"], r["job_id"]))

    # -- helpers ----------------------------------------------------------------------

    def _list(self, rel: str, recursive: bool = False) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=recursive))

    def _write_json(self, rel: str, obj: dict) -> None:
        try:
            data = json.dumps(obj, indent=1).encode()
        except (TypeError, ValueError) as e:
            raise StoreError(f"cannot write {rel}: the record is not plain JSON ({e})") from None
        self._atomic(rel, lambda f: f.write(data))

    def _read_json(self, rel: str) -> dict:
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return json.loads(f.read())
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read {self.uri(rel)}: {e}") from None
