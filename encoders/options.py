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


@dataclass(frozen=True)
class Options:
    """How to run a model: device (None = cuda if available, else cpu), compute dtype, Whisper mode."""

    device: str | None = None
    dtype: str = "float32"
    audio_mode: str = "trimmed"
    normalize: bool = True

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.audio_mode not in AUDIO_MODES:
            raise ModelLoadError(f"audio mode must be one of {', '.join(AUDIO_MODES)}, not {self.audio_mode!r}")
        if self.dtype == "int8" and self.device == "cuda":
            raise ModelLoadError("dtype int8 runs on the CPU only (PyTorch's quantized CPU kernels): use --device cpu")
        if self.device not in (None, *DEVICES[1:]):
            raise ModelLoadError(f"device must be one of {', '.join(DEVICES[1:])} or None, not {self.device!r}")

    @classmethod
    def of(cls, device: str = "auto", dtype: str = "float32", audio_mode: str = "trimmed") -> Options:
        """Options from a config's or a flag's words, where device "auto" means None."""
        return cls(device=None if device == "auto" else device, dtype=dtype, audio_mode=audio_mode)

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return torch.float32 if self.dtype == "int8" else getattr(torch, self.dtype)
