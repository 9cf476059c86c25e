"""`mmembed models validate NAME`: our encoder against the reference implementation of its checkpoint.

The reference is picked by the format of the checkpoint the store was converted from:
sentence-transformers for BERT-family models, CTranslate2 or transformers' WhisperModel for
Whisper, transformers' CLIPModel for CLIP (a CLIP store with no checkpoint on disk, such as
one this project trained, is exported to a Hugging Face directory first). Both run in fp32 on
the CPU over a few built-in samples; every sample must reach cosine >= THRESHOLD.
"""

from __future__ import annotations

import importlib
import io
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from . import registry, weights
from .convert import detect
from .errors import EncoderError, ModelLoadError
from .model import Encoder, Options

THRESHOLD = 0.9999  # the project's parity standard, per example, fp32
OPTIONS = Options(
    device="cpu", dtype="float32", audio_mode="padded"
)  # padded: the reference encodes whole 30 s windows
SAMPLE_RATE = 16000  # Hz; sample clips are written at Whisper's rate so both sides read the same samples

SAMPLE_TEXTS = (
    "A man is eating food.",
    "hi",
    "Naïve café owners in Zürich serve crème brûlée — 東京 and Москва too! 🙂",
    "What?! No... yes; maybe: (probably) [definitely] {not} <sure> 100% $5.00",
    "a small red circle on a grey background",
    " ".join(f"sentence {i} keeps going and going" for i in range(80)),  # past every model's token limit
)


class MissingReferenceError(EncoderError):
    """The reference package needed to validate this kind of model is not installed."""


@dataclass(frozen=True)
class ExampleResult:
    modality: str
    label: str
    cosine: float


@dataclass(frozen=True)
class ValidationReport:
    name: str
    kind: str
    reference: str
    examples: tuple[ExampleResult, ...]
    threshold: float = THRESHOLD

    @property
    def min_cosine(self) -> float:
        return min(e.cosine for e in self.examples)

    @property
    def passed(self) -> bool:
        return self.min_cosine >= self.threshold

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "reference": self.reference,
            "threshold": self.threshold,
            "min_cosine": self.min_cosine,
            "passed": self.passed,
            "examples": [{"modality": e.modality, "label": e.label, "cosine": e.cosine} for e in self.examples],
        }


