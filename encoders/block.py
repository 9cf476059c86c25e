"""The one transformer block every encoder here is built from.

CLIP and Whisper are pre-LN (`norm_first=True`), BERT is post-LN. Attention runs through
`scaled_dot_product_attention` with q, k and v fused into one projection; where a source
checkpoint has no key bias (Whisper) the converter stores zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import onednn


def normal(*shape: int, std: float = 1.0) -> nn.Parameter:
    """A parameter drawn from N(0, std²). Models are built on the meta device to take stored weights, where
    `torch.normal` costs nothing but `nn.init.normal_` and tensor arithmetic run Python fallbacks that import
    torch._dynamo (~1.5 s of every encoder actor's start)."""
    return nn.Parameter(torch.normal(0.0, std, shape))


class Embedding(nn.Embedding):
    """nn.Embedding initialised with `normal`."""

    def __init__(self, num: int, width: int, std: float = 1.0):
        super().__init__(num, width, _weight=normal(num, width, std=std))


class Linear(nn.Linear):
    """nn.Linear whose float32 inference on the CPU runs on oneDNN, the kernel Inductor uses: MKL's sgemm, which
    F.linear calls, takes its AVX2 path on AMD CPUs, and oneDNN ran these shapes 2.2x faster on an AVX-512 EPYC
    at the same precision (BENCHMARKS.md). bf16 already runs on oneDNN."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return onednn.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """Computes in fp32 and casts back, so bf16/fp16 compute stays stable."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        # explicit fp32 weights: CPU layer_norm rejects fp32 input with bf16/fp16 parameters
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type(x.dtype)


QUICK_GELU = 1.702  # quick_gelu(x) = x * sigmoid(1.702 x)


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(QUICK_GELU * x)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh}
# oneDNN post-ops (attr, algorithm) that apply an activation inside fc1's matmul, sparing passes over its output,
# the widest tensor of a block (BENCHMARKS.md). quick_gelu has none (oneDNN's swish takes no 1.702 here).
POST_OPS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh")}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.out = Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """x: (batch, seq, width); mask: broadcastable to (batch, heads, seq, seq), True = attend."""
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if causal and mask is not None:
            mask = mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        if onednn.applies(x) and self.activation in POST_OPS and isinstance(self.fc1, Linear):  # not an Int8Linear
            return self.fc2(onednn.linear(x, self.fc1.weight, self.fc1.bias, POST_OPS[self.activation]))
        if onednn.applies(x) and self.activation == "quick_gelu":
            h = self.fc1(x)
            return self.fc2(h.mul_((h * QUICK_GELU).sigmoid_()))  # in place: one new tensor, not three
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, activation: str, norm_first: bool, eps: float = 1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.attn = Attention(width, heads)
        self.ln1 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, hidden, activation)
        self.ln2 = LayerNorm(width, eps=eps)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        """x: (batch, seq, width) -> (batch, seq, width)."""
        if self.norm_first:
            x = x + self.attn(self.ln1(x), mask, causal)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, mask, causal))
        return self.ln2(x + self.mlp(x))
