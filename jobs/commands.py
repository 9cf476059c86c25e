"""One function per CLI command: parsed args in, library calls, output out."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from encoders.errors import EncoderError
from encoders.model import Options
from encoders.registry import list_models, load_encoder, models_dir
from pipelines.errors import ResourceError, SourceError
from pipelines.sources import modality_of
from storage import index
from storage.lock import LockError
from storage.query import QueryError, build_index, connect, run_readonly, search
from storage.query import classify as classify_rows
from storage.store import Store, StoreError

from . import config, output
from .config import ConfigError

USER_ERRORS = (EncoderError, ConfigError, SourceError, ResourceError, StoreError, QueryError, LockError, OSError)


def _options(args: argparse.Namespace, **extra) -> Options:
    device = getattr(args, "device", None)
    return Options(
        device=None if device in (None, "auto") else device, dtype=getattr(args, "dtype", None) or "float32", **extra
    )


def encode(args: argparse.Namespace) -> int:
    if not args.files and not args.text:
        raise ConfigError("nothing to encode: give FILEs and/or --text")
    encoder = load_encoder(args.model, _options(args, audio_mode=args.mode))
    items = [(f, modality_of(f), None) for f in args.files] + [(t, "text", t) for t in args.text]
    results = []
    for name, modality, text in items:
        try:
            if modality is None:
                raise EncoderError(f"unknown file type {Path(name).suffix!r} (images, audio or .txt)")
            raw = text if text is not None else Path(name).read_bytes()
            encoder.check_modality(modality)
            vector = encoder.encode(modality, [raw])[0]
            results.append(
                {"id": name, "model": encoder.name, "dim": int(vector.shape[0]), "embedding": vector.tolist()}
            )
        except (EncoderError, OSError) as e:
            results.append({"id": name, "error": str(e)})
    for r in results:
        if args.json:
            output.emit_json(r)
        elif "error" in r:
            print(f"{r['id']}: error: {r['error']}", file=sys.stderr)
    if not args.json:
        output.table(
            [{"id": r["id"], "dim": r["dim"], "embedding": r["embedding"]} for r in results if "error" not in r]
        )
    return 0 if any("error" not in r for r in results) else 1


def embed(args: argparse.Namespace) -> int:
    from .run import run_job

    overrides = {k: v for k, v in (("input", args.input), ("root", args.root)) if v}
    if args.address or args.allow_local_root:
        overrides["ray"] = {
            k: v for k, v in (("address", args.address), ("allow_local_root", args.allow_local_root)) if v
        }
    for key in ("actors", "dtype", "device", "whisper_mode", "commit_every"):
        if getattr(args, key, None) is not None:
            overrides[key] = getattr(args, key)
    if args.batch_size:
        overrides["batch_size"] = {"image": args.batch_size, "audio": args.batch_size, "text": args.batch_size}
    if args.passthrough:
        overrides["passthrough"] = args.passthrough
    cfg = config.load(args.config, overrides)
    if args.model:
        cfg = config.load(args.config, overrides | {"models": {**cfg.models, **config.parse_model_flags(args.model)}})
    with contextlib.redirect_stdout(sys.stderr):  # Ray forwards worker and raylet lines to stdout: keep it for --json
        record = run_job(cfg, wait_lock=args.wait_lock)
    _report(record, args.json)
    return 0


def _report(record: dict, as_json: bool) -> None:
    from .run import summary

    if as_json:
        output.emit_json(record)
    else:
        output.table(
            [
                {"modality/model": k, **{c: v.get(c, 0) for c in ("read", "embedded", "errored")}}
                for k, v in record["counts"].items()
            ]
        )
        s = summary(record)
        print(
            f"job {s['job_id']}: {s['embedded']} embedded, {s['errored']} errored, {s['already_done']} already done, "
            f"{s['skipped_files']} files skipped",
            file=sys.stderr,
        )
        for missing in record.get("missing_inputs", []):
            print(f"input gone: {missing['input']} ({missing['reason']})", file=sys.stderr)


def backfill(args: argparse.Namespace) -> int:
    from encoders.model import MODALITIES
    from encoders.registry import resolve
    from encoders.weights import read_meta
    from storage.query import recorded_inputs

    from .run import run_job

    kind = read_meta(resolve(args.model))["kind"]
    modalities = [args.modality] if args.modality else list(MODALITIES[kind])
    inputs = sorted({src for m in modalities for src in recorded_inputs(args.root, m)})
    if not inputs:
        raise QueryError(f"{args.root} has no recorded {'/'.join(modalities)} inputs to backfill")
    overrides = {"root": args.root, "models": {m: [args.model] for m in modalities}}
    if args.address:
        overrides["ray"] = {"address": args.address}
    for key in ("dtype", "device"):
        if getattr(args, key, None):
            overrides[key] = getattr(args, key)
    cfg = config.load(args.config, overrides | {"input": None})
    with contextlib.redirect_stdout(sys.stderr):
        record = run_job(cfg, inputs=inputs, kind="backfill", wait_lock=args.wait_lock)
    _report(record, args.json)
    return 0


def schedule(args: argparse.Namespace) -> int:
    from storage.lock import RootLock

    from .run import embed_locked
    from .schedule import Scheduler

    configs = [
        config.load(path, {"name": config.read_yaml(path).get("name") or Path(path).stem}) for path in args.configs
    ]
    for cfg in configs:
        if not cfg.input or not cfg.root:
            raise ConfigError(f"job {cfg.name!r}: a scheduled job needs `input` and `root` in its config")
    scheduler = Scheduler(configs, run_job=embed_locked, lock_factory=RootLock)
    if not args.once:
        scheduler.run_forever()
        return 0
    results = scheduler.run_once()
    for r in results:
        print(
            f"{r['job']}: {r['status']} (scheduled {r['scheduled']}){': ' + str(r['error']) if r.get('error') else ''}",
            file=sys.stderr,
        )
    return 0 if all(r["status"] != "failed" for r in results) else 1


def submit(args: argparse.Namespace) -> int:
    from .submit import submit_job

    return submit_job(args.config, args.cluster, wait=args.wait)


@lru_cache(maxsize=8)
def cached_encoder(name: str):
    return load_encoder(name)


def embed_query(model: str, modality: str, value: str) -> np.ndarray:
    """The embedder behind SQL's embed_text/embed_image/embed_audio and `query`: text, or a file path."""
    raw = value if modality == "text" else Path(value).read_bytes()
    encoder = cached_encoder(model)
    encoder.check_modality(modality)
    return encoder.encode(modality, [raw])[0]


