import io
import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from encoders import checkpoint, registry, weights
from encoders.clip import CLIP, CLIPDims, ClipEncoder, convert_hf, export_hf
from encoders.errors import ConversionError, ModelLoadError, TextValidationError
from encoders.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from encoders.options import Options
from encoders.vocab import clip_bpe, train_tokenizer

PROMPTS = [
    "a red circle",
    "A photo of a CAT!!",
    "naïve café déjà vu — 東京 🚀",
    "x",
    " ".join(
        f"a {c} square next to a {c} star," for c in ["red", "green", "blue", "yellow", "purple"] * 4
    ),  # > 77 tokens
]
IMAGES = ["astronaut.png", "coffee.png", "chelsea.png", "camera.png", "rocket.jpg", "logo.png"]
BOS, EOS = 757, 758  # the fixture tokenizer's special ids


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def hf_clip(
    image_size=32,
    patch_size=16,
    act="gelu",
    eos=EOS,
    vision=(64, 2, 4, 128),
    text=(64, 2, 4, 128),
    embed=48,
    vocab=759,
    noise=True,
) -> CLIPModel:
    """A transformers CLIPModel with random weights: HF's init plus (by default) noise, so that no bias is 0 and no LN is 1."""
    width, layers, heads, mlp = vision
    vision_config = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp)
    width, layers, heads, mlp = text
    text_config = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp)
    config = CLIPConfig(
        text_config=text_config
        | dict(vocab_size=vocab, hidden_act=act, eos_token_id=eos, bos_token_id=BOS, pad_token_id=EOS),
        vision_config=vision_config | dict(image_size=image_size, patch_size=patch_size, hidden_act=act),
        projection_dim=embed,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters() if noise else ():
            p.add_(0.02 * torch.randn_like(p))
    return model


def save_hf(model: CLIPModel, path: Path, tokenizer_json: str, size: int) -> Path:
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(tokenizer_json)
    crop = model.config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop}).save_pretrained(path)
    return path


