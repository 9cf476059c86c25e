"""The references each modality is held to in the same run: the loop a transformers or sentence-transformers user
writes, and our bare forward on pre-made inputs (the machine's ceiling)."""

from __future__ import annotations

import io
import math
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from encoders import audio, checkpoint, image, registry, weights
from encoders.options import Options
from encoders.registry import load_encoder, load_inputs

from .peak import flops_per_item
from .plan import WORDS, BenchError, Plan, device_name, sig, timed

# -- models ---------------------------------------------------------------------------------


def bench_clip(name: str, clip_config: dict) -> Path:
    """A random-weight CLIP as a transformers checkpoint (for the baseline), converted into the model home as `name`.

    Built once per model home; seeded, so every build is the same model.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from encoders.convert import convert
    from encoders.vocab import train_tokenizer

    src = registry.model_home() / "bench" / name
    dest = registry.models_dir() / f"{name}.parquet"
    if src.exists() and dest.exists():
        return src
    tmp = src.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = train_tokenizer(
        [" ".join(WORDS)] * 4, 600
    )  # the text tower is not benchmarked: a small vocabulary will do
    (tmp / "tokenizer.json").write_text(tokenizer)
    vocab = Tokenizer.from_str(tokenizer).get_vocab()
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    text = clip_config["text_config"] | {
        "vocab_size": len(vocab),
        "eos_token_id": eos,
        "bos_token_id": bos,
        "pad_token_id": eos,
    }
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**(clip_config | {"text_config": text}))).save_pretrained(tmp)
    size = clip_config["vision_config"]["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(tmp)
    convert(tmp, dest)
    shutil.rmtree(src, ignore_errors=True)
    tmp.rename(src)
    return src


def ct2_to_hf(layers: int) -> dict[str, tuple[str | None, ...]]:
    """CTranslate2 WhisperSpec encoder variables -> transformers' WhisperEncoder keys: CTranslate2's own converter
    (ctranslate2/converters/transformers.py, WhisperLoader and BartLoader.set_encoder) read backwards, written apart
    from our converter's tables so that the baseline does not share their mistakes. Several keys: the variable is
    their concatenation (q, k, v fused); None: the key bias Whisper lacks, fused as zeros."""
    table: dict[str, tuple[str | None, ...]] = {
        "conv1/weight": ("conv1.weight",),
        "conv1/bias": ("conv1.bias",),
        "conv2/weight": ("conv2.weight",),
        "conv2/bias": ("conv2.bias",),
        "position_encodings/encodings": ("embed_positions.weight",),
        "layer_norm/gamma": ("layer_norm.weight",),
        "layer_norm/beta": ("layer_norm.bias",),
    }
    for i in range(layers):
        ct2, hf = f"layer_{i}/", f"layers.{i}."
        attn = hf + "self_attn."
        table |= {
            ct2 + "self_attention/linear_0/weight": (
                attn + "q_proj.weight",
                attn + "k_proj.weight",
                attn + "v_proj.weight",
            ),
            ct2 + "self_attention/linear_0/bias": (attn + "q_proj.bias", None, attn + "v_proj.bias"),
            ct2 + "self_attention/linear_1/weight": (attn + "out_proj.weight",),
            ct2 + "self_attention/linear_1/bias": (attn + "out_proj.bias",),
            ct2 + "self_attention/layer_norm/gamma": (hf + "self_attn_layer_norm.weight",),
            ct2 + "self_attention/layer_norm/beta": (hf + "self_attn_layer_norm.bias",),
            ct2 + "ffn/linear_0/weight": (hf + "fc1.weight",),
            ct2 + "ffn/linear_0/bias": (hf + "fc1.bias",),
            ct2 + "ffn/linear_1/weight": (hf + "fc2.weight",),
            ct2 + "ffn/linear_1/bias": (hf + "fc2.bias",),
            ct2 + "ffn/layer_norm/gamma": (hf + "final_layer_norm.weight",),
            ct2 + "ffn/layer_norm/beta": (hf + "final_layer_norm.bias",),
        }
    return table


def hf_whisper_encoder(src: Path):
    """transformers' Whisper encoder with the weights of the CTranslate2 Whisper at `src` (model.bin), by `ct2_to_hf`."""
    from transformers import WhisperConfig, WhisperModel

    from encoders.checkpoint import ct2_variables

    found = ct2_variables(src / "model.bin", "WhisperSpec", lambda name: name.startswith("encoder/"))
    variables = {k.removeprefix("encoder/"): v for k, v in found.items()}
    heads = int(variables.pop("num_heads"))
    layers = len({k.split("/")[0] for k in variables if re.match(r"layer_\d+/", k)})
    conv1 = variables["conv1/weight"]
    config = WhisperConfig(
        num_mel_bins=conv1.shape[1],
        max_source_positions=variables["position_encodings/encodings"].shape[0],
        d_model=conv1.shape[0],
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=variables["layer_0/ffn/linear_0/weight"].shape[0],
        decoder_layers=1,
    )
    table = ct2_to_hf(layers)
    if set(table) != set(variables):
        raise RuntimeError(f"{src}: encoder variables differ from the table: {sorted(set(table) ^ set(variables))}")
    state = {}
    for name, keys in table.items():
        for key, part in zip(keys, variables[name].chunk(len(keys))):
            if key is not None:
                state[key] = part.float().contiguous()
    encoder = WhisperModel(config).encoder.eval()
    encoder.load_state_dict(state, strict=True)
    return encoder