def _pick_model(root: str, modality: str, query_modality: str, model: str | None) -> str:
    models = sorted({m for mod, m in Store(root).partitions("embeddings") if mod == modality})
    if model:
        if model not in models:
            raise QueryError(
                f"no {modality} embeddings from model {model!r} in {root} (models there: {', '.join(models) or 'none'})"
            )
        return model
    able = [m for m in models if query_modality in cached_encoder(m).modalities]
    if not able:
        raise QueryError(f"no {modality} embeddings in {root} from a model that can encode a {query_modality} query")
    if len(able) > 1:
        raise QueryError(f"several models hold {modality} embeddings ({', '.join(able)}): choose one with --model")
    return able[0]


def query(args: argparse.Namespace) -> int:
    query_modality, value = next(
        (m, v) for m, v in (("text", args.text), ("image", args.image), ("audio", args.audio)) if v is not None
    )
    modality = args.modality or query_modality
    if not Path(args.root).exists() and "://" not in args.root:
        raise QueryError(f"no store at {args.root}")
    model = _pick_model(args.root, modality, query_modality, args.model)
    vector = embed_query(model, query_modality, value)
    if not args.exact and args.where is None:
        _note_index(args.root, modality, model)
    rows = search(
        args.root,
        vector,
        modality,
        model,
        k=args.k,
        where=args.where,
        use_index=not args.exact,
        ef_search=args.ef_search,
    ).to_pylist()
    if args.json:
        output.emit_json(rows)
    else:
        output.table(rows, ["score", "id", "modality", "model", "uri"])
    return 0


