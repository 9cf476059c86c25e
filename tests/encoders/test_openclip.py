"""OpenCLIP checkpoints into the CLIP encoder, against open_clip's own model and tokenizer code.

open_clip's package __init__ imports torchvision (absent: its wheels pin a CUDA torch), so the reference is its
`model` and `tokenizer` modules imported on their own (encoders.validate.open_clip_modules). Its eval transform is
torchvision's, restated on PIL in encoders.validate.open_clip_pixels, and checked here against transformers'
CLIPImageProcessor where the two agree on the crop."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from encoders import registry
from encoders.clip import ClipEncoder
from encoders.convert import convert, detect
from encoders.errors import ConversionError
from encoders.model import softmax_scores
from encoders.openclip import convert as convert_openclip
from encoders.validate import open_clip_modules, open_clip_pixels, validate
from tests.releases import CONTEXT, model_cfg, write_openclip

IMAGES = ["astronaut.png", "coffee.png", "camera.png", "rocket.jpg", "motorcycle_left.png"]  # RGB, grey; no alpha
PROMPTS = [
    "a photo of a cat",
    "A Red CIRCLE, on a grey background!!",
    "Naïve café owners in Zürich serve crème brûlée — 東京 and Москва too! 🙂",
    "What?! No... yes; maybe: (probably) [definitely] {not} <sure> 100% $5.00",
    "x",
    " ".join(f"sentence {i} keeps going" for i in range(20)),  # past the context length
]


@pytest.fixture(scope="module")
def open_clip():
    return open_clip_modules()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.mark.parametrize(
    "cfg,preprocess_cfg,weights",
    [
        (
            model_cfg(),
            {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
            "open_clip_model.safetensors",
        ),
        (
            model_cfg(image_size=30, patch=10, quick_gelu=False, pool_type="eos", eos_id=49407)
            | {"custom_text": True, "nonscalar_logit_scale": True},
            {"mean": 0.5, "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "squash"},
            "open_clip_pytorch_model.bin",
        ),
        (
            model_cfg(image_size=32, patch=16)
            | {
                "vision_cfg": model_cfg()["vision_cfg"]
                | {"image_size": 32, "patch_size": 16, "norm_kwargs": {"eps": 1e-6}}
            }
            | {"text_cfg": model_cfg()["text_cfg"] | {"norm_kwargs": {"eps": 1e-6}}},
            {"interpolation": "bicubic", "resize_mode": "shortest"},
            "open_clip_model.safetensors",
        ),
    ],
)
def test_converted_openclip_matches_open_clip(tmp_path, photos, open_clip, cfg, preprocess_cfg, weights):
    model = write_openclip(open_clip, tmp_path, cfg, preprocess_cfg, weights)
    stored = convert_openclip(tmp_path)
    assert stored.kind == "clip"
    encoder = ClipEncoder("oc", stored)
    size = cfg["vision_cfg"]["image_size"]

    ref_pixels = np.stack([open_clip_pixels(Image.open(io.BytesIO(photos[n])), size, preprocess_cfg) for n in IMAGES])
    pixels = np.stack([encoder.preprocess("image", photos[n]) for n in IMAGES])
    assert np.abs(pixels - ref_pixels).max() <= 1e-5

    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)(PROMPTS)
    ids, mask = encoder.tokenizer(PROMPTS)
    assert [row[m == 1].tolist() for row, m in zip(ids, mask)] == [row[row != 0].tolist() for row in tokens]

    with torch.inference_mode():
        ref_images = model.encode_image(torch.from_numpy(ref_pixels)).numpy()
        ref_texts = model.encode_text(tokens).numpy()
        image_logits, _ = model.get_logits(torch.from_numpy(ref_pixels[:2]), tokens[:3])
    images, texts = encoder.embed("image", list(pixels)), encoder.encode("text", PROMPTS)
    assert cosines(images, ref_images).min() >= 0.9999
    assert cosines(texts, ref_texts).min() >= 0.9999
    np.testing.assert_allclose(encoder.score(images[:2] @ texts[:3].T), image_logits.softmax(-1).numpy(), atol=1e-5)


def test_transcribed_transform_agrees_with_transformers(photos):
    """Where torchvision's rounded crop offset equals transformers' floored one, open_clip_pixels and transformers'
    CLIPImageProcessor must give the same pixels: the transcription's resize and arithmetic are checked from outside."""
    processor = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    for name in IMAGES:
        image = Image.open(io.BytesIO(photos[name])).convert("RGB")
        w, h = image.size
        excess = (int(30 * max(w, h) / min(w, h)) - 30) / 2
        if round(excess) != int(excess):
            continue
        ref = processor(images=[image], return_tensors="np")["pixel_values"][0]
        assert np.abs(open_clip_pixels(image, 30, {}) - ref).max() <= 1e-5, name


