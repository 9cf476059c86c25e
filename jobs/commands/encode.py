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


def transcribe_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "transcribe",
        transcribe,
        "speech to text with a Whisper model (no Ray, no store)",
        "mmembed transcribe whisper-tiny.en meeting.flac --timestamps --json",
        description="Transcribe audio FILEs with MODEL's decoder, greedily, on 30 s windows, seeking through longer "
        "ones as whisper.transcribe does; silence and noise give an empty text. One line per file: its text, or with "
        "--json one JSON object (id, text, segments).",
        parents=(JSON, RUNTIME),
    )
    p.add_argument("model", metavar="MODEL", help="a Whisper model with its decoder (e.g. whisper-tiny.en)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--timestamps", action="store_true", help="segments with start and end times (s)")
    p.add_argument("--language", metavar="CODE", help="a multilingual model's language (default: detected per file)")
    return p


def transcribe(args: argparse.Namespace) -> int:
    from encoders.errors import EncoderError
    from encoders.options import Options
    from encoders.registry import load_encoder
    from encoders.transcribe import preprocess, transcribe_features

    encoder = load_encoder(args.model, Options.of(args.device or "auto", args.dtype or "float32"))
    if not getattr(encoder, "can_transcribe", False):
        raise EncoderError(f"model {args.model!r} cannot transcribe: it holds no Whisper decoder")
    features, failed = {}, {}
    for name in args.files:
        try:
            features[name] = preprocess(_read(name), encoder.dims.n_mels)
        except EncoderError as e:  # one bad file is its own error line, not the command's
            failed[name] = str(e)
    transcripts = dict(
        zip(features, transcribe_features(encoder, list(features.values()), args.timestamps, args.language))
    )
    for name in args.files:
        if name in failed:
            output.emit_json({"id": name, "error": failed[name]}) if args.json else print(
                f"{name}: error: {failed[name]}", file=sys.stderr
            )
        elif args.json:
            t = transcripts[name]
            output.emit_json({"id": name, "text": t.text, "segments": [s._asdict() for s in t.segments]})
        else:
            print(f"{name}: {transcripts[name].text}")
    return 0 if transcripts else 1
