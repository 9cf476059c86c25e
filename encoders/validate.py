"""`mmembed models validate NAME`: our encoder against the reference implementation of its checkpoint.

The reference is picked by the format of the checkpoint the store was converted from:
sentence-transformers for BERT-family models, CTranslate2 or transformers' WhisperModel for
Whisper, transformers' CLIPModel for CLIP (a CLIP store with no checkpoint on disk, such as
one this project trained, is exported to a Hugging Face directory first), transformers'
SiglipModel for SigLIP and open_clip's own model code for OpenCLIP checkpoints. Both run in
fp32 on the CPU over a few built-in samples; every sample must reach cosine >= THRESHOLD.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import io
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np

from . import checkpoint, registry, weights
from .convert import detect
from .errors import EncoderError, ModelLoadError
from .model import Encoder
from .options import Options

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

    def __str__(self) -> str:
        """One line per example (its cosine, and whether it reaches the threshold), then the verdict."""
        width = max(len(e.label) for e in self.examples)
        lines = [f"{self.name} ({self.kind}) against {self.reference}, cosine >= {self.threshold} on every example:"]
        lines += [
            f"  {'ok  ' if e.cosine >= self.threshold else 'FAIL'} {e.modality:<5} {e.label:<{width}}  {e.cosine:.6f}"
            for e in self.examples
        ]
        verdict = "PASS" if self.passed else "FAIL"
        return "\n".join([*lines, f"{verdict}: lowest cosine {self.min_cosine:.6f} over {len(self.examples)} examples"])


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


def siglip_reference(encoder: Encoder, src: Path) -> list[ExampleResult]:
    """transformers' SiglipModel, its image processor and the tokenizer class transformers has for the release
    (SiglipTokenizer, or Siglip2Tokenizer for SigLIP 2), texts padded to full length and attended unmasked."""
    transformers = _require("transformers", "transformers")
    import torch
    from PIL import Image

    from .siglip import tokenizer_kind

    kind = tokenizer_kind(src)
    if kind == "spiece":
        _require("sentencepiece", "sentencepiece")
    tokenizer_class = {"spiece": "SiglipTokenizer", "siglip2": "Siglip2Tokenizer"}.get(kind, "AutoTokenizer")
    tokenizer = getattr(transformers, tokenizer_class).from_pretrained(src)
    model = transformers.SiglipModel.from_pretrained(src).eval()
    processor = transformers.SiglipImageProcessorPil.from_pretrained(src)
    images = sample_images()
    pixels = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images.values()], return_tensors="pt")[
        "pixel_values"
    ]
    length = encoder.dims.context_length
    ids = tokenizer(list(SAMPLE_TEXTS), padding="max_length", max_length=length, truncation=True, padding_side="right")[
        "input_ids"
    ]
    with torch.no_grad():
        image_ref = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        text_ref = model.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy()
    return _compare("image", list(images), encoder.encode("image", list(images.values())), image_ref) + _compare(
        "text", _text_labels(), encoder.encode("text", SAMPLE_TEXTS), text_ref
    )


TORCHVISION_STUBS = ("torchvision", "torchvision.ops", "torchvision.ops.misc")


def open_clip_modules() -> SimpleNamespace:
    """open_clip's `model` and `tokenizer` modules, imported without running its package __init__, which imports
    its transforms and so torchvision (absent here: torchvision wheels pin a CUDA torch). `open_clip.utils` imports
    torchvision's FrozenBatchNorm2d (used only to freeze ResNet towers), so a stand-in is present while it loads."""
    import torch

    _require("ftfy", "ftfy")  # open_clip.tokenizer imports it
    if "open_clip" not in sys.modules:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise MissingReferenceError(
                "validation needs open_clip as the reference; install it without its dependencies (they replace "
                "torch): pip install --no-deps 'open-clip-torch==3.3.0'"
            )
        package = ModuleType("open_clip")
        package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
        sys.modules["open_clip"] = package
    importlib.import_module("open_clip.hf_model")  # imports transformers, before any stand-in exists
    if "open_clip.utils" not in sys.modules:
        stubs = {name: ModuleType(name) for name in TORCHVISION_STUBS}
        for name, stub in stubs.items():
            stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        stubs["torchvision.ops.misc"].FrozenBatchNorm2d = torch.nn.BatchNorm2d
        saved = {name: sys.modules.get(name) for name in TORCHVISION_STUBS}
        sys.modules.update(stubs)
        try:
            importlib.import_module("open_clip.utils")
        finally:
            for name, module in saved.items():
                if module is None:
                    del sys.modules[name]
                else:
                    sys.modules[name] = module
    return SimpleNamespace(
        model=importlib.import_module("open_clip.model"), tokenizer=importlib.import_module("open_clip.tokenizer")
    )


