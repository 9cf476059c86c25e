"""The interface every encoder offers, whatever its architecture.

A pipeline runs `preprocess` in CPU tasks (one item at a time, pure) and `embed` in an
encoder actor (a batch at a time); `encode` does both, for direct use. Preprocessing is
`Inputs`, which needs a store's settings and never torch: this module imports torch only
where a network is built or run, so the processes that only preprocess (and the driver)
never load it (~1.3 s of CPU and ~200 MB each).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from . import audio, clap_audio, image
from .errors import AudioValidationError, ModelLoadError
from .options import Options
from .text import check_text

if TYPE_CHECKING:
    import torch

    from .weights import StoredModel

log = logging.getLogger(__name__)

DEFAULT_LOGIT_SCALE = 100.0  # CLIP's trained temperature, for a model that has none of its own


def softmax_scores(cosines: np.ndarray, logit_scale: float) -> np.ndarray:
    """cosines (..., n_labels) -> the probability of each label, the labels competing (each row sums to 1)."""
    logits = logit_scale * np.asarray(cosines, dtype=np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


# what each model kind embeds
TOWERS = {
    "clip": ("image", "text"),
    "siglip": ("image", "text"),
    "whisper": ("audio",),
    "bert": ("text",),
    "clap": ("audio", "text"),
}


Item = np.ndarray | str


@dataclass(frozen=True)
class Inputs:
    """A model's preprocessing: one raw item (file bytes, or a text) -> its network's input, on the CPU."""

    name: str
    kind: str
    settings: dict = field(default_factory=dict)  # the store's `preprocess` settings
    options: Options = Options()

    @property
    def modalities(self) -> tuple[str, ...]:
        return TOWERS[self.kind]

    def check(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ModelLoadError(
                f"model {self.name!r} ({self.kind}) has no {modality} tower; it embeds {', '.join(self.modalities)}"
            )

    def __call__(self, modality: str, raw: bytes | str) -> Item:
        self.check(modality)
        if modality == "image":
            return image.load(raw, **self.settings)
        if modality == "audio":
            if not isinstance(raw, (bytes, bytearray, memoryview)):
                raise AudioValidationError(f"audio must be file bytes, not {type(raw).__name__}")
            longest = self.options.max_audio_seconds
            if self.kind == "clap":
                return clap_audio.preprocess(bytes(raw), self.settings, longest)
            samples = audio.decode(bytes(raw), max_seconds=longest)
            return audio.features(samples, self.settings["n_mels"], self.options.audio_mode)
        text = check_text(raw, self.options.max_text_bytes)
        return text.lower() if self.settings.get("lowercase") else text


class Encoder(ABC):
    """A loaded model. Subclasses set `modalities` (`TOWERS` of their kind) and build their network in `build`."""

    modalities: tuple[str, ...] = ()

    def __init__(self, name: str, stored: StoredModel, options: Options = Options()):
        self.name = name
        self.kind = stored.kind
        self.config = stored.config
        self.options = options
        self.stored = stored
        self.inputs = Inputs(name, stored.kind, stored.preprocess, options)

    @cached_property
    def model(self) -> torch.nn.Module:
        """The network, built on first use: preprocessing alone never reads a weight."""
        from . import int8
        from .onednn import computes

        cpu = self.options.torch_device.type == "cpu"
        if cpu and not computes(self.options.torch_dtype):
            log.warning(
                f"{self.name}: this CPU has no {self.options.dtype} instructions, so PyTorch emulates them: "
                "expect it several times slower than float32"
            )
        if self.options.dtype != "int8":
            return self.build(self.stored)
        if cpu and not int8.cpu_has_vnni():
            log.warning(
                f"{self.name}: this CPU has no int8 dot-product instructions (VNNI): int8 runs no faster than float32"
            )
        if not cpu:
            raise ModelLoadError(f"{self.name}: dtype int8 runs on the CPU only")
        return int8.quantize(self.build(self.stored))

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

    def preprocess(self, modality: str, raw: bytes | str) -> Item:
        return self.inputs(modality, raw)

    def score(self, cosines: np.ndarray) -> np.ndarray:
        """Zero-shot classification: cosines (..., n_labels) of items with each label's text embedding -> the
        probabilities the model was trained to give (CLIP, CLAP: a softmax over the labels; SigLIP: a sigmoid per
        label). A model trained for none (a sentence encoder) gets CLIP's softmax at CLIP's trained temperature."""
        return softmax_scores(cosines, DEFAULT_LOGIT_SCALE)

    def zero_shot(self, embeddings: np.ndarray, label_embeddings: np.ndarray) -> np.ndarray:
        """(n, dim) item embeddings, (labels, dim) label text embeddings -> (n, labels) probabilities, by `score`."""
        a = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        b = label_embeddings / np.linalg.norm(label_embeddings, axis=1, keepdims=True)
        return self.score(a @ b.T)

    @abstractmethod
    def embed(self, modality: str, items: Sequence[Item]) -> np.ndarray:
        """Preprocessed items -> (n, dim) float32 embeddings, L2-normalised unless options say not."""

    def encode(self, modality: str, raws: Sequence[bytes | str]) -> np.ndarray:
        return self.embed(modality, [self.preprocess(modality, r) for r in raws])

    def check_modality(self, modality: str) -> None:
        self.inputs.check(modality)

    def finish(self, x: torch.Tensor) -> np.ndarray:
        """Pooled output -> float32 numpy, normalised if asked."""
        import torch

        x = x.float()
        if self.options.normalize:
            x = torch.nn.functional.normalize(x, dim=-1)
        return x.cpu().numpy()
