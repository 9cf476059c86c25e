"""The GPU check, sized to the device machine: `python -m jobs.bench.gpu [--out F]` from the checkout.

That machine (one GPU, when the `device` tool lends one) reaches no package registry and has torch, torchvision,
transformers, pyarrow and pillow but neither Ray, DuckDB nor an audio decoder, so this imports only the encoders'
networks. In one run of a few minutes it measures:

- a bf16 GEMM: the device's matrix peak, which each encoder's share is counted against;
- our bare encoders (ViT-B/32 and ViT-L/14 with random weights, MiniLM and Whisper tiny dims) in fp32 and bf16 at
  large batches against transformers' models holding the same weights, on the same device, and our bf16 output's
  cosine to our fp32 on the CPU;
- JPEG decoding and CLIP preprocessing on the GPU (torchvision's nvJPEG decode, then resize, crop, normalise)
  against our CPU preprocessing (encoders.image), on the bench's synthetic JPEGs.

Without CUDA it runs the same sections on the CPU at small sizes (its CPU mode), which the tests run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from encoders import bert, checkpoint, clip, whisper
from encoders.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from encoders.image import load as cpu_preprocess

VIT = {  # name -> (width, layers, heads, mlp, patch): the vision towers measured
    "ViT-B/32": (768, 12, 12, 3072, 32),
    "ViT-L/14": (1024, 24, 16, 4096, 14),
}
# The CPU mode checks the machinery, not the speed: one tiny vision tower, one layer of the others, small batches.
SIZES = {
    "cuda": {"batch": 256, "square": 8192, "jpegs": 512, "seconds": 3.0, "vit": VIT, "layers": {"MiniLM": 6, "Whisper tiny": 4}},
    "cpu": {"batch": 4, "square": 512, "jpegs": 8, "seconds": 0.2, "vit": {"ViT (tiny)": (96, 2, 4, 192, 32)},
            "layers": {"MiniLM": 1, "Whisper tiny": 1}},
}  # fmt: skip
CLIP_PREPROCESS = {"size": 224, "crop_size": 224, "mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)}


def timed(fn: Callable[[], object], device: str, seconds: float) -> float:
    """Seconds per call of `fn`, after two warm-up calls, over at least `seconds`."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn(), fn()
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    sync()
    return (time.perf_counter() - start) / calls


def gemm_peak(device: str, n: int, seconds: float) -> float:
    """bf16 GFLOP/s of one square matrix product."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, device, seconds) / 1e9


def _vit_pair(width: int, layers: int, heads: int, mlp: int, patch: int):
    """transformers' CLIPModel (a small text tower) with random weights, and our CLIP holding the same weights."""
    from transformers import CLIPConfig, CLIPModel

    vision = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                  patch_size=patch, image_size=224)  # fmt: skip
    text = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    reference = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=512)).eval()
    dims = clip.dims_from_hf(reference.config.to_dict())
    ours = _ours(lambda: clip.CLIP(dims), clip.key_table(dims), reference.state_dict(), clip.IGNORED_KEYS)
    return ours.vision, reference, lambda m, x: m.get_image_features(pixel_values=x).pooler_output, dims, "image"


