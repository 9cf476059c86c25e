"""The private PyTorch operators the encoders use, fenced here: oneDNN's fused linear and its CPU capability checks.

`torch.ops.mkldnn._linear_pointwise` is the op Inductor lowers a CPU linear (plus an activation) to; PyTorch keeps
it for Inductor, not as a public API, so an upgrade may rename or change it. Everything else calls `linear` and
`computes` below, and tests/encoders/test_onednn.py names each operator and fails loudly when one changes.
Without the operator, `linear` is `F.linear` and nothing else changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_OPS = torch.ops.mkldnn
LINEAR_POINTWISE = "_linear_pointwise"  # (x, weight, bias, attr, scalars, algorithm) -> x @ weight.T + bias, then attr
SUPPORTS = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


def computes(dtype: torch.dtype) -> bool:
    """Whether oneDNN has kernels for `dtype` on this CPU (bf16: AVX-512 or AMX; fp16: AVX512-FP16 or AMX-FP16).
    Elsewhere PyTorch emulates it: MiniLM ran 4.5x (fp16) and 7x (bf16) slower than in fp32 on an AVX2 EPYC."""
    return dtype not in SUPPORTS or (torch.backends.mkldnn.is_available() and getattr(_OPS, SUPPORTS[dtype])())


AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(_OPS, LINEAR_POINTWISE)
DTYPES = (torch.float32, torch.bfloat16) if AVAILABLE and computes(torch.bfloat16) else (torch.float32,)


def applies(x: Tensor) -> bool:
    """Whether `x` goes through inference on the CPU in fp32 or bf16, where oneDNN's fused linear applies. With
    gradients on (training) layers stay on F.linear, as oneDNN's op has no backward."""
    return AVAILABLE and x.device.type == "cpu" and x.dtype in DTYPES and not torch.is_grad_enabled()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, post_op: tuple[str, str] = ("none", "")) -> Tensor:
    """x @ weight.T + bias, then the oneDNN post-op (attr, algorithm), e.g. ("gelu", "tanh"); F.linear (and no
    post-op) where `applies(x)` is false, so a caller with a post-op checks `applies` first."""
    if not applies(x):
        assert post_op == ("none", ""), "a post-op needs oneDNN: check applies(x) first"
        return F.linear(x, weight, bias)
    attr, algorithm = post_op
    return getattr(_OPS, LINEAR_POINTWISE)(x, weight, bias, attr, [], algorithm)
