"""SigLIP and fixed-resolution SigLIP 2 against transformers' SiglipModel, image processor and tokenizers, from
directories laid out as the releases are (config.json, model.safetensors, preprocessor_config.json, and spiece.model
for SigLIP or a Gemma tokenizer.json for SigLIP 2)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, trainers
from transformers import (
    GemmaTokenizer,
    Siglip2Tokenizer,
    SiglipImageProcessorPil,
    SiglipTokenizer,
)

from encoders import registry, spiece, weights
from encoders.convert import convert, detect
from encoders.errors import ConversionError, ModelLoadError
from encoders.model import Options
from encoders.siglip import SigLIP, SiglipDims, SiglipEncoder, convert_hf, sigmoid_scores
from encoders.validate import validate
from tests.releases import CAPTIONS, hf_siglip, save_release, train_spiece

IMAGES = ["astronaut.png", "coffee.png", "camera.png", "rocket.jpg", "logo.png"]  # RGB, grey, RGBA, non-square
PROMPTS = [
    "a photo of a cat",
    "A Red CIRCLE, on a grey background!!",
    "naïve café — 東京 🚀",
    "x",
    " ".join(["a blue square next to a green star"] * 6),  # past every context length here
]
# What SiglipTokenizer's canonicalisation (lowercase, ASCII punctuation out, whitespace folded, stripped) and
# SentencePiece's own normaliser have to agree on.
TRICKY = [
    "!! hi",  # punctuation then a space: "▁ hi" in the slow tokenizer, not "▁hi"
    "?!",  # nothing left: EOS alone
    "tabs\tand\nnewlines\r\nand\x1cfile separators",
    "non\u00a0breaking\u3000ideographic\u2009thin spaces",
    'it\'s "quoted" (parens) [brackets] {braces} <angles> a/b a\\b a_b a-b',
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ ① ﬁ",  # NFKC in SentencePiece's charsmap, after the punctuation removal
    "a ▁ b▁c",  # SentencePiece's own space symbol in the text
    "ÉCOLE ÇA VA ΟΔΟΣ",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="session")
def spiece_model(tmp_path_factory) -> Path:
    return train_spiece(tmp_path_factory.mktemp("spiece"))


@pytest.fixture(scope="session")
def gemma_files(tmp_path_factory) -> Path:
    """Gemma tokenizer files as SigLIP 2's releases ship them: GemmaTokenizer's tokenizer.json (byte-fallback BPE,
    pad 0, EOS 1, BOS 2), its post-processor appending EOS, tokenizer_config naming GemmaTokenizer."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.train_from_iterator(CAPTIONS, trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    path = tmp_path_factory.mktemp("gemma")
    GemmaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]]).save_pretrained(path)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<eos>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<eos>": {"id": "<eos>", "ids": [1], "tokens": ["<eos>"]}},
    }
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": False, "add_eos_token": True}))
    return path


def reference_tokens(path: Path, texts: list[str], length: int) -> list[list[int]]:
    """transformers' tokenizer for the release, padded to full length on the right as big_vision trained it."""
    cls = SiglipTokenizer if (path / "spiece.model").exists() else Siglip2Tokenizer
    return cls.from_pretrained(path)(
        texts, padding="max_length", max_length=length, truncation=True, padding_side="right"
    )["input_ids"]