def hf_features(model: CLIPModel, path: Path, photos: dict, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: transformers' own processor, tokenizer and get_*_features on the same raw inputs."""
    processor, tokenizer = CLIPImageProcessorPil.from_pretrained(path), CLIPTokenizer.from_pretrained(path)
    pixels = processor(images=[Image.open(io.BytesIO(photos[n])) for n in IMAGES], return_tensors="pt")["pixel_values"]
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.inference_mode():
        images = model.get_image_features(pixel_values=pixels).pooler_output
        texts = model.get_text_features(**tokens).pooler_output
    return images.numpy(), texts.numpy()


def our_features(encoder: ClipEncoder, photos: dict, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encoder.encode("image", [photos[n] for n in IMAGES]), encoder.encode("text", texts)


# --- parity with transformers ------------------------------------------------------------


@pytest.mark.parametrize(
    "patch,image_size,size,act,eos",
    [
        (14, 28, 32, "quick_gelu", EOS),
        (16, 32, 36, "gelu", 2),
        (32, 64, 64, "gelu", EOS),
        (16, 48, 56, "quick_gelu", 2),
    ],
)
def test_tiny_configs_match_transformers(tmp_path, photos, clip_tokenizer_json, patch, image_size, size, act, eos):
    model = hf_clip(image_size=image_size, patch_size=patch, act=act, eos=eos)
    path = save_hf(model, tmp_path, clip_tokenizer_json, size)
    stored = convert_hf(path)
    assert stored.config["legacy_eos_pooling"] == (eos == 2)
    assert stored.preprocess["size"] == size and stored.preprocess["crop_size"] == image_size
    ref_images, ref_texts = hf_features(model, path, photos, PROMPTS)
    images, texts = our_features(ClipEncoder("tiny", stored), photos, PROMPTS)
    assert images.shape == (len(IMAGES), 48) and texts.shape == (len(PROMPTS), 48)
    assert cosines(images, ref_images).min() >= 0.9999
    assert cosines(texts, ref_texts).min() >= 0.9999
    raw_images, raw_texts = our_features(ClipEncoder("tiny", stored, Options(normalize=False)), photos, PROMPTS)
    np.testing.assert_allclose(raw_images, ref_images, rtol=1e-3, atol=1e-4)  # unnormalised, like get_image_features
    np.testing.assert_allclose(raw_texts, ref_texts, rtol=1e-3, atol=1e-4)


def test_tokenization_matches_transformers(tmp_path, clip_tokenizer_json):
    path = save_hf(hf_clip(), tmp_path, clip_tokenizer_json, 36)
    encoder = ClipEncoder("tiny", convert_hf(path))
    ref = CLIPTokenizer.from_pretrained(path)(PROMPTS, truncation=True, max_length=77)["input_ids"]
    ids, mask = encoder.tokenizer(PROMPTS)
    assert [row[m == 1].tolist() for row, m in zip(ids, mask)] == ref
    assert len(ref[-1]) == 77 and ref[-1][-1] == EOS  # the long prompt was truncated, keeping EOS


@pytest.mark.parametrize("hf_eos,legacy", [(2, True), (5, False)])
def test_eos_pooling_follows_transformers(tmp_path, clip_tokenizer_json, hf_eos, legacy):
    """eos 2: OpenAI's rule, the highest id (758 here). eos 5: a custom vocabulary's EOS, pooled at its first occurrence."""
    model = hf_clip(eos=hf_eos)
    stored = convert_hf(save_hf(model, tmp_path, clip_tokenizer_json, 36))
    assert stored.config["legacy_eos_pooling"] is legacy and stored.config["eos_token_id"] == hf_eos
    ids = torch.tensor([[BOS, 300, 5, 758, 12, 5], [BOS, 600, 5, 2, 758, 0]])  # every rule pools at a different place
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])

    def text_features(config: dict) -> torch.Tensor:
        ours = CLIP(CLIPDims(**config)).eval()
        ours.load_state_dict(stored.tensors)
        return ours.encode_text(ids, mask)

    with torch.inference_mode():
        ref = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        got = text_features(stored.config)
        other_rule = text_features(stored.config | {"legacy_eos_pooling": not legacy})
    assert F.cosine_similarity(got, ref).min() >= 0.9999
    assert F.cosine_similarity(other_rule, ref).max() < 0.99  # the flag really moves the pooling


# --- ViT-B/32 dimensions ---------------------------------------------------------------------

B32_IMAGES = ["astronaut.png", "rocket.jpg"]  # square PNG, non-square JPEG
B32_PROMPTS = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]  # short, unicode, truncated


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory, clip_tokenizer_json, photos):
    """OpenAI ViT-B/32 dimensions (transformers' defaults, legacy eos_token_id 2 as in openai/clip-vit-base-patch32),
    with the fp32 encoder and its embeddings of B32_IMAGES and B32_PROMPTS."""
    path = tmp_path_factory.mktemp("vit-b32")
    model = hf_clip(
        image_size=224,
        patch_size=32,
        act="quick_gelu",
        eos=2,
        vision=(768, 12, 12, 3072),
        text=(512, 12, 8, 2048),
        embed=512,
        vocab=49408,
        noise=False,  # the tiny configs check biases and norms; this one checks scale
    )
    save_hf(model, path, clip_tokenizer_json, 224)
    stored = convert_hf(path)
    encoder = ClipEncoder("b32", stored)
    images = [photos[n] for n in B32_IMAGES]
    return SimpleNamespace(
        model=model,
        path=path,
        stored=stored,
        encoder=encoder,
        images=images,
        image_embeddings=encoder.encode("image", images),
        text_embeddings=encoder.encode("text", B32_PROMPTS),
    )


