"""The interface every encoder offers, whatever its architecture.

A pipeline runs `preprocess` in CPU tasks (one item at a time, pure) and `embed` in an
encoder actor (a batch at a time); `encode` does both, for direct use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .errors import ModelLoadError
from .store import StoredModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUDIO_MODES = ("trimmed", "padded")


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

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


Item = np.ndarray | str


class Encoder(ABC):
    """A loaded model. Subclasses set `modalities` and build their network in `__init__`."""

    modalities: tuple[str, ...] = ()

    def __init__(self, name: str, stored: StoredModel, options: Options = Options()):
        self.name = name
        self.kind = stored.kind
        self.config = stored.config
        self.options = options
        self.stored = stored

    @cached_property
    def model(self) -> torch.nn.Module:
        """The network, built on first use: preprocessing alone never reads a weight."""
        return self.build(self.stored)

    @abstractmethod
    def build(self, stored: StoredModel) -> torch.nn.Module:
        """The network with the stored weights, on the options' device and dtype, in eval mode."""

    @property
    def digest(self) -> str:
        return self.stored.digest

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of the embedding vectors."""

    @abstractmethod
    def preprocess(self, modality: str, raw: bytes | str) -> Item:
        """One raw item (file bytes, or a text) -> the model input, on the CPU."""

    @abstractmethod
    def embed(self, modality: str, items: Sequence[Item]) -> np.ndarray:
        """Preprocessed items -> (n, dim) float32 embeddings, L2-normalised unless options say not."""

    def encode(self, modality: str, raws: Sequence[bytes | str]) -> np.ndarray:
        return self.embed(modality, [self.preprocess(modality, r) for r in raws])

    def check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ModelLoadError(f"model {self.name!r} ({self.kind}) has no {modality} tower; it embeds {', '.join(self.modalities)}")

    def finish(self, x: torch.Tensor) -> np.ndarray:
        """Pooled output -> float32 numpy, normalised if asked."""
        x = x.float()
        if self.options.normalize:
            x = torch.nn.functional.normalize(x, dim=-1)
        return x.cpu().numpy()