def open_clip_pixels(image, size: int, preprocess_cfg: dict) -> np.ndarray:
    """open_clip's eval transform, restated as torchvision runs it on a PIL image (torchvision itself being absent):
    Resize(size) (the short side to size, the long side truncated; resize_mode squash: both sides) with PIL's
    bicubic or bilinear, CenterCrop(size) at int(round(excess / 2)), ToTensor (uint8 / 255 in float32), Normalize."""
    from PIL import Image

    cfg = {k: v for k, v in preprocess_cfg.items() if v is not None}
    resample = Image.Resampling.BILINEAR if cfg.get("interpolation") == "bilinear" else Image.Resampling.BICUBIC
    image = image.convert("RGB")
    w, h = image.size
    if cfg.get("resize_mode", "shortest") == "squash":
        target = (size, size)
    else:
        target = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize(target, resample)
    top, left = round((target[1] - size) / 2.0), round((target[0] - size) / 2.0)
    x = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32).transpose(2, 0, 1)
    x = x / np.float32(255)
    mean = np.asarray(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)), dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)), dtype=np.float32).reshape(-1, 1, 1)
    return (x - mean) / std


def open_clip_model(src: Path):
    """open_clip's CLIP (or CustomTextCLIP) built from an OpenCLIP directory's config, its weights loaded strictly."""
    from .openclip import CONFIG, WEIGHTS

    modules = open_clip_modules()
    model_cfg = dict(checkpoint.read_json(src / CONFIG)["model_cfg"])
    cls = modules.model.CustomTextCLIP if model_cfg.pop("custom_text", False) else modules.model.CLIP
    model = cls(**model_cfg)
    state = checkpoint.hf_tensors(src, names=WEIGHTS)
    state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)  # as open_clip's load_checkpoint
    model.load_state_dict(state, strict=True)
    return model.eval()


def openclip_reference(encoder: Encoder, src: Path) -> list[ExampleResult]:
    import torch
    from PIL import Image

    from .openclip import CONFIG

    modules = open_clip_modules()
    model = open_clip_model(src)
    preprocess_cfg = checkpoint.read_json(src / CONFIG).get("preprocess_cfg") or {}
    images = sample_images()
    size = encoder.dims.image_size
    pixels = np.stack([open_clip_pixels(Image.open(io.BytesIO(b)), size, preprocess_cfg) for b in images.values()])
    tokens = modules.tokenizer.SimpleTokenizer(context_length=encoder.dims.context_length)(list(SAMPLE_TEXTS))
    with torch.no_grad():
        image_ref = model.encode_image(torch.from_numpy(pixels)).numpy()
        text_ref = model.encode_text(tokens).numpy()
    return _compare("image", list(images), encoder.encode("image", list(images.values())), image_ref) + _compare(
        "text", _text_labels(), encoder.encode("text", SAMPLE_TEXTS), text_ref
    )


REFERENCES: dict[str, tuple[str, Callable[[Encoder, Path], list[ExampleResult]]]] = {
    "hf-bert": ("sentence-transformers SentenceTransformer", bert_reference),
    "ct2-whisper": ("ctranslate2 Whisper encoder", whisper_ct2_reference),
    "hf-whisper": ("transformers WhisperModel encoder", whisper_hf_reference),
    "hf-clip": ("transformers CLIPModel", clip_reference),
    "hf-siglip": ("transformers SiglipModel", siglip_reference),
    "openclip": ("open_clip CLIP", openclip_reference),
}


def validate(name: str) -> ValidationReport:
    """Run model NAME (a registry name or store path) and its reference on the built-in samples."""
    path = registry.resolve(name)
    encoder = registry.load_encoder(name, OPTIONS)
    source = weights.read_meta(path).get("source")
    with tempfile.TemporaryDirectory(prefix="mmembed-validate-") as tmp:
        if source and Path(source).is_dir():
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
