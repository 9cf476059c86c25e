"""Shared fixtures for encoder tests: real photos (scikit-image's bundled files) and a tiny CLIP tokenizer."""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from encoders.clip import CLIP, CLIPDims
from encoders.store import StoredModel

SKIMAGE_DATA = Path(skimage.data.__file__).parent
FIXTURES = Path(__file__).parents[1] / "fixtures"
# Real photos as their files are: RGB and greyscale PNG, baseline JPEG, RGBA PNG, square and not.
PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "camera.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "logo.png",
)


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """name -> the encoded file bytes of each of PHOTOS."""
    return {name: (SKIMAGE_DATA / name).read_bytes() for name in PHOTOS}


@pytest.fixture(scope="session")
def encode():
    """encode(image or uint8 array, format, **save_options) -> the encoded bytes."""

    def _encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        return buf.getvalue()

    return _encode


@pytest.fixture(scope="session")
def clip_tokenizer_json() -> str:
    """tests/fixtures/clip_tokenizer.json: encoders.clip.train_tokenizer on ~170 shape captions and a few
    scene captions and unicode, vocab_size=1000 (759 tokens: 512 byte symbols, merges, BOS=757, EOS=758)."""
    return (FIXTURES / "clip_tokenizer.json").read_text()


TINY_DIMS = CLIPDims(
    embed_dim=24,
    image_size=32,
    patch_size=16,
    vision_width=32,
    vision_layers=2,
    vision_heads=4,
    vision_mlp=64,
    context_length=77,
    vocab_size=759,
    text_width=32,
    text_layers=2,
    text_heads=4,
    text_mlp=64,
    eos_token_id=758,
)


@pytest.fixture
def tiny_clip(clip_tokenizer_json) -> StoredModel:
    """A randomly initialised tiny CLIP as a StoredModel, with the fixture tokenizer."""
    torch.manual_seed(0)
    tensors = {k: v.detach().clone() for k, v in CLIP(TINY_DIMS).state_dict().items()}
    preprocess = {"size": 36, "crop_size": 32, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    return StoredModel("clip", asdict(TINY_DIMS), tensors, preprocess, clip_tokenizer_json)
