"""`mmembed embed` and `mmembed backfill`: jobs that write a store."""

from __future__ import annotations

import argparse
import contextlib
import sys

from encoders.options import FORMATS

from .. import config, output
from ..options import (
    JSON,
    RUNTIME,
    Parser,
    Subparsers,
    address,
    at_least,
    audio_mode,
    command,
    modality,
    verbose,
    wait_lock,
)


def embed_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "embed",
        embed,
        "embed a directory or Parquet dataset into a store",
        "mmembed embed ./media ./store --model image=clip-b32 --model text=minilm-l6,clip-b32",
        description="Embed every image, audio and text item of INPUT into the store at ROOT.",
        parents=(JSON, RUNTIME),
    )
    p.add_argument(
        "input",
        metavar="INPUT",
        nargs="?",
        help="a directory (files routed by extension) or a raw-media Parquet file/directory",
    )
    p.add_argument(
        "root", metavar="ROOT", nargs="?", help="the store: a local directory or a pyarrow.fs URI (s3://...)"
    )
    p.add_argument("--config", metavar="F", help="YAML job config (see configs/default.yaml)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="MODALITY=NAME[,NAME]",
        help="models for a modality (repeatable)",
    )
    address(p)
    p.add_argument(
        "--allow-local-root",
        action="store_true",
        help="allow a local ROOT on a multi-node cluster (a shared filesystem)",
    )
    p.add_argument("--actors", type=at_least(1), metavar="N", help="encoder actors per model")
    p.add_argument(
        "--batch-size",
        type=at_least(1),
        metavar="N",
        help="encoder batch size, every modality (config: batch_size.image/audio/text; preprocessing and writing keep theirs)",
    )
    audio_mode(p, "--whisper-mode", "Whisper features: the clip's frames, or 30 s windows")
    p.add_argument(
        "--passthrough",
        action="append",
        default=[],
        metavar="COLUMN",
        help="input column to copy into the tables (repeatable)",
    )
    p.add_argument("--commit-every", type=at_least(1), metavar="N", help="rows per commit")
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="what INPUT is (default auto: a directory of Parquet files only is a dataset, else raw media)",
    )
    wait_lock(p)
    verbose(p)
    return p


def embed(args: argparse.Namespace) -> int:
    from encoders.options import MODALITIES

    overrides = {k: v for k, v in (("input", args.input), ("root", args.root)) if v}
    if args.address or args.allow_local_root:
        overrides["ray"] = {
            k: v for k, v in (("address", args.address), ("allow_local_root", args.allow_local_root)) if v
        }
    for key in ("actors", "dtype", "device", "whisper_mode", "commit_every", "format"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.batch_size is not None:
        overrides["batch_size"] = dict.fromkeys(MODALITIES, args.batch_size)
    if args.passthrough:
        overrides["passthrough"] = args.passthrough
    cfg = config.load(args.config, overrides)
    if args.model:
        cfg = config.load(args.config, overrides | {"models": {**cfg.models, **config.parse_model_flags(args.model)}})
    report(_run(cfg, wait_lock=args.wait_lock, verbose=args.verbose), args.json)
    return 0


def backfill_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "backfill",
        backfill,
        "embed every recorded input with a (new) model",
        "mmembed backfill ./store --model clip-b32 --modality image",
        description="Embed with MODEL every input the store has recorded (re-reading the original directories and "
        "Parquet datasets) that MODEL has not embedded yet. Inputs that disappeared are reported, not fatal.",
        parents=(JSON, RUNTIME),
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--model", required=True, metavar="NAME", help="the model to backfill with")
    modality(p, "only this modality (default: every one the model embeds)")
    p.add_argument(
        "--config", metavar="F", help="YAML job config for batch sizes, actors, ... (its input/root/models are ignored)"
    )
    address(p)
    wait_lock(p)
    verbose(p)
    return p


def backfill(args: argparse.Namespace) -> int:
    from encoders.model import TOWERS
    from encoders.registry import resolve
    from encoders.weights import read_meta
    from storage.query import QueryError, recorded_inputs

    from ..api import open_store

    open_store(args.root)
    modalities = [args.modality] if args.modality else list(TOWERS[read_meta(resolve(args.model))["kind"]])
    inputs = sorted({src for m in modalities for src in recorded_inputs(args.root, m)})
    if not inputs:
        raise QueryError(f"{args.root} has no recorded {'/'.join(modalities)} inputs to backfill")
    overrides = {"root": args.root, "models": {m: [args.model] for m in modalities}}
    if args.address:
        overrides["ray"] = {"address": args.address}
    for key in ("dtype", "device"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    cfg = config.load(args.config, overrides | {"input": None})
    report(_run(cfg, inputs=inputs, kind="backfill", wait_lock=args.wait_lock, verbose=args.verbose), args.json)
    return 0


def _run(cfg: config.JobConfig, **kwargs) -> dict:
    from ..api import run_job

    with contextlib.redirect_stdout(sys.stderr):  # Ray forwards worker and raylet lines to stdout: keep it for --json
        return run_job(cfg, **kwargs)


SKIPPED_SHOWN = 5  # skipped files the summary on stderr names (the job record names up to 100)


def report(record: dict, as_json: bool) -> None:
    """A job's record: JSON on stdout, or its counts as a table and a summary line on stderr."""
    from ..run import summary

    if as_json:
        output.emit_json(record)
        return
    output.table(
        [
            {"modality/model": k, **{c: v.get(c, 0) for c in ("read", "embedded", "errored", "already_done")}}
            for k, v in record["counts"].items()
        ]
    )
    s = summary(record)
    print(
        f"job {s['job_id']}: {s['embedded']} embedded, {s['errored']} errored, {s['already_done']} already done, "
        f"{s['skipped_files']} files skipped",
        file=sys.stderr,
    )
    if not s["read"]:
        print(
            f"nothing to embed: {', '.join(record['inputs']) or 'the inputs'} hold no image, audio or text items",
            file=sys.stderr,
        )
    named = record.get("skipped", [])
    if named:
        more = s["skipped_files"] - min(len(named), SKIPPED_SHOWN)
        listed = ", ".join(f"{n['id']} ({n['reason']})" for n in named[:SKIPPED_SHOWN])
        print(
            f"skipped: {listed}{f' and {more} more (the job record names {len(named)})' if more > 0 else ''}",
            file=sys.stderr,
        )
    for missing in record.get("missing_inputs", []):
        print(f"input gone: {missing['input']} ({missing['reason']})", file=sys.stderr)