def _require(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingReferenceError(
            f"validation needs {package} as the reference ({e}); install it with: pip install 'mmembed[dev]'"
        ) from None


def _compare(modality: str, labels: list[str], ours: np.ndarray, theirs: np.ndarray) -> list[ExampleResult]:
    theirs = np.asarray(theirs, dtype=np.float64)
    ours = np.asarray(ours, dtype=np.float64)
    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    return [ExampleResult(modality, label, float(c)) for label, c in zip(labels, cos)]


def _text_labels() -> list[str]:
    return [t if len(t) <= 40 else t[:37] + "..." for t in SAMPLE_TEXTS]


def sample_images() -> dict[str, bytes]:
    """A few PNGs of different sizes and content, made in memory."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 300, dtype=np.float32)
    gradient = np.stack(
        [np.tile(x, (200, 1)), np.tile(x[::-1], (200, 1)), np.full((200, 300), 90, np.float32)], axis=-1
    )
    checker = (np.indices((224, 224)).sum(0) // 28 % 2 * 255).astype(np.uint8)
    shape = Image.new("RGB", (500, 375), (128, 128, 128))
    ImageDraw.Draw(shape).ellipse((180, 120, 320, 260), fill=(220, 30, 30))
    images = {
        "gradient 300x200": Image.fromarray(gradient.astype(np.uint8)),
        "noise 64x64": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        "checkerboard 224x224 (grey)": Image.fromarray(checker, mode="L"),
        "red circle 500x375": shape,
    }
    out = {}
    for label, image in images.items():
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out[label] = buf.getvalue()
    return out


def sample_clips() -> dict[str, np.ndarray]:
    """A few mono float32 clips at SAMPLE_RATE, made in memory."""
    rng = np.random.default_rng(0)

    def t(seconds: float) -> np.ndarray:
        return np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE

    harmonics = sum(np.sin(2 * np.pi * 140 * k * t(3.0)) / k for k in range(1, 12)) * (
        0.5 + 0.5 * np.sin(2 * np.pi * 3 * t(3.0))
    )
    clips = {
        "sine 440 Hz 2 s": 0.5 * np.sin(2 * np.pi * 440 * t(2.0)),
        "chirp 200-4000 Hz 3.5 s": 0.4 * np.sin(2 * np.pi * (200 * t(3.5) + (3800 / 7.0) * t(3.5) ** 2)),
        "noise 1 s": 0.1 * rng.standard_normal(SAMPLE_RATE),
        "voiced buzz 3 s": 0.1 * harmonics,
    }
    return {label: clip.astype(np.float32) for label, clip in clips.items()}


def _wav(samples: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _whisper_features(clips: dict[str, np.ndarray], n_mels: int) -> np.ndarray:
    """-> (n_clips, n_mels, 3000): transformers' feature extractor, each clip padded to 30 s."""
    transformers = _require("transformers", "transformers")
    extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
    return extractor(list(clips.values()), sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"].astype(
        np.float32
    )


def _ours_audio(encoder: Encoder, clips: dict[str, np.ndarray]) -> np.ndarray:
    return encoder.encode("audio", [_wav(c) for c in clips.values()])


def bert_reference(encoder: Encoder, src: Path) -> list[ExampleResult]:
    st = _require("sentence_transformers", "sentence-transformers")
    theirs = st.SentenceTransformer(str(src), device="cpu").encode(list(SAMPLE_TEXTS), convert_to_numpy=True)
    return _compare("text", _text_labels(), encoder.encode("text", SAMPLE_TEXTS), theirs)


def whisper_ct2_reference(encoder: Encoder, src: Path) -> list[ExampleResult]:
    ctranslate2 = _require("ctranslate2", "ctranslate2")
    clips = sample_clips()
    features = _whisper_features(clips, encoder.dims.n_mels)
    model = ctranslate2.models.Whisper(str(src), device="cpu", compute_type="float32")
    hidden = np.asarray(model.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    return _compare("audio", list(clips), _ours_audio(encoder, clips), hidden.mean(axis=1))


def whisper_hf_reference(encoder: Encoder, src: Path) -> list[ExampleResult]:
    transformers = _require("transformers", "transformers")
    import torch

    clips = sample_clips()
    features = torch.from_numpy(_whisper_features(clips, encoder.dims.n_mels))
    with torch.no_grad():
        hidden = transformers.WhisperModel.from_pretrained(src).eval().encoder(features).last_hidden_state
    return _compare("audio", list(clips), _ours_audio(encoder, clips), hidden.mean(dim=1).numpy())


def clip_reference(encoder: Encoder, src: Path) -> list[ExampleResult]:
    transformers = _require("transformers", "transformers")
    import torch
    from PIL import Image

    images = sample_images()
    model = transformers.CLIPModel.from_pretrained(src).eval()
    processor = transformers.CLIPImageProcessorPil.from_pretrained(src)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    pixels = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images.values()], return_tensors="pt")[
        "pixel_values"
    ]
    tokens = tokenizer(list(SAMPLE_TEXTS), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_ref = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        text_ref = model.get_text_features(**tokens).pooler_output.numpy()
    return _compare("image", list(images), encoder.encode("image", list(images.values())), image_ref) + _compare(
        "text", _text_labels(), encoder.encode("text", SAMPLE_TEXTS), text_ref
    )


REFERENCES: dict[str, tuple[str, Callable[[Encoder, Path], list[ExampleResult]]]] = {
    "hf-bert": ("sentence-transformers SentenceTransformer", bert_reference),
    "ct2-whisper": ("ctranslate2 Whisper encoder", whisper_ct2_reference),
    "hf-whisper": ("transformers WhisperModel encoder", whisper_hf_reference),
    "hf-clip": ("transformers CLIPModel", clip_reference),
}


def validate(name: str) -> ValidationReport:
    """Run model NAME (a registry name or store path) and its reference on the built-in samples."""
    path = registry.resolve(name)
    encoder = registry.load_encoder(name, OPTIONS)
    source = weights.read_meta(path).get("source")
    with tempfile.TemporaryDirectory(prefix="mmembed-validate-") as tmp:
        if source and Path(source, "config.json").exists():
            src = Path(source)
        elif encoder.kind == "clip":
            from .clip import export_hf

            src = export_hf(weights.load(path), Path(tmp))
        else:
            where = f"its source {source} is gone" if source else "it records no source checkpoint"
            raise ModelLoadError(
                f"cannot validate {name!r}: {where}; convert it again from the checkpoint with 'mmembed models convert SRC NAME'"
            )
        reference, run = REFERENCES[detect(src)]
        examples = tuple(run(encoder, src))
    return ValidationReport(encoder.name, encoder.kind, reference, examples)
