"""The shared layers: oneDNN linears and MLPs that compute what F.linear and the plain activations
compute, and models that build on the meta device without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from encoders import block, onednn


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_linear_computes_what_f_linear_computes(dtype, tolerance):
    torch.manual_seed(0)
    layer = block.Linear(96, 160).to(dtype)
    x = torch.randn(4, 7, 96, dtype=dtype)
    with torch.inference_mode():
        got, want = layer(x), F.linear(x, layer.weight, layer.bias)
    assert got.shape == (4, 7, 160) and got.dtype == dtype
    assert (got.float() - want.float()).abs().max() <= tolerance * want.float().abs().max()


def test_linear_trains():
    """With gradients on, the layer runs F.linear: oneDNN's op has no backward."""
    torch.manual_seed(0)
    layer = block.Linear(8, 3, bias=False)
    x = torch.randn(5, 8)
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and torch.allclose(layer.weight.grad, 2 * (x @ layer.weight.T).T @ x)


@pytest.mark.parametrize("activation", sorted(block.ACTIVATIONS))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_mlp_inference_computes_what_training_computes(activation, dtype, tolerance):
    """In inference the activation runs inside fc1's oneDNN matmul (gelu) or in place (quick_gelu); the result is
    the plain fc2(act(fc1(x))) that training runs, and the input is left as it was."""
    torch.manual_seed(0)
    mlp = block.MLP(64, 256, activation).to(dtype)
    x = torch.randn(3, 5, 64, dtype=dtype)
    before = x.clone()
    want = mlp(x).detach()  # gradients on: the unfused layers
    with torch.inference_mode():
        got = mlp(x)
    assert got.shape == (3, 5, 64) and got.dtype == dtype and torch.equal(x, before)
    assert (got.float() - want.float()).abs().max() <= tolerance * want.float().abs().max()


def test_a_model_builds_on_the_meta_device_without_importing_dynamo():
    """nn.init.normal_ and tensor arithmetic on meta tensors import torch._dynamo (~1.5 s of an actor's start)."""
    code = """
import sys, torch
from encoders.bert import Bert, BertDims
from encoders.clip import CLIP, CLIPDims
with torch.device("meta"):
    CLIP(CLIPDims(embed_dim=32, image_size=32, patch_size=16, vision_width=64, vision_layers=1, vision_heads=2, vision_mlp=128,
                  context_length=8, vocab_size=50, text_width=32, text_layers=1, text_heads=2, text_mlp=64, eos_token_id=49))
    Bert(BertDims(vocab_size=50, max_positions=16, width=32, layers=1, heads=2, mlp=64, type_vocab_size=2,
                  layer_norm_eps=1e-12, activation="gelu", max_seq_length=16))
print("torch._dynamo" in sys.modules)
"""
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_a_dtype_the_cpu_only_emulates_is_named_when_a_model_builds(monkeypatch, caplog):
    """bf16 or fp16 without the CPU's instructions for them runs 4-7x slower than float32: a user asking for
    either is told once, when the network is built, not left to wonder."""
    from encoders.options import Options
    from encoders.registry import load_encoder

    monkeypatch.setattr(onednn, "computes", lambda dtype: dtype == torch.float32)
    with caplog.at_level("WARNING", logger="encoders.model"):
        load_encoder("minilm-l6", Options(device="cpu"))
        assert not caplog.records
        load_encoder("minilm-l6", Options(device="cpu", dtype="bfloat16"))
    assert [r.getMessage() for r in caplog.records] == [
        "minilm-l6: this CPU has no bfloat16 instructions, so PyTorch emulates them: expect it several times slower than float32"
    ]
