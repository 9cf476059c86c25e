"""Checkpoint directory -> weight store: detect the format, hand it to its family's converter."""

from __future__ import annotations

import importlib
from pathlib import Path

from . import checkpoint, weights
from .errors import ConversionError
from .weights import StoredModel

# format -> "module:function" of its converter, imported only when used (each imports torch)
CONVERTERS = {
    "hf-clip": "encoders.clip:convert_hf",
    "hf-whisper": "encoders.whisper:convert_hf",
    "ct2-whisper": "encoders.whisper:convert_ct2",
    "hf-bert": "encoders.bert:convert_hf",
    "hf-siglip": "encoders.siglip:convert_hf",
    "openclip": "encoders.openclip:convert",
    "hf-clap": "encoders.clap:convert_hf",
}
BERT_TYPES = ("bert", "roberta", "xlm-roberta")


def detect(src: Path) -> str:
    """The checkpoint format of directory `src`: one of CONVERTERS."""
    if not src.is_dir():
        raise ConversionError(f"{src} is not a checkpoint directory")
    config = checkpoint.read_json_if(src / "config.json")
    openclip = (src / "open_clip_config.json").exists()  # hub repos often hold both formats; HF's config wins
    if config is None:
        if openclip:
            return "openclip"
        raise ConversionError(f"{src} is not a checkpoint directory (no config.json or open_clip_config.json)")
    if (src / "model.bin").exists() and "model_type" not in config:
        return "ct2-whisper"
    model_type = config.get("model_type")
    if model_type in ("clip", "whisper", "siglip", "clap"):
        return f"hf-{model_type}"
    if model_type in BERT_TYPES or any(a.startswith("Bert") for a in config.get("architectures", [])):
        return "hf-bert"
    if openclip:
        return "openclip"
    if model_type == "siglip2":
        raise ConversionError(
            f"{src}: SigLIP 2 NaFlex (model_type 'siglip2', variable resolution) is not supported; "
            "the fixed-resolution SigLIP 2 checkpoints (model_type 'siglip') are"
        )
    raise ConversionError(
        f"{src}: unsupported model_type {model_type!r} "
        "(supported: CLIP, SigLIP, Whisper, CLAP, BERT-family, CTranslate2 Whisper, OpenCLIP)"
    )


def read_checkpoint(src: Path) -> StoredModel:
    module, function = CONVERTERS[detect(src)].split(":")
    stored = getattr(importlib.import_module(module), function)(src)
    stored.source = str(src.resolve())
    return stored


def convert(src: str | Path, dest: str | Path) -> Path:
    return weights.save(read_checkpoint(Path(src)), dest)
