"""Session-wide test setup: a private model home, and one Ray instance shared by every test."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from encoders.clip import CLIP, CLIPDims
from encoders.weights import StoredModel, save

# Set before anything starts Ray, so its workers inherit it: packaged models convert once per session.
os.environ.setdefault("MMEMBED_HOME", tempfile.mkdtemp(prefix="mmembed-home-"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (started on first use)."""
    from pipelines import embed

    embed.start()
    yield
    import ray

    ray.shutdown()


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


def make_tiny_clip(tokenizer_json: str) -> StoredModel:
    """A randomly initialised (seed 0) tiny CLIP as a StoredModel, with the fixture tokenizer."""
    torch.manual_seed(0)
    tensors = {k: v.detach().clone() for k, v in CLIP(TINY_DIMS).state_dict().items()}
    preprocess = {
        "size": 36,
        "crop_size": 32,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    }
    return StoredModel("clip", asdict(TINY_DIMS), tensors, preprocess, tokenizer_json)


@pytest.fixture
def tiny_clip(clip_tokenizer_json) -> StoredModel:
    return make_tiny_clip(clip_tokenizer_json)


@pytest.fixture(scope="session")
def tiny_clip_model(clip_tokenizer_json) -> str:
    """The tiny random CLIP saved into the model home as 'tiny-clip', for pipeline tests (any CLIP will do there)."""
    from encoders.registry import models_dir

    save(make_tiny_clip(clip_tokenizer_json), models_dir() / "tiny-clip.parquet")
    return "tiny-clip"
