"""`mmembed models list | convert | validate`: the bundled and converted models."""

from __future__ import annotations

import argparse

from .. import output
from ..options import JSON, Parser, Subparsers, command


def models_parser(sub: Subparsers) -> Parser:
    p = sub.add_parser(
        "models",
        help="list, convert and validate models",
        description="Models: bundled ones and checkpoints converted into $MMEMBED_HOME (default ~/.cache/mmembed).",
        epilog="example:\n  mmembed models convert path/to/clip-vit-base-patch32 clip-b32",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="models_command", metavar="ACTION", parser_class=Parser, required=True)
    command(actions, "list", models_list, "bundled and converted models", "mmembed models list", parents=(JSON,))
    convert = command(
        actions,
        "convert",
        models_convert,
        "convert a checkpoint directory into a model store",
        "mmembed models convert path/to/clip-vit-base-patch32 clip-b32",
        description="Convert a Hugging Face CLIP, Whisper or BERT checkpoint directory, or a CTranslate2 Whisper "
        "model.bin directory (detected automatically), into the model home as NAME.",
        parents=(JSON,),
    )
    convert.add_argument("src", metavar="SRC")
    convert.add_argument("name", metavar="NAME")
    validate = command(
        actions,
        "validate",
        models_validate,
        "parity check against the reference implementation",
        "mmembed models validate minilm-l6",
        description="Compare our encoder with the reference (transformers, sentence-transformers or ctranslate2; "
        "install them with pip install 'mmembed[dev]') and print the cosine figures.",
        parents=(JSON,),
    )
    validate.add_argument("name", metavar="NAME")
    return p


def models_list(args: argparse.Namespace) -> int:
    from encoders.registry import list_models

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
    from encoders.registry import models_dir
    from storage.store import check_name

    path = convert(args.src, models_dir() / f"{check_name('model', args.name)}.parquet")
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