def _note_index(root: str, modality: str, model: str) -> None:
    store = Store(root)
    found = index.state(store, modality, model, store.partitions("embeddings").get((modality, model), ()))
    if found == "fresh":
        print(f"searching the HNSW index of {modality}/{model} (approximate; --exact to scan)", file=sys.stderr)
    elif found == "stale":
        print(
            f"the HNSW index of {modality}/{model} predates its latest commit: searching exactly "
            f"(rebuild with `mmembed index {root}`)",
            file=sys.stderr,
        )


def build_indexes(args: argparse.Namespace) -> int:
    options = {k: v for k, v in (("M", args.m), ("ef_construction", args.ef_construction)) if v is not None}
    rows = build_index(args.root, args.modality, args.model, force=args.force, options=options)
    output.emit_json(rows) if args.json else output.table(rows)
    return 0


DEFAULT_LOGIT_SCALE = 100.0  # CLIP's trained temperature, for a model that stores none (a sentence encoder)


def classify(args: argparse.Namespace) -> int:
    labels = list(dict.fromkeys(label.strip() for label in args.labels.split(",") if label.strip()))
    if len(labels) < 2:
        raise ConfigError(f"--labels needs at least two comma-separated labels, got {labels}")
    if not Path(args.root).exists() and "://" not in args.root:
        raise QueryError(f"no store at {args.root}")
    model = _pick_model(args.root, args.modality, "text", args.model)
    encoder = cached_encoder(model)
    scale = getattr(encoder, "logit_scale", DEFAULT_LOGIT_SCALE)
    result = classify_rows(
        args.root, encoder.encode("text", labels), labels, args.modality, model, scale, where=args.where
    )
    if args.out:
        pq.write_table(result, args.out)
        print(f"wrote {result.num_rows} rows to {args.out}", file=sys.stderr)
    counts = Counter(result["label"].to_pylist())
    print(", ".join(f"{label}: {counts[label]}" for label in labels), file=sys.stderr)
    if args.json:
        output.emit_json(result.to_pylist())
    elif not args.out:
        output.table(result.to_pylist(), ["label", "probability", "id"])
    return 0


def sql(args: argparse.Namespace) -> int:
    con = connect(args.root, embedder=embed_query)
    rows = run_readonly(con, args.statement).to_pylist()
    if args.json:
        output.emit_json(rows)
    else:
        output.table(rows)
    return 0


def jobs(args: argparse.Namespace) -> int:
    records = Store(args.root).jobs()
    if args.json:
        output.emit_json(records)
        return 0
    rows = []
    for r in records:
        counts = r.get("counts", {}).values()
        rows.append(
            {
                "job_id": r["job_id"],
                "kind": r.get("kind"),
                "status": r["status"],
                "started_at": r["started_at"],
                "embedded": sum(c.get("embedded", 0) for c in counts),
                "errored": sum(c.get("errored", 0) for c in counts),
                "wall_s": r.get("stages_s", {}).get("wall"),
            }
        )
    output.table(rows)
    return 0


def models_list(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": m.name,
            "kind": m.kind,
            "source": m.source,
            "size_mb": round(m.size_bytes / 1e6, 1) if m.size_bytes else None,
            "path": str(m.path) if m.path else "(converted on first use)",
        }
        for m in list_models()
    ]
    output.emit_json(rows) if args.json else output.table(rows)
    return 0


def models_convert(args: argparse.Namespace) -> int:
    from encoders.convert import convert

    path = convert(args.src, models_dir() / f"{args.name}.parquet")
    info = {"name": args.name, "path": str(path), "size_mb": round(path.stat().st_size / 1e6, 1)}
    output.emit_json(info) if args.json else print(
        f"converted {args.src} -> {args.name} ({path}, {info['size_mb']} MB)"
    )
    return 0


def models_validate(args: argparse.Namespace) -> int:
    from encoders.validate import validate

    report = validate(args.name)
    output.emit_json(report.to_dict()) if args.json else print(report)
    return 0 if report.passed else 1


def demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out))
    return 0


def bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)
