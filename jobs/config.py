"""Job configs: YAML parsed once, here, into frozen dataclasses that reject unknown keys and
wrong types with the key named."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from encoders.errors import MmembedError
from encoders.options import AUDIO_MODES, DEVICES, DTYPES, FORMATS, MAX_AUDIO_SECONDS, MAX_TEXT_BYTES, MODALITIES

MAX_THREADS = 1024  # torch threads in one encoder actor: more than any node has cores


class ConfigError(MmembedError):
    """A job config is unreadable, has an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class BatchSizes:
    """Rows per batch: `preprocess` per decoding task, one per modality per encoder call, `write` per written file."""

    preprocess: int = 64
    image: int = 16
    audio: int = 16
    text: int = 256
    write: int = 2000

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ConfigError(f"batch_size.{f.name}: must be at least 1, not {getattr(self, f.name)}")


@dataclass(frozen=True)
class Limits:
    """The largest item a job embeds: longer audio and larger texts become error rows that name their size. Bounds
    a decoding task's memory: a second of audio is 64 KB of samples and 32 KB of features between the stages."""

    audio_seconds: float = MAX_AUDIO_SECONDS
    text_bytes: int = MAX_TEXT_BYTES

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ConfigError(f"limits.{f.name}: must be positive, not {getattr(self, f.name)}")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    allow_local_root: bool = False


@dataclass(frozen=True)
class JobConfig:
    input: str | None = None
    root: str | None = None
    name: str | None = None
    schedule: str | None = None
    models: dict[str, tuple[str, ...]] = field(default_factory=dict)
    batch_size: BatchSizes = BatchSizes()
    actors: int = 1
    threads_per_actor: int = 0
    device: str = "auto"
    dtype: str = "float32"
    whisper_mode: str = "trimmed"
    passthrough: tuple[str, ...] = ()
    commit_every: int = 10000
    format: str = "auto"
    limits: Limits = Limits()
    ray: RayConfig = RayConfig()

    def __post_init__(self):
        choices = {"device": DEVICES, "dtype": DTYPES, "whisper_mode": AUDIO_MODES, "format": FORMATS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: must be one of {', '.join(allowed)}, not {getattr(self, key)!r}")
        for modality, names in self.models.items():
            if modality not in MODALITIES:
                raise ConfigError(f"models.{modality}: unknown modality (use {', '.join(MODALITIES)})")
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:  # its second pipeline would find every row done, and count each row twice as read
                raise ConfigError(f"models.{modality}: {twice[0]} is named twice")
        for key, least in (("actors", 1), ("commit_every", 1), ("threads_per_actor", 0)):
            if getattr(self, key) < least:
                raise ConfigError(f"{key}: must be at least {least}")
        if self.threads_per_actor > MAX_THREADS:  # torch takes any count, and a matmul on 100000 threads never ends
            raise ConfigError(f"threads_per_actor: must be at most {MAX_THREADS}, not {self.threads_per_actor}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(value, tp, key: str):
    """Convert a parsed YAML value to type `tp`, or raise naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        return _check(value, next(a for a in args if a is not type(None)), key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, key + ".")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {str(k): _check(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return tuple(_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if (tp is bool and isinstance(value, bool)) or (tp is str and isinstance(value, str)):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    return cls(**{k: _check(v, hints[k], prefix + k) for k, v in data.items()})


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "models" else v
    return out


def default_dict() -> dict:
    return yaml.safe_load(resources.files("configs").joinpath("default.yaml").read_text())


def read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job config must be a mapping of keys to values")
    return data


def load(path: str | Path | None = None, overrides: dict | None = None) -> JobConfig:
    """The default config, with the file at `path` and then `overrides` merged over it."""
    data = default_dict()
    if path is not None:
        data = _merge(data, read_yaml(path))
    data = _merge(data, overrides or {})
    return _from_dict(JobConfig, data)


def parse_model_flags(flags: list[str]) -> dict[str, tuple[str, ...]]:
    """['image=clip-b32', 'text=a,b'] -> {'image': ('clip-b32',), 'text': ('a', 'b')}."""
    models = {}
    for flag in flags:
        modality, sep, names = flag.partition("=")
        if not sep or modality not in MODALITIES or not names.strip():
            raise ConfigError(
                f"--model {flag!r}: expected MODALITY=NAME[,NAME...] with MODALITY one of {', '.join(MODALITIES)}"
            )
        models[modality] = tuple(n.strip() for n in names.split(",") if n.strip())
    return models