def test_vit_b32_matches_transformers(vit_b32):
    processor, tokenizer = (
        CLIPImageProcessorPil.from_pretrained(vit_b32.path),
        CLIPTokenizer.from_pretrained(vit_b32.path),
    )
    pixels = processor(images=[Image.open(io.BytesIO(b)) for b in vit_b32.images], return_tensors="pt")["pixel_values"]
    tokens = tokenizer(B32_PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.inference_mode():
        ref_images = vit_b32.model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        ref_texts = vit_b32.model.get_text_features(**tokens).pooler_output.numpy()
    assert cosines(vit_b32.image_embeddings, ref_images).min() >= 0.9999
    assert cosines(vit_b32.text_embeddings, ref_texts).min() >= 0.9999


def test_bfloat16_is_close_to_float32(vit_b32):
    half = ClipEncoder("b32", vit_b32.stored, Options(dtype="bfloat16"))
    assert half.model.vision.proj.weight.dtype == torch.bfloat16
    assert cosines(half.encode("image", vit_b32.images), vit_b32.image_embeddings).min() >= 0.999
    assert cosines(half.encode("text", B32_PROMPTS), vit_b32.text_embeddings).min() >= 0.999


def test_batch_equals_one_by_one(vit_b32):
    single = np.concatenate([vit_b32.encoder.encode("image", [x]) for x in vit_b32.images])
    assert np.abs(vit_b32.image_embeddings - single).max() <= 1e-5
    single = np.concatenate(
        [vit_b32.encoder.encode("text", [t]) for t in B32_PROMPTS]
    )  # unpadded, vs padded in the batch
    assert np.abs(vit_b32.text_embeddings - single).max() <= 1e-5


# --- export and conversion ---------------------------------------------------------------


def test_export_round_trips_exactly(tmp_path, tiny_clip):
    back = convert_hf(export_hf(tiny_clip, tmp_path / "hf"))
    assert back.config == tiny_clip.config and back.preprocess == tiny_clip.preprocess
    assert back.tokenizer == tiny_clip.tokenizer
    assert back.tensors.keys() == tiny_clip.tensors.keys()
    assert all(torch.equal(back.tensors[k], tiny_clip.tensors[k]) for k in back.tensors)
    assert back.digest == tiny_clip.digest


def test_converted_legacy_model_round_trips(tmp_path, clip_tokenizer_json):
    stored = convert_hf(save_hf(hf_clip(eos=2), tmp_path / "src", clip_tokenizer_json, 36))
    assert convert_hf(export_hf(stored, tmp_path / "out")).digest == stored.digest


def test_transformers_serves_an_exported_model(tmp_path, tiny_clip, photos):
    """What `mmembed models validate` relies on: our own model, judged by transformers."""
    path = export_hf(tiny_clip, tmp_path / "hf")
    model, info = CLIPModel.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    ref_images, ref_texts = hf_features(model.eval(), path, photos, PROMPTS)
    images, texts = our_features(ClipEncoder("tiny", tiny_clip), photos, PROMPTS)
    assert cosines(images, ref_images).min() >= 0.9999
    assert cosines(texts, ref_texts).min() >= 0.9999


def test_export_refuses_pooling_transformers_cannot_express(tmp_path, tiny_clip):
    tiny_clip.config = tiny_clip.config | {"eos_token_id": 2, "legacy_eos_pooling": False}
    with pytest.raises(ConversionError, match="eos_token_id"):
        export_hf(tiny_clip, tmp_path)


def test_convert_pytorch_bin_with_position_ids(tmp_path, clip_tokenizer_json):
    model = hf_clip()
    path = save_hf(model, tmp_path, clip_tokenizer_json, 36)
    expected = convert_hf(path)
    state = dict(model.state_dict(), **{"text_model.embeddings.position_ids": torch.arange(77)[None]})
    torch.save(state, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    assert convert_hf(path).digest == expected.digest


def test_convert_builds_the_tokenizer_from_vocab_and_merges(tmp_path, clip_tokenizer_json):
    path = save_hf(hf_clip(), tmp_path, clip_tokenizer_json, 36)
    (path / "tokenizer.json").unlink()
    Tokenizer.from_str(clip_tokenizer_json).model.save(str(path))
    built = Tokenizer.from_str(convert_hf(path).tokenizer)
    reference = CLIPTokenizer.from_pretrained(path)  # transformers builds its own from vocab.json + merges.txt
    original = Tokenizer.from_str(clip_tokenizer_json)
    for text in PROMPTS:
        assert built.encode(text).ids == reference(text)["input_ids"] == original.encode(text).ids
    assert checkpoint.tokenizer_json(path, bpe=clip_bpe) == convert_hf(path).tokenizer


def _rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda t: t.pop("vision_model.encoder.layers.1.self_attn.k_proj.bias"),
            "vision_model.encoder.layers.1.self_attn.k_proj.bias",
        ),
        (lambda t: t.update({"text_projection.weight": torch.zeros(48, 60)}), "text_projection.weight"),
        (
            lambda t: t.update({"text_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(1)}),
            "text_model.encoder.layers.2.mlp.fc1.weight",
        ),
    ],
)
def test_convert_names_a_bad_tensor(tmp_path, clip_tokenizer_json, edit, message):
    path = save_hf(hf_clip(), tmp_path, clip_tokenizer_json, 36)
    _rewrite_weights(path, edit)
    with pytest.raises(ConversionError, match=message):
        convert_hf(path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"do_center_crop": False}, "do_center_crop"),
        ({"size": {"height": 32, "width": 32}}, "size"),
        ({"crop_size": {"height": 28, "width": 28}}, "crop_size"),
        ({"resample": 2}, "bicubic"),
    ],
)
def test_convert_refuses_unsupported_preprocessing(tmp_path, clip_tokenizer_json, change, message):
    path = save_hf(hf_clip(), tmp_path, clip_tokenizer_json, 36)
    config = json.loads((path / "preprocessor_config.json").read_text()) | change
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message):
        convert_hf(path)