def test_openai_bpe_is_open_clips_vocabulary(open_clip, tmp_path):
    from tokenizers import Tokenizer

    from encoders.vocab import openai_bpe

    ours = Tokenizer.from_str(openai_bpe())
    theirs = open_clip.tokenizer.SimpleTokenizer()
    renamed = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}
    assert {renamed.get(k, k): v for k, v in ours.get_vocab().items()} == theirs.encoder


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c["vision_cfg"].update(timm_model_name="vit_base_patch16_siglip_224"), "timm image tower"),
        (lambda c: c["text_cfg"].update(hf_model_name="xlm-roberta-base"), "Hugging Face text tower"),
        (lambda c: c["text_cfg"].update(hf_tokenizer_name="timm/ViT-B-16-SigLIP"), "Hugging Face tokenizer"),
        (lambda c: c.update(multimodal_cfg={"width": 40}), "CoCa"),
        (lambda c: c.update(init_logit_bias=-10), "logit_bias"),
        (lambda c: c["vision_cfg"].update(ls_init_value=1e-5), "layer scale"),
        (lambda c: c["vision_cfg"].update(layers=[1, 1, 1, 1]), "ModifiedResNet"),
        (lambda c: c["text_cfg"].update(pool_type="last"), "pool_type 'last'"),
        (lambda c: c["text_cfg"].update(proj_bias=True), "proj_bias"),
        (lambda c: c["text_cfg"].update(vocab_size=32000), "vocab_size 32000"),
        (lambda c: c["vision_cfg"].update(qk_norm=True), "qk_norm"),
    ],
)
def test_unsupported_configs_are_named(tmp_path, open_clip, edit, message):
    write_openclip(open_clip, tmp_path, model_cfg(), {})
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    edit(config["model_cfg"])
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message):
        convert_openclip(tmp_path)


def test_unsupported_preprocessing_and_bad_tensors_are_named(tmp_path, open_clip):
    write_openclip(open_clip, tmp_path, model_cfg(), {"resize_mode": "longest"})
    with pytest.raises(ConversionError, match="resize_mode='longest'"):
        convert_openclip(tmp_path)
    write_openclip(open_clip, tmp_path, model_cfg(), {})
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["width"] = 45
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="token_embedding.weight"):
        convert_openclip(tmp_path)


def test_convert_detects_openclip_and_validates(tmp_path, open_clip, monkeypatch):
    monkeypatch.setenv("MMEMBED_HOME", str(tmp_path / "home"))
    src = tmp_path / "src"
    write_openclip(open_clip, src, model_cfg(image_size=32, patch=8), {"interpolation": "bicubic"})
    assert detect(src) == "openclip"
    (src / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))  # a timm config beside it
    assert detect(src) == "openclip"
    convert(src, registry.models_dir() / "tiny-openclip.parquet")
    report = validate("tiny-openclip")
    assert report.kind == "clip" and "open_clip" in report.reference and report.passed, report.to_dict()
    shutil.rmtree(src)  # no checkpoint left: validate exports the store for transformers' CLIPModel
    exported = validate("tiny-openclip")
    assert "CLIPModel" in exported.reference and exported.passed, exported.to_dict()


def test_softmax_scores_sum_to_one():
    p = softmax_scores(np.array([[0.1, 0.3, 0.2], [0.0, 0.0, 0.0]]), 100.0)
    np.testing.assert_allclose(p.sum(-1), 1)
    assert p[0].argmax() == 1 and np.allclose(p[1], 1 / 3)


def test_crop_offset_rounds_as_torchvision(photos):
    """rocket.jpg at 32 pixels: 47 x 32 after resizing, 15 to crop away. torchvision starts at round(7.5) = 8,
    transformers at 7: only crop_rounding="round" gives open_clip's pixels."""
    from encoders import image

    rgb = image.decode(photos["rocket.jpg"])
    ref = open_clip_pixels(rgb, 32, {})
    rounded = image.preprocess(rgb, 32, 32, crop_rounding="round")
    floored = image.preprocess(rgb, 32, 32, crop_rounding="floor")
    assert np.abs(rounded - ref).max() <= 1e-5 < np.abs(floored - ref).max()
