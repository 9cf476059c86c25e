"""The machine's own limit, measured in the same run: its matrix-multiply peak, and each encoder's FLOPs per item.

The peak of a dtype is the best GFLOP/s, after warm-up, over a few GEMM shapes (the encoders' own: tokens x width x
width and tokens x width x 4 width, and a square one) through every path the encoders may use (MKL via
`torch.matmul`, oneDNN's linear; for int8, the quantised linear), at the encoders' thread count. A bare encoder's
share of that peak is its items/s times its FLOPs per item, counted from its dims (below), over the peak.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from encoders.model import Encoder

INSTRUCTION_SETS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)
MIN_SECONDS = 0.4  # timed per shape and path, after two warm-up calls


def cpu_info() -> dict:
    """The CPU's model name, family/model numbers and which of INSTRUCTION_SETS it has (from /proc/cpuinfo)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {"model": None, "family_model": None, "instruction_sets": []}
    field = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in lines if ":" in line}
    flags = set(field.get("flags", "").split())
    return {
        "model": field.get("model name"),
        "family_model": f"{field.get('cpu family')}/{field.get('model')}",  # a VM's model name may hide which CPU
        "instruction_sets": [s for s in INSTRUCTION_SETS if s in flags],
    }


def _paths(dtype: str) -> dict[str, Callable]:
    """How the encoders multiply in `dtype`: name -> a factory, weight (n, k) -> the function x (m, k) -> x @ weight.T
    (made once, as a model's layers are when it loads)."""
    import torch

    from encoders import int8, onednn

    if dtype == "int8":
        return {"quantised linear": lambda w: int8.Int8Linear(_linear(w))} if int8.cpu_has_vnni() else {}
    return {
        "torch.matmul (MKL)": lambda w: lambda x: torch.matmul(x, w.t()),
        "oneDNN linear": lambda w: lambda x: onednn.linear(x, w, None),
    }


def _linear(weight):
    import torch

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    return linear


def gemm_peak(shapes: tuple[tuple[int, int, int], ...], dtypes: tuple[str, ...]) -> dict:
    """dtype -> {"gflops": the best over shapes and paths, "points": every (shape, path, gflops), "note"}."""
    import torch

    from encoders import onednn

    out = {}
    for dtype in dtypes:
        compute = torch.float32 if dtype == "int8" else getattr(torch, dtype)
        if not onednn.computes(compute):
            out[dtype] = {"gflops": None, "points": [], "note": f"this CPU has no {dtype} instructions"}
            continue
        points = []
        for m, k, n in shapes:
            x, w = torch.randn(m, k).to(compute), torch.randn(n, k).to(compute)
            for name, make in _paths(dtype).items():
                multiply = make(w)
                with torch.inference_mode():
                    multiply(x)
                    multiply(x)
                    calls, start = 0, time.perf_counter()
                    while (elapsed := time.perf_counter() - start) < MIN_SECONDS:
                        multiply(x)
                        calls += 1
                gflops = round(2 * m * k * n * calls / elapsed / 1e9, 1)
                points.append({"shape": [m, k, n], "path": name, "gflops": gflops})
        best = max((p["gflops"] for p in points), default=None)
        out[dtype] = {"gflops": best, "points": points, "note": None if points else "this CPU has no VNNI instructions"}
    return out


def flops_per_item(encoder: Encoder, modality: str, item) -> float:
    """The multiply-adds x 2 of one preprocessed item through the encoder, from its dims: patch embedding or
    convolutions, every block's projections, attention scores and mixing, MLP, and the final projection."""
    kind = encoder.kind
    if kind == "clip" and modality == "image":
        d = encoder.dims
        patches = (d.image_size // d.patch_size) ** 2
        embed = 2 * 3 * d.patch_size**2 * d.vision_width * patches
        return (
            embed
            + _blocks(patches + 1, d.vision_width, d.vision_mlp, d.vision_layers)
            + 2 * d.vision_width * d.embed_dim
        )
    if kind == "whisper":
        d = encoder.dims
        frames = item.shape[1]
        positions = frames // 2
        convs = 2 * d.n_mels * 3 * d.width * frames + 2 * d.width * 3 * d.width * positions
        return convs + _blocks(positions, d.width, d.hidden, d.layers)
    if kind == "bert":
        d = encoder.dims
        tokens = len(encoder.tokenizer([item])[0][0])
        return _blocks(tokens, d.width, d.mlp, d.layers)
    raise ValueError(f"no FLOP count for {kind} {modality}")


def _blocks(tokens: int, width: int, mlp: int, layers: int) -> float:
    """FLOPs of `layers` transformer blocks over `tokens`: qkv and output projections, scores and mixing, MLP."""
    projections = 2 * tokens * width * 4 * width
    attention = 2 * 2 * tokens * tokens * width
    return layers * (projections + attention + 2 * 2 * tokens * width * mlp)