def _bert_pair(layers: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    reference = BertModel(
        BertConfig(hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536)
    )
    reference = reference.eval()
    c = reference.config
    dims = bert.BertDims(
        c.vocab_size, 384, layers, 12, 1536, c.max_position_embeddings, 2, c.layer_norm_eps, "gelu", 128
    )
    ours = _ours(lambda: bert.Bert(dims), bert.hf_table(dims), reference.state_dict(), bert.HF_UNUSED)
    return ours, reference, lambda m, ids, mask: m(input_ids=ids, attention_mask=mask).last_hidden_state, dims, "text"


def _whisper_pair(layers: int):
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    reference = WhisperModel(WhisperConfig(d_model=384, encoder_layers=layers, encoder_attention_heads=6, encoder_ffn_dim=1536,
                                           decoder_layers=1)).encoder.eval()  # fmt: skip
    dims = whisper.WhisperDims(n_mels=80, n_ctx=1500, width=384, heads=6, layers=layers, hidden=1536)
    ours = _ours(lambda: whisper.AudioEncoder(dims), whisper.hf_table(dims.layers), reference.state_dict(), ())
    return ours, reference, lambda m, mel: m(mel).last_hidden_state, dims, "audio"


def _ours(build, table, state, ignored) -> torch.nn.Module:
    module = build().eval()
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    module.load_state_dict(checkpoint.remap(Path("(in memory)"), table, dict(state), shapes, ignored))
    return module


def _inputs(modality: str, batch: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    if modality == "image":
        return (torch.randn(batch, 3, 224, 224, generator=g),)
    if modality == "audio":
        return (torch.randn(batch, 80, 3000, generator=g),)
    ids = torch.randint(1000, 20000, (batch, 32), generator=g)
    return ids, torch.ones_like(ids)


def _flops(modality: str, dims) -> float:
    if modality == "image":
        tokens = (224 // dims.patch_size) ** 2 + 1
        return 2 * 3 * dims.patch_size**2 * dims.vision_width * (tokens - 1) + _blocks(
            tokens, dims.vision_width, dims.vision_mlp, dims.vision_layers
        )
    if modality == "audio":
        return (
            2 * 80 * 3 * dims.width * 3000
            + 2 * dims.width * 3 * dims.width * 1500
            + _blocks(1500, dims.width, dims.hidden, dims.layers)
        )
    return _blocks(32, dims.width, dims.mlp, dims.layers)


def _blocks(tokens: int, width: int, mlp: int, layers: int) -> float:
    return layers * (2 * tokens * width * 4 * width + 4 * tokens * tokens * width + 4 * tokens * width * mlp)


def measure_encoders(device: str, size: dict, peak: float) -> list[dict]:
    """Each encoder's items/s in fp32 and bf16, ours and transformers', its share of the bf16 peak, the cosine of ours
    to transformers' on the CPU in fp32 (the same weights: a check that both compute one function), and the cosine of
    our output on the device to our fp32 output on the CPU."""
    pairs = {name: lambda v=v: _vit_pair(*v) for name, v in size["vit"].items()} | {
        "MiniLM": lambda: _bert_pair(size["layers"]["MiniLM"]),
        "Whisper tiny": lambda: _whisper_pair(size["layers"]["Whisper tiny"]),
    }
    rows = []
    for name, make in pairs.items():
        ours, reference, call, dims, modality = make()
        batch = size["batch"] if modality != "audio" else max(1, size["batch"] // 8)  # 30 s windows are large
        inputs = _inputs(modality, batch)
        row = {"model": name, "batch": batch}
        with torch.inference_mode():
            cpu_fp32 = ours(*(x[:2] for x in inputs)).float().flatten(1)
            reference_fp32 = call(reference, *(x[:2] for x in inputs)).float().flatten(1)
            row["cosine_ours_vs_reference_cpu_fp32"] = round(
                float(torch.cosine_similarity(cpu_fp32, reference_fp32).min()), 5
            )
            for dtype in ("float32", "bfloat16"):
                cast = getattr(torch, dtype)
                ours.to(device, cast)
                reference.to(device, cast)
                xs = [x.to(device) if x.dtype == torch.long else x.to(device, cast) for x in inputs]
                seconds = timed(lambda xs=xs, m=ours: m(*xs), device, size["seconds"])
                row[f"ours_{dtype}_items_per_s"] = round(batch / seconds, 1)
                row[f"ours_{dtype}_share_of_bf16_peak"] = round(
                    batch * _flops(modality, dims) / seconds / 1e9 / peak, 3
                )
                seconds = timed(lambda xs=xs, r=reference, c=call: c(r, *xs), device, size["seconds"])
                row[f"reference_{dtype}_items_per_s"] = round(batch / seconds, 1)
                out = ours(*(x[:2] for x in xs)).float().cpu().flatten(1)
                row[f"cosine_{dtype}_vs_cpu_fp32"] = round(float(torch.cosine_similarity(out, cpu_fp32).min()), 5)
                ours.to("cpu", torch.float32)
                reference.to("cpu", torch.float32)
        rows.append(row)
    return rows


def measure_jpeg(device: str, size: dict) -> dict:
    """JPEG/s of GPU decode + preprocess against our CPU preprocessing, on the bench's synthetic photos."""
    from .data import generate

    jpegs = [data for _, data in generate("image", size["jpegs"])]
    cpu_s = timed(lambda: [cpu_preprocess(j, **CLIP_PREPROCESS) for j in jpegs], "cpu", size["seconds"])
    result = {"jpegs": len(jpegs), "cpu_jpeg_per_s": round(len(jpegs) / cpu_s, 1)}
    if device != "cuda":
        return result | {"gpu_jpeg_per_s": None, "note": "no CUDA device: GPU decoding not measured"}
    import torchvision.io
    import torchvision.transforms.v2.functional as TF

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    mean = torch.tensor(OPENAI_CLIP_MEAN, device="cuda")[:, None, None]
    std = torch.tensor(OPENAI_CLIP_STD, device="cuda")[:, None, None]

    def gpu():
        images = torchvision.io.decode_jpeg(data, device="cuda")
        return [((TF.center_crop(TF.resize(i, 224, antialias=True), 224).float() / 255) - mean) / std for i in images]

    gpu_s = timed(gpu, "cuda", size["seconds"])
    ours = np.stack([cpu_preprocess(j, **CLIP_PREPROCESS) for j in jpegs[:16]])
    theirs = torch.stack(gpu()[:16]).cpu().numpy()
    return result | {
        "gpu_jpeg_per_s": round(len(jpegs) / gpu_s, 1),
        "max_abs_pixel_diff": float(np.abs(ours - theirs).max()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON result here too")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = SIZES[device]
    started = time.perf_counter()
    peak = gemm_peak(device, size["square"], size["seconds"])
    result = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else "cpu (CPU mode: sizes too small to mean anything)",
        "torch": torch.__version__,
        "bf16_gemm_gflops": round(peak, 1),
        "encoders": measure_encoders(device, size, peak),
        "jpeg": measure_jpeg(device, size),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