@pytest.mark.parametrize(
    "tokenizer,act,resample,image_size,patch",
    [("spiece", "gelu_pytorch_tanh", 3, 30, 10), ("gemma", "gelu", 2, 28, 7), ("spiece", "quick_gelu", 2, 32, 16)],
)
def test_tiny_configs_match_transformers(
    tmp_path, photos, spiece_model, gemma_files, tokenizer, act, resample, image_size, patch
):
    files = spiece_model if tokenizer == "spiece" else gemma_files
    vocab = len(spiece.read(spiece_model).pieces) if tokenizer == "spiece" else 420
    model = hf_siglip(vocab, image_size=image_size, patch=patch, act=act)
    path = save_release(model, tmp_path, files, resample)
    stored = convert_hf(path)
    encoder = SiglipEncoder("tiny", stored)
    assert stored.preprocess["resample"] == {2: "bilinear", 3: "bicubic"}[resample]

    processor = SiglipImageProcessorPil.from_pretrained(path)
    pixels = processor(images=[Image.open(io.BytesIO(photos[n])) for n in IMAGES], return_tensors="pt")["pixel_values"]
    ours = np.stack([encoder.preprocess("image", photos[n]) for n in IMAGES])
    assert ours.shape == (len(IMAGES), 3, image_size, image_size)
    assert np.abs(ours - pixels.numpy()).max() <= 1e-5

    ids = reference_tokens(path, PROMPTS, 16)
    assert encoder.tokenizer(PROMPTS)[0].tolist() == ids

    with torch.inference_mode():
        ref_images = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        ref_texts = model.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy()  # no mask: as trained
    images, texts = encoder.embed("image", list(ours)), encoder.encode("text", PROMPTS)
    assert images.shape == (len(IMAGES), 40) and texts.shape == (len(PROMPTS), 40)
    assert cosines(images, ref_images).min() >= 0.9999
    assert cosines(texts, ref_texts).min() >= 0.9999
    raw = SiglipEncoder("tiny", stored, Options(normalize=False))
    np.testing.assert_allclose(raw.embed("image", list(ours)), ref_images, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(raw.encode("text", PROMPTS), ref_texts, rtol=1e-3, atol=1e-4)


def test_spiece_tokenizer_matches_siglip_tokenizer(tmp_path, spiece_model):
    """Read without sentencepiece, the model tokenises as transformers' slow SiglipTokenizer does."""
    SiglipTokenizer(str(spiece_model), model_max_length=16).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    from encoders.siglip import tokenizer_from_hf

    tokenizer_json, pad_id = tokenizer_from_hf(tmp_path)
    assert pad_id == 1  # "</s>", as SigLIP pads
    ours = Tokenizer.from_str(tokenizer_json)
    ours.enable_truncation(16)
    reference = SiglipTokenizer.from_pretrained(tmp_path)
    for text in PROMPTS + TRICKY:
        assert ours.encode(text).ids == reference(text, truncation=True, max_length=16)["input_ids"], text


def test_siglip2_tokenizer_lowercases_and_pads_with_pad(tmp_path, gemma_files):
    path = save_release(hf_siglip(420), tmp_path, gemma_files)
    encoder = SiglipEncoder("tiny", convert_hf(path))
    assert encoder.dims.pad_token_id == 0
    ids, _ = encoder.tokenizer(["A PHOTO of a Cat", "a photo of a cat"])
    assert ids[0].tolist() == ids[1].tolist() == reference_tokens(path, ["A PHOTO of a Cat"], 16)[0]
    assert ids[0].tolist()[-3:] == [0, 0, 0] and 1 in ids[0]  # EOS after the text, then pads to the full length


def test_scores_are_sigmoids_of_siglip_logits(tmp_path, photos, spiece_model):
    model = hf_siglip(len(spiece.read(spiece_model).pieces))
    path = save_release(model, tmp_path, spiece_model)
    encoder = SiglipEncoder("tiny", convert_hf(path))
    labels = ["a photo of a cat", "a photo of a dog", "a red circle"]
    pixels = SiglipImageProcessorPil.from_pretrained(path)(
        images=[Image.open(io.BytesIO(photos[n])) for n in IMAGES[:2]], return_tensors="pt"
    )["pixel_values"]
    with torch.inference_mode():
        logits = model(pixel_values=pixels, input_ids=torch.tensor(reference_tokens(path, labels, 16))).logits_per_image
        ours = SigLIP(encoder.dims).eval()
        ours.load_state_dict(encoder.stored.tensors)
        our_logits = ours(pixels, torch.from_numpy(encoder.tokenizer(labels)[0]))
    images, texts = encoder.encode("image", [photos[n] for n in IMAGES[:2]]), encoder.encode("text", labels)
    np.testing.assert_allclose(encoder.score(images @ texts.T), torch.sigmoid(logits).numpy(), atol=1e-5)
    np.testing.assert_allclose(encoder.zero_shot(3 * images, texts), encoder.score(images @ texts.T), atol=1e-6)
    np.testing.assert_allclose(our_logits.numpy(), logits.numpy(), atol=1e-4)
    assert sigmoid_scores(np.zeros(2), 1.0, 0.0).tolist() == [0.5, 0.5]  # per label, not a softmax


def test_convert_detects_registers_and_validates(tmp_path, spiece_model, monkeypatch):
    monkeypatch.setenv("MMEMBED_HOME", str(tmp_path / "home"))
    path = save_release(hf_siglip(len(spiece.read(spiece_model).pieces)), tmp_path / "src", spiece_model)
    assert detect(path) == "hf-siglip"
    convert(path, registry.models_dir() / "tiny-siglip.parquet")
    encoder = registry.load_encoder("tiny-siglip")
    assert isinstance(encoder, SiglipEncoder) and encoder.modalities == ("image", "text") and encoder.dim == 40
    assert registry.load_inputs("tiny-siglip").modalities == ("image", "text")
    report = validate("tiny-siglip")
    assert report.kind == "siglip" and "SiglipModel" in report.reference and report.passed, report.to_dict()
    assert {e.modality for e in report.examples} == {"image", "text"}


def test_float16_runs_close_to_float32(tmp_path, photos, spiece_model):
    stored = convert_hf(save_release(hf_siglip(len(spiece.read(spiece_model).pieces)), tmp_path, spiece_model))
    images = [photos[n] for n in IMAGES]
    full, half = SiglipEncoder("tiny", stored), SiglipEncoder("tiny", stored, Options(dtype="float16"))
    assert cosines(half.encode("image", images), full.encode("image", images)).min() >= 0.999
    assert cosines(half.encode("text", PROMPTS), full.encode("text", PROMPTS)).min() >= 0.999


def _edit(path: Path, name: str, edit) -> None:
    config = json.loads((path / name).read_text())
    edit(config)
    (path / name).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "name,edit,message",
    [
        ("config.json", lambda c: c["vision_config"].update(vision_use_head=False), "vision_use_head"),
        ("config.json", lambda c: c["vision_config"].update(image_size=[30, 40]), "square"),
        ("config.json", lambda c: c["text_config"].update(projection_size=32), "projects to 32"),
        ("preprocessor_config.json", lambda c: c.update(resample=0), "resample=0"),
        ("preprocessor_config.json", lambda c: c.update(size={"height": 32, "width": 32}), "size"),
        ("preprocessor_config.json", lambda c: c.update(do_normalize=False), "do_normalize"),
        ("tokenizer_config.json", lambda c: c.update(pad_token="<nope>"), "no piece '<nope>'"),
    ],
)
def test_convert_refuses_what_it_cannot_run(tmp_path, spiece_model, name, edit, message):
    path = save_release(hf_siglip(len(spiece.read(spiece_model).pieces)), tmp_path, spiece_model)
    _edit(path, name, edit)
    with pytest.raises(ConversionError, match=message):
        convert_hf(path)


