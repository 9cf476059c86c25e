"""int8 inference on the CPU: dynamically quantised linears, fenced here (`--dtype int8`).

Each linear's weight is quantised once, per output channel, symmetric int8; its input is quantised at run time, per
token: each row is divided by its largest magnitude before the engine quantises the whole tensor (uint8 from its
range, now [-1, 1] for every row), and the product is multiplied back by it. Per tensor alone, MiniLM fell to cosine
0.991 of float32 (its activations differ in range from token to token); per token it keeps 0.996. This is PyTorch's quantized engine (fbgemm's packed GEMM, on AVX512-VNNI, AVX-VNNI or AMX
where the CPU has them) through `torch.ops.quantized.linear_prepack` / `linear_dynamic` and the quantized tensors
`torch.quantize_per_channel` makes, which PyTorch has deprecated: tests/encoders/test_int8.py names each, so an
upgrade that removes them fails there. Attention, norms, convolutions and embeddings stay in float32.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo flags of the CPU's int8 dot-product instructions


@cache
def cpu_has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions; without them int8 GEMMs run no faster than float32."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return any(flag in flags.split() for flag in VNNI_FLAGS)


class Int8Linear(nn.Module):
    """A float32 linear's int8 twin: x (..., in) float32 -> (..., out) float32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = (weight.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        with warnings.catch_warnings():  # PyTorch warns that quantized tensors are deprecated: the fence's test watches
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(
                weight, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8
            )
            self.packed = torch.ops.quantized.linear_prepack(q, None)  # the bias is added after the row scales
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        # Without VNNI, fbgemm multiplies uint8 by int8 into saturating int16 pairs: a 7-bit input range avoids that.
        self.reduce_range = not cpu_has_vnni()

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        y = torch.ops.quantized.linear_dynamic(rows / scale, self.packed, self.reduce_range).mul_(scale)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize(model: nn.Module) -> nn.Module:
    """`model` (float32, on the CPU, for inference) with every nn.Linear replaced by its Int8Linear."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize(child)
    return model