def test_convert_needs_weights_and_tokenizer(tmp_path, clip_tokenizer_json):
    path = save_hf(hf_clip(), tmp_path, clip_tokenizer_json, 36)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="tokenizer"):
        convert_hf(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="model.safetensors"):
        convert_hf(path)


def test_old_style_config_and_preprocessor(tmp_path, clip_tokenizer_json):
    """openai/clip-vit-base-patch32 style: *_config_dict overrides, int sizes, missing keys take HF defaults."""
    model = hf_clip(act="quick_gelu", eos=2)
    path = save_hf(model, tmp_path, clip_tokenizer_json, 36)
    config = json.loads((path / "config.json").read_text())
    config["text_config_dict"] = {"hidden_size": 64}
    config["text_config"]["hidden_size"] = 999  # the _dict wins, as in transformers
    del config["vision_config"]["hidden_act"], config["text_config"]["hidden_act"]  # default: quick_gelu
    (path / "config.json").write_text(json.dumps(config))
    (path / "preprocessor_config.json").write_text(json.dumps({"size": 36, "crop_size": 32, "do_center_crop": True}))
    stored = convert_hf(path)
    assert stored.config["text_width"] == 64 and stored.config["activation"] == "quick_gelu"
    assert stored.preprocess == {
        "size": 36,
        "crop_size": 32,
        "mean": list(OPENAI_CLIP_MEAN),
        "std": list(OPENAI_CLIP_STD),
    }


# --- tokenizer -------------------------------------------------------------------------------


