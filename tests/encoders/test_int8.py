"""int8 inference (`--dtype int8`): the private quantized operators it is built on, by name, and the real bundled
models within cosine 0.995 of float32 on every example."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoders import int8
from encoders.errors import ModelLoadError
from encoders.options import Options
from encoders.registry import load_encoder

SAMPLES = Path(__file__).parents[2] / "jobs" / "sample_media"


def test_the_quantized_operators_exist():
    for name in ("linear_prepack", "linear_dynamic"):
        assert hasattr(torch.ops.quantized, name), f"torch.ops.quantized.{name} is gone: see encoders/int8.py"
    assert callable(torch.quantize_per_channel)


def test_int8_linear_computes_the_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200)
    x = torch.randn(3, 7, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fence keeps PyTorch's deprecation warnings out of a user's stderr
        got = int8.Int8Linear(linear)(x)
    want = F.linear(x, linear.weight, linear.bias).detach()
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).norm() / want.norm() < 0.03


def test_quantize_replaces_every_linear():
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    )
    quantized = int8.quantize(model)
    assert [type(m).__name__ for m in quantized.modules()].count("Int8Linear") == 2
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize(
    "model, modality, files",
    [
        (
            "shapes-clip",
            "image",
            sorted((SAMPLES / "shapes").glob("*_0.png"))[:12] + sorted((SAMPLES / "photos").glob("*.jpg")),
        ),
        ("shapes-clip", "text", sorted((SAMPLES / "texts").glob("*.txt"))),
        ("minilm-l6", "text", sorted((SAMPLES / "texts").glob("*.txt"))),
        ("whisper-tiny.en", "audio", sorted((SAMPLES / "speech").glob("*.flac"))[:8]),
    ],
)
def test_bundled_models_in_int8_stay_within_0995_of_float32(model, modality, files):
    raws = [f.read_text() if modality == "text" else f.read_bytes() for f in files]
    fp32 = load_encoder(model, Options(device="cpu")).encode(modality, raws)
    quantized = load_encoder(model, Options(device="cpu", dtype="int8"))
    assert any(isinstance(m, int8.Int8Linear) for m in quantized.model.modules())
    cosines = _cosines(quantized.encode(modality, raws), fp32)
    assert cosines.min() >= 0.995, dict(zip([f.name for f in files], cosines.round(4)))


def test_int8_is_refused_on_a_gpu():
    with pytest.raises(ModelLoadError, match="int8 runs on the CPU only"):
        Options(device="cuda", dtype="int8")
