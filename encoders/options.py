"""How a model runs, and the choices every layer accepts: the one source of the modalities, dtypes, devices and
Whisper feature modes that the configs, the CLI and the encoders check. Importable without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ModelLoadError

if TYPE_CHECKING:
    import torch

MODALITIES = ("image", "audio", "text")  # what an input item is, and what an encoder tower embeds
DTYPES = ("float32", "bfloat16", "float16", "int8")  # int8: quantised linears, the rest in float32 (encoders/int8.py)
DEVICES = ("auto", "cpu", "cuda")  # auto: cuda where there is one
AUDIO_MODES = ("trimmed", "padded")  # Whisper features: the clip's own frames, or whole 30 s windows
FORMATS = ("auto", "media", "parquet")  # what a job's INPUT is: decided by its files, or said by the user
MAX_AUDIO_SECONDS = 3600.0  # the longest clip embedded by default: a longer one is an error naming its length
MAX_TEXT_BYTES = 1_000_000  # the largest text embedded by default (UTF-8 bytes)


@dataclass(frozen=True)
class Options:
    """How to run a model: device (None = cuda if available, else cpu), compute dtype, Whisper mode, and the
    longest audio clip and largest text it takes (longer ones are the item's error, naming their size)."""

    device: str | None = None
    dtype: str = "float32"
    audio_mode: str = "trimmed"
    normalize: bool = True
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    max_text_bytes: int = MAX_TEXT_BYTES

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.audio_mode not in AUDIO_MODES:
            raise ModelLoadError(f"audio mode must be one of {', '.join(AUDIO_MODES)}, not {self.audio_mode!r}")
        if self.dtype == "int8" and self.device == "cuda":
            raise ModelLoadError("dtype int8 runs on the CPU only (PyTorch's quantized CPU kernels): use --device cpu")
        if self.device not in (None, *DEVICES[1:]):
            raise ModelLoadError(f"device must be one of {', '.join(DEVICES[1:])} or None, not {self.device!r}")
        if not (self.max_audio_seconds > 0 and self.max_text_bytes > 0):
            raise ModelLoadError("the audio and text limits must be positive")

    @classmethod
    def of(cls, device: str = "auto", dtype: str = "float32", audio_mode: str = "trimmed") -> Options:
        """Options from a config's or a flag's words, where device "auto" means None."""
        return cls(device=None if device == "auto" else device, dtype=dtype, audio_mode=audio_mode)

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError("device cuda was asked for, but torch finds no CUDA device here")
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return torch.float32 if self.dtype == "int8" else getattr(torch, self.dtype)