def test_train_tokenizer_lays_out_like_openai(tmp_path):
    texts = ["a red circle on a blue square", "two green triangles", "a yellow star"] * 20
    tokenizer = Tokenizer.from_str(train_tokenizer(texts, 560))
    assert tokenizer.get_vocab_size() <= 560
    assert tokenizer.token_to_id("<|endoftext|>") == tokenizer.get_vocab_size() - 1
    assert tokenizer.token_to_id("<|startoftext|>") == tokenizer.get_vocab_size() - 2
    assert tokenizer.token_to_id("!") == 0 and tokenizer.token_to_id("!</w>") == 256  # OpenAI's byte order
    ids = tokenizer.encode("A red circle!? 東京").ids
    assert ids[0] == tokenizer.get_vocab_size() - 2 and ids[-1] == tokenizer.get_vocab_size() - 1
    assert tokenizer.decode(ids).replace("</w>", " ").split() == ["a", "red", "circle", "!?", "東京"]


# --- the encoder -----------------------------------------------------------------------------


def test_registry_loads_a_clip_store(tmp_path, tiny_clip, photos):
    path = weights.save(tiny_clip, tmp_path / "tiny.parquet")
    encoder = registry.load_encoder(str(path))
    assert isinstance(encoder, ClipEncoder) and encoder.dim == 24 and encoder.modalities == ("image", "text")
    item = encoder.preprocess("image", photos["coffee.png"])
    assert item.shape == (3, 32, 32) and item.dtype == np.float32
    out = encoder.embed("image", [item, item])
    assert out.shape == (2, 24) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert encoder.embed("text", []).shape == (0, 24)
    assert encoder.preprocess("text", b"  a red circle \n") == "a red circle"


def test_encoder_errors(tiny_clip):
    encoder = ClipEncoder("tiny", tiny_clip)
    with pytest.raises(ModelLoadError, match="audio"):
        encoder.preprocess("audio", b"RIFF")
    with pytest.raises(TextValidationError):
        encoder.preprocess("text", "   ")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        ClipEncoder("tiny", weights.StoredModel(**vars(tiny_clip) | {"tokenizer": None}))
    with pytest.raises(ModelLoadError, match="CLIP config"):
        ClipEncoder("tiny", weights.StoredModel(**vars(tiny_clip) | {"config": tiny_clip.config | {"text_heads": 5}}))


def test_float16_runs_close_to_float32(tiny_clip, photos):
    full = our_features(ClipEncoder("tiny", tiny_clip), photos, PROMPTS)
    half = our_features(ClipEncoder("tiny", tiny_clip, Options(dtype="float16")), photos, PROMPTS)
    assert cosines(half[0], full[0]).min() >= 0.999 and cosines(half[1], full[1]).min() >= 0.999


# --- training ---------------------------------------------------------------------------------


def test_clip_trains_with_a_contrastive_loss(tiny_clip):
    torch.manual_seed(0)
    model = CLIP(CLIPDims(**tiny_clip.config))
    pixels = torch.randn(4, 3, 32, 32)
    ids = torch.tensor([[BOS, 10 + i, 20 + i, EOS, 0] for i in range(4)])
    mask = torch.tensor([[1, 1, 1, 1, 0]] * 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        logits = model(pixels, ids, mask)
        assert logits.shape == (4, 4)
        labels = torch.arange(4)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert asdict(model.dims) == tiny_clip.config


def test_scores_are_clips_zero_shot_softmax(tmp_path, photos, clip_tokenizer_json):
    model = hf_clip()
    path = save_hf(model, tmp_path, clip_tokenizer_json, 36)
    encoder = ClipEncoder("tiny", convert_hf(path))
    labels = PROMPTS[:3]
    pixels = CLIPImageProcessorPil.from_pretrained(path)(
        images=[Image.open(io.BytesIO(photos[n])) for n in IMAGES[:2]], return_tensors="pt"
    )["pixel_values"]
    tokens = CLIPTokenizer.from_pretrained(path)(labels, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(pixel_values=pixels, **tokens).logits_per_image
    cos = encoder.encode("image", [photos[n] for n in IMAGES[:2]]) @ encoder.encode("text", labels).T
    np.testing.assert_allclose(encoder.score(cos), logits.softmax(-1).numpy(), atol=1e-5)
