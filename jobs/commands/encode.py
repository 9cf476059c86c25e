"""`mmembed encode`: one model over files and texts, no Ray, no store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import output
from ..options import JSON, RUNTIME, Parser, Subparsers, audio_mode, command


def encode_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "encode",
        encode,
        "encode files or texts with one model (no Ray, no store)",
        "mmembed encode whisper-tiny.en speech.wav --mode padded --json",
        description="Encode FILEs (modality from the extension) and --text strings directly with MODEL.",
        parents=(JSON, RUNTIME),
    )
    p.add_argument("model", metavar="MODEL", help="a model name (see 'mmembed models list') or a store file")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--text", action="append", default=[], metavar="T", help="a text to encode (repeatable)")
    audio_mode(p, "--mode", "Whisper features (default trimmed)", default="trimmed")
    return p


def encode(args: argparse.Namespace) -> int:
    from encoders.errors import EncoderError
    from encoders.options import Options
    from encoders.registry import load_encoder
    from pipelines.sources import modality_of

    from ..config import ConfigError

    if not args.files and not args.text:
        raise ConfigError("nothing to encode: give FILEs and/or --text")
    encoder = load_encoder(args.model, Options.of(args.device or "auto", args.dtype or "float32", args.mode))
    items = [(f, modality_of(f), None) for f in args.files] + [(t, "text", t) for t in args.text]
    results = []
    for name, modality, text in items:
        try:
            if modality is None:
                raise EncoderError(f"unknown file type {Path(name).suffix!r} (images, audio or .txt)")
            raw = text if text is not None else _read(name)
            encoder.check_modality(modality)
            vector = encoder.encode(modality, [raw])[0]
            results.append(
                {"id": name, "model": encoder.name, "dim": int(vector.shape[0]), "embedding": vector.tolist()}
            )
        except EncoderError as e:
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


def _read(path: str) -> bytes:
    from encoders.errors import EncoderError

    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise EncoderError(f"cannot read {path}: {e.strerror}") from None
