"""BertEncoder against sentence-transformers (the real MiniLM) and transformers (tiny random checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from encoders import weights
from encoders.bert import CHUNK, BertEncoder, convert_hf
from encoders.errors import ConversionError, ModelLoadError, TextValidationError
from encoders.options import Options
from encoders.registry import PACKAGED

MINILM_DIR = PACKAGED["minilm-l6"]()
LONG = " ".join(f"token{i} is a word" for i in range(200))  # well over 256 word pieces

TEXTS = [
    "A man is eating food.",
    "hi",
    "Naïve café owners in Zürich serve crème brûlée — 東京 and Москва too! 🙂",
    "What?! No... yes; maybe: (probably) [definitely] {not} <sure> #hashtag @user 100% $5.00",
    LONG,
    LONG + " but this tail lies past the truncation point",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "ALL CAPS SHOUTING TEXT",
    "tabs\tand\nnewlines\r\nin the middle",
    "x" * 300,
]

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "red",
    "blue",
    "big",
    "small",
    "ran",
    "fast",
    "and",
    ",",
    ".",
    "!",
    "?",
    "##s",
    "##ing",
    "hello",
    "world",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


@pytest.fixture(scope="module")
def minilm():
    return convert_hf(MINILM_DIR)


@pytest.fixture(scope="module")
def encoder(minilm):
    return BertEncoder("minilm-l6", minilm, Options(device="cpu"))


def test_minilm_matches_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(MINILM_DIR), device="cpu").encode(TEXTS, normalize_embeddings=True)
    ours = encoder.encode("text", TEXTS)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert cosines(ours, reference).min() >= 0.9999
    assert np.abs(ours - reference).max() < 1e-4


def test_minilm_truncates_at_max_seq_length(encoder):
    ids, mask = encoder.tokenizer([LONG])
    assert ids.shape == (1, 256) and mask.all()
    long, tail = encoder.encode("text", [LONG, LONG + " but this tail lies past the truncation point"])
    np.testing.assert_allclose(long, tail, atol=1e-6)


def test_bf16_close_to_fp32(minilm, encoder):
    bf16 = BertEncoder("minilm-l6", minilm, Options(device="cpu", dtype="bfloat16"))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    out = bf16.encode("text", TEXTS)
    assert out.dtype == np.float32
    assert cosines(out, encoder.encode("text", TEXTS)).min() >= 0.999


def test_batch_invariance_across_chunks(encoder):
    rng = np.random.default_rng(0)
    words = [
        "the",
        "model",
        "reads",
        "short",
        "and",
        "very",
        "long",
        "sentences",
        "alike",
        ",",
        "with",
        "some",
        "unicode",
        "é",
        "東",
        "!",
    ]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(CHUNK + 22)]
    batched = encoder.encode("text", texts)
    picked = range(0, len(texts), 5)
    singles = np.concatenate([encoder.encode("text", [texts[i]]) for i in picked])
    assert np.abs(batched[picked] - singles).max() < 1e-5
    reversed_batch = encoder.encode("text", texts[::-1])[::-1]
    assert np.abs(batched - reversed_batch).max() < 1e-5


@pytest.mark.parametrize("raw", ["", "   ", "\n\t", b"", b"  "])
def test_empty_text_is_rejected(encoder, raw):
    with pytest.raises(TextValidationError, match="empty"):
        encoder.preprocess("text", raw)
    with pytest.raises(TextValidationError):
        encoder.encode("text", ["fine", raw])


def test_other_modalities_are_rejected(encoder):
    assert encoder.modalities == ("text",) and encoder.dim == 384
    with pytest.raises(ModelLoadError, match="no image tower"):
        encoder.preprocess("image", b"\x89PNG")


@settings(max_examples=25, deadline=None)
@given(st.text(min_size=1, max_size=200).filter(lambda t: t.strip()))
def test_embeddings_are_unit_shaped_and_deterministic(encoder, text):
    first = encoder.encode("text", [text])
    assert first.shape == (1, 384)
    assert np.all(np.isfinite(first))
    assert abs(np.linalg.norm(first) - 1) < 1e-5
    np.testing.assert_array_equal(first, encoder.encode("text", [text]))


def test_store_round_trip(minilm, encoder, tmp_path):
    loaded = weights.load(weights.save(minilm, tmp_path / "m.parquet"))
    assert loaded.digest == minilm.digest
    again = BertEncoder("minilm-l6", loaded, Options(device="cpu"))
    np.testing.assert_array_equal(again.encode("text", TEXTS[:3]), encoder.encode("text", TEXTS[:3]))


# ---- tiny random checkpoints vs transformers ----


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", VOCAB.index("[CLS]")), ("[SEP]", VOCAB.index("[SEP]"))]
    )
    tok.save(str(path))


def write_checkpoint(path: Path, model_type: str = "bert", **overrides) -> Path:
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    config_cls, model_cls = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel)}[model_type]
    config = (
        dict(
            vocab_size=len(VOCAB),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
            pad_token_id=0,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
        )
        | overrides
    )
    torch.manual_seed(0)
    model = model_cls(config_cls(**config)).eval()
    with torch.no_grad():  # random LayerNorm affines so the test would notice a swapped ln1/ln2
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    model.save_pretrained(path)
    write_tokenizer(path / "tokenizer.json")
    return path


TINY_TEXTS = [
    "the cat sat on the mat",
    "hello",
    "big red dogs running fast , and the small blue cat sat !",
    "unknownword ?",
]


def reference_hidden(path: Path, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModel, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), pad_token="[PAD]")
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(path).eval()(**batch).last_hidden_state
    return hidden, batch["attention_mask"]


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_tiny_checkpoint_matches_transformers_mean_pooling(tmp_path, model_type):
    path = write_checkpoint(tmp_path, model_type, **({"type_vocab_size": 1} if model_type == "roberta" else {}))
    stored = convert_hf(path)
    assert stored.config["pooling"] == "mean" and not stored.config["normalize"]
    hidden, mask = reference_hidden(path, TINY_TEXTS, stored.config["max_seq_length"])
    m = mask.unsqueeze(-1).float()
    reference = ((hidden * m).sum(1) / m.sum(1)).numpy()
    ours = BertEncoder("tiny", stored, Options(device="cpu", normalize=False)).encode("text", TINY_TEXTS)
    assert cosines(ours, reference).min() >= 0.9999
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_sentence_transformers_modules_cls_pooling_and_length(tmp_path):
    path = write_checkpoint(tmp_path)
    (path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 6, "do_lower_case": True}))
    stored = convert_hf(path)
    assert (stored.config["pooling"], stored.config["normalize"], stored.config["max_seq_length"]) == ("cls", True, 6)
    hidden, _ = reference_hidden(path, TINY_TEXTS, 6)
    assert hidden.shape[1] == 6
    encoder = BertEncoder("tiny", stored, Options(device="cpu", normalize=False))
    assert encoder.preprocess("text", "  The CAT sat ") == "the cat sat"  # sentence-transformers' do_lower_case
    ours = encoder.encode("text", TINY_TEXTS)
    reference = torch.nn.functional.normalize(hidden[:, 0], dim=-1).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_max_seq_length_defaults_to_positions(tmp_path):
    assert convert_hf(write_checkpoint(tmp_path / "b")).config["max_seq_length"] == 40
    roberta = convert_hf(write_checkpoint(tmp_path / "r", "roberta", max_position_embeddings=42))
    assert (roberta.config["max_seq_length"], roberta.config["position_offset"]) == (41, 1)  # positions 1..41


def test_unexpected_or_missing_tensor_is_a_conversion_error(tmp_path):
    path = write_checkpoint(tmp_path)
    weights = load_file(path / "model.safetensors")
    save_file(weights | {"encoder.layer.0.attention.self.rotary.weight": torch.zeros(2)}, path / "model.safetensors")
    with pytest.raises(ConversionError, match="unexpected tensor 'encoder.layer.0.attention.self.rotary.weight'"):
        convert_hf(path)
    del weights["encoder.layer.1.output.LayerNorm.bias"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ConversionError, match="the checkpoint has no tensor 'encoder.layer.1.output.LayerNorm.bias'"):
        convert_hf(path)


def test_config_without_a_dimension_is_a_conversion_error(tmp_path):
    path = write_checkpoint(tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="has no 'num_hidden_layers'"):
        convert_hf(path)


def test_wrong_shape_is_a_conversion_error(tmp_path):
    path = write_checkpoint(tmp_path)
    weights = load_file(path / "model.safetensors")
    weights["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(65, 32)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(
        ConversionError,
        match=r"intermediate.dense.weight has shape \(65, 32\) for 'blocks.0.mlp.fc1.weight', the config implies \(64, 32\)",
    ):
        convert_hf(path)


def test_unsupported_pooling_and_module_are_named(tmp_path):
    path = write_checkpoint(tmp_path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "weightedmean"}))
    modules = [
        {"type": "sentence_transformers.models.Transformer", "path": ""},
        {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConversionError, match="pooling 'weightedmean' is not supported"):
        convert_hf(path)
    (path / "modules.json").write_text(
        json.dumps(modules[:1] + [{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}])
    )
    with pytest.raises(ConversionError, match="'sentence_transformers.models.Dense' is not supported"):
        convert_hf(path)


def test_pytorch_bin_checkpoint_converts_like_safetensors(tmp_path):
    path = write_checkpoint(tmp_path)
    expected = convert_hf(path)
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    assert convert_hf(path).digest == expected.digest
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors or pytorch_model.bin"):
        convert_hf(path)