def test_convert_needs_a_tokenizer_and_refuses_naflex(tmp_path, spiece_model):
    path = save_release(hf_siglip(len(spiece.read(spiece_model).pieces)), tmp_path, spiece_model)
    (path / "spiece.model").unlink()
    with pytest.raises(ConversionError, match="no tokenizer"):
        convert_hf(path)
    _edit(path, "config.json", lambda c: c.update(model_type="siglip2"))
    with pytest.raises(ConversionError, match="NaFlex"):
        detect(path)


def test_spiece_read_refuses_garbage(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(ConversionError, match="cannot read SentencePiece model"):
        spiece.read(tmp_path / "spiece.model")


def test_encoder_errors(tmp_path, spiece_model):
    stored = convert_hf(save_release(hf_siglip(len(spiece.read(spiece_model).pieces)), tmp_path, spiece_model))
    with pytest.raises(ModelLoadError, match="tokenizer"):
        SiglipEncoder("tiny", weights.StoredModel(**vars(stored) | {"tokenizer": None}))
    with pytest.raises(ModelLoadError, match="SigLIP config"):
        SiglipEncoder("tiny", weights.StoredModel(**vars(stored) | {"config": stored.config | {"pad_token_id": 999}}))
    with pytest.raises(ModelLoadError, match="audio"):
        SiglipEncoder("tiny", stored).preprocess("audio", b"RIFF")
    assert SiglipDims(**stored.config).vision_width == 40