def ctranslate2_whisper(src: Path, items: list[bytes]) -> np.ndarray:
    """CTranslate2's own Whisper encoder (fp32) on 30 s windows of `items`, mean-pooled: what the baseline computes,
    by another implementation of the same network."""
    import ctranslate2
    from transformers import WhisperFeatureExtractor

    clips = [sf.read(io.BytesIO(b), dtype="float32")[0] for b in items]
    features = WhisperFeatureExtractor(feature_size=80)(clips, sampling_rate=audio.SAMPLE_RATE, return_tensors="np")
    model = ctranslate2.models.Whisper(str(src), device="cpu", compute_type="float32")
    mel = ctranslate2.StorageView.from_array(np.ascontiguousarray(features.input_features, dtype=np.float32))
    return np.array(model.encode(mel, to_cpu=True)).mean(1)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return round(float((a * b).sum(1).min()), 6)


def batched(items: list, size: int) -> Iterator[list]:
    return (items[i : i + size] for i in range(0, len(items), size))


def _source(model: str) -> Path:
    """The checkpoint directory a converted model came from, which its reference loads."""
    source = weights.read_meta(registry.resolve(model)).get("source")
    if not source or not Path(source).is_dir():
        raise BenchError(f"model {model!r} records no checkpoint directory on disk to measure its reference from")
    return Path(source)


def image_reference(src: Path, device: str) -> tuple[str, Callable[[list[bytes]], object]]:
    """The image loop a user of the checkpoint's own library writes: (what it is, JPEG bytes -> embeddings)."""
    import torch
    import transformers

    from encoders.convert import detect
    from encoders.validate import open_clip_model, open_clip_pixels

    fmt = detect(src)
    if fmt == "openclip":
        from encoders.openclip import CONFIG

        model = open_clip_model(src).to(device)
        cfg = checkpoint.read_json(src / CONFIG).get("preprocess_cfg") or {}
        size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size

        def embed(chunk):
            pixels = np.stack([open_clip_pixels(Image.open(io.BytesIO(b)), size, cfg) for b in chunk])
            return model.encode_image(torch.from_numpy(pixels).to(device))

        return "open_clip's model and eval transform (restated on PIL), CLIP.encode_image", embed
    family = {"hf-clip": "CLIP", "hf-siglip": "Siglip"}.get(fmt)
    if family is None:
        raise BenchError(f"{src} is a {fmt} checkpoint, not an image-text model")
    processor = getattr(transformers, f"{family}ImageProcessorPil").from_pretrained(src)
    model = getattr(transformers, f"{family}Model").from_pretrained(src).eval().to(device)

    def embed(chunk):
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in chunk]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return model.get_image_features(pixel_values=pixels.to(device)).pooler_output

    return f"transformers {family}ImageProcessorPil + {family}Model.get_image_features", embed


def baseline(modality: str, items: list, batch: int, plan: Plan) -> tuple[str, float, np.ndarray]:
    """The loop a transformers / sentence-transformers user writes, fp32: (what it is, items/s, embeddings)."""
    import torch

    device = device_name()
    if modality == "text":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(registry.PACKAGED["minilm-l6"]()), device=device)
        seconds, out = timed(lambda: model.encode(items, batch_size=batch, convert_to_numpy=True))
        return "sentence-transformers SentenceTransformer.encode (all-MiniLM-L6-v2)", len(items) / seconds, out
    if modality == "image":
        src = bench_clip(plan.clip_name, plan.clip) if not plan.image_model else _source(plan.image_model)
        what, embed = image_reference(src, device)
    else:
        from transformers import WhisperFeatureExtractor

        extractor = WhisperFeatureExtractor(feature_size=80)
        encoder = hf_whisper_encoder(registry.PACKAGED["whisper-tiny.en"]()).to(device)

        def embed(chunk):
            clips = [sf.read(io.BytesIO(b), dtype="float32")[0] for b in chunk]  # 16 kHz mono: no resampling
            features = extractor(clips, sampling_rate=audio.SAMPLE_RATE, return_tensors="pt").input_features
            return encoder(features.to(device)).last_hidden_state.mean(1)

        what = (
            "transformers WhisperFeatureExtractor + WhisperModel encoder (30 s windows), tiny.en's CTranslate2 weights"
        )
    with torch.inference_mode():
        seconds, out = timed(lambda: torch.cat([embed(chunk).float().cpu() for chunk in batched(items, batch)]).numpy())
    return what, len(items) / seconds, out


def bare(model: str, modality: str, items: list, dtype: str, batch: int, reps: int) -> dict:
    """Our encoder's `embed` on one batch preprocessed beforehand, after one warm-up call: items/s, GFLOP/s (the FLOPs
    its dims imply for these items, `peak.flops_per_item`), and the batch's embeddings."""
    encoder = load_encoder(model, Options(device=device_name(), dtype=dtype))
    ready = [encoder.preprocess(modality, raw) for raw in (items * math.ceil(batch / len(items)))[:batch]]
    embeddings = encoder.embed(modality, ready)
    seconds, _ = timed(lambda: [encoder.embed(modality, ready) for _ in range(reps)])
    flops = sum(flops_per_item(encoder, modality, item) for item in ready) / len(ready)
    rate = batch * reps / seconds
    return {
        "items_per_s": sig(rate),
        "gflops": sig(rate * flops / 1e9),
        "flops_per_item": flops,
        "embeddings": embeddings,
    }


def preprocess_costs(model: str, modality: str, items: list) -> dict[str, float]:
    """Milliseconds per item in the bench process, as a pipeline task runs it: decoding, and the whole of `preprocess`."""
    inputs = load_inputs(model)
    decode = {"image": image.decode, "audio": audio.decode}.get(modality)
    decode_s = timed(lambda: [decode(raw) for raw in items])[0] if decode else 0.0
    total_s = timed(lambda: [inputs(modality, raw) for raw in items])[0]
    return {"decode_ms": round(1000 * decode_s / len(items), 3), "preprocess_ms": round(1000 * total_s / len(items), 3)}
