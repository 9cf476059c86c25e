"""The Parquet weight store: one row per tensor, the model's metadata in the file footer.

Row: `name`, `dtype`, `shape`, `data` (raw little-endian bytes), `sha256` of `data`.
Footer key `mmembed`: JSON with `kind`, `config`, `preprocess` and `tokenizer` (the
tokenizer.json text, or null). A model's digest is the sha256 over that JSON and every
tensor checksum, so it changes whenever any weight or setting does. Reading the metadata or
the digest needs no torch (preprocessing and the driver never import it); tensors do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ModelLoadError, some

if TYPE_CHECKING:
    import torch

SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("data", pa.large_binary()),
        ("sha256", pa.string()),
    ]
)
META_KEY = b"mmembed"
# What converters write. The model home keeps each format's conversions in a directory of their own
# (`registry.models_dir`), so a store an older converter wrote is converted again, not mis-loaded.
FORMAT = 2
LOAD_BATCH = 8  # tensors decoded at once by `load`


@dataclass
class StoredModel:
    kind: str
    config: dict
    tensors: dict[str, torch.Tensor]
    preprocess: dict = field(default_factory=dict)
    tokenizer: str | None = None
    source: str | None = None  # the checkpoint it was converted from; not part of the digest
    checksums: dict[str, str] = field(default_factory=dict)  # verified by `load`, so the digest need not rehash

    def meta(self) -> dict:
        return {"kind": self.kind, "config": self.config, "preprocess": self.preprocess, "tokenizer": self.tokenizer}

    @property
    def digest(self) -> str:
        sums = {name: self.checksums.get(name) or _sha(_tensor_bytes(t)) for name, t in self.tensors.items()}
        return digest_of(self.meta(), sums)


def digest_of(meta: dict, checksums: dict[str, str]) -> str:
    """A model's digest: sha256 over its settings and every tensor's checksum."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(checksums):
        h.update(name.encode())
        h.update(checksums[name].encode())
    return h.hexdigest()[:16]


def read_digest(path: str | Path) -> str:
    """The digest from the footer and the checksum column alone (no tensor data is read)."""
    meta = read_meta(path)
    sums = pq.read_table(path, columns=["name", "sha256"]).to_pydict()
    return digest_of(
        {k: meta.get(k) for k in ("kind", "config", "preprocess", "tokenizer")}, dict(zip(sums["name"], sums["sha256"]))
    )


def _tensor_bytes(t: torch.Tensor) -> bytes:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def _sha(b: bytes | pa.Buffer) -> str:
    return hashlib.sha256(b).hexdigest()


def save(model: StoredModel, path: str | Path) -> Path:
    """Write the store atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(model.tensors)
    blobs = [_tensor_bytes(model.tensors[n]) for n in names]
    table = pa.table(
        {
            "name": names,
            "dtype": [str(model.tensors[n].dtype).removeprefix("torch.") for n in names],
            "shape": [list(model.tensors[n].shape) for n in names],
            "data": blobs,
            "sha256": [_sha(b) for b in blobs],
        },
        schema=SCHEMA,
    ).replace_schema_metadata({META_KEY: json.dumps(model.meta() | {"source": model.source})})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp, compression="none")  # weights barely compress; uncompressed reads ~7x faster
    os.replace(tmp, path)
    return path


def read_meta(path: str | Path) -> dict:
    """The footer metadata alone (cheap: no tensor data is read)."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise ModelLoadError(f"cannot read model store {path}: {e}") from None
    if not schema.metadata or META_KEY not in schema.metadata:
        raise ModelLoadError(f"{path} is not an mmembed model store (no '{META_KEY.decode()}' metadata)")
    return json.loads(schema.metadata[META_KEY])


def load(path: str | Path) -> StoredModel:
    """Read and verify every tensor; a missing file, bad checksum or bad shape raises ModelLoadError."""
    meta = read_meta(path)
    tensors, checksums = {}, {}
    try:
        # A few tensors at a time: one read of the whole table grows a single buffer to the model's size by
        # doubling, which took 2-7 s for a 500 MB store in a fresh process (each step copies and faults pages in).
        for batch in pq.ParquetFile(path, memory_map=True).iter_batches(batch_size=LOAD_BATCH, use_threads=False):
            columns = [batch.column(c).to_pylist() for c in ("name", "dtype", "shape", "sha256")]
            for name, dtype_name, shape, checksum, blob in zip(*columns, batch.column("data")):
                tensors[name] = _tensor(path, name, dtype_name, tuple(shape), checksum, blob.as_buffer())
                checksums[name] = checksum
    except (OSError, pa.ArrowException) as e:
        raise ModelLoadError(f"cannot read model store {path}: {e}") from None
    return StoredModel(
        meta["kind"],
        meta["config"],
        tensors,
        meta.get("preprocess") or {},
        meta.get("tokenizer"),
        meta.get("source"),
        checksums,
    )


def _tensor(
    path: str | Path, name: str, dtype_name: str, shape: tuple[int, ...], checksum: str, blob: pa.Buffer
) -> torch.Tensor:
    """One stored tensor, verified against its checksum and shape, in memory of its own."""
    import torch

    if _sha(blob) != checksum:
        raise ModelLoadError(f"{path}: tensor '{name}' fails its checksum (the store is corrupt)")
    dtype = getattr(torch, dtype_name)
    expect = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    if blob.size != expect:
        raise ModelLoadError(f"{path}: tensor '{name}' has {blob.size} bytes, shape {shape} needs {expect}")
    data = bytearray(blob)
    if dtype == torch.bfloat16:
        return torch.frombuffer(data, dtype=torch.int16).view(torch.bfloat16).reshape(shape)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def load_state(
    module: torch.nn.Module, stored: StoredModel, path: str | Path = "model store", assign: bool = False
) -> None:
    """Strict load: a tensor the module expects but the store lacks (or vice versa) is named.

    assign=True makes the stored tensors the module's parameters (no copy), for a module built on the meta device.
    """
    expected = module.state_dict()
    if missing := expected.keys() - stored.tensors.keys():
        raise ModelLoadError(f"{path}: missing tensor {some(missing)}")
    if extra := stored.tensors.keys() - expected.keys():
        raise ModelLoadError(f"{path}: unexpected tensor {some(extra)}")
    for name, t in stored.tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ModelLoadError(
                f"{path}: tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}"
            )
    module.load_state_dict(stored.tensors, strict=True, assign=assign)
