"""Checkpoint directory -> weight store: detect the format, hand it to the model's converter."""

from __future__ import annotations

import json
from pathlib import Path

from . import store
from .errors import ConversionError
from .store import StoredModel


def detect(src: Path) -> str:
    """-> 'ct2-whisper', 'hf-clip', 'hf-whisper', 'hf-clap' or 'hf-bert'."""
    config_path = src / "config.json"
    if not src.is_dir() or not config_path.exists():
        raise ConversionError(f"{src} is not a checkpoint directory (no config.json)")
    config = json.loads(config_path.read_text())
    if (src / "model.bin").exists() and "model_type" not in config:
        return "ct2-whisper"
    model_type = config.get("model_type")
    if model_type == "clip":
        return "hf-clip"
    if model_type == "whisper":
        return "hf-whisper"
    if model_type == "clap":
        return "hf-clap"
    if model_type in ("bert", "roberta", "xlm-roberta") or any(
        a.startswith("Bert") for a in config.get("architectures", [])
    ):
        return "hf-bert"
    raise ConversionError(
        f"{src}: unsupported model_type {model_type!r} (supported: CLIP, Whisper, CLAP, BERT-family, CTranslate2 Whisper)"
    )


def read_checkpoint(src: Path) -> StoredModel:
    fmt = detect(src)
    if fmt == "hf-clip":
        from .clip import convert_hf
    elif fmt == "hf-whisper":
        from .whisper import convert_hf
    elif fmt == "hf-clap":
        from .clap import convert_hf
    elif fmt == "ct2-whisper":
        from .whisper import convert_ct2 as convert_hf
    else:
        from .bert import convert_hf
    stored = convert_hf(src)
    stored.source = str(src.resolve())
    return stored


def convert(src: str | Path, dest: str | Path) -> Path:
    return store.save(read_checkpoint(Path(src)), dest)
