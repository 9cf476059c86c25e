"""`validate(name)`: our encoders against their reference implementations on the built-in samples."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from encoders import registry, weights
from encoders.errors import ModelLoadError
from encoders.validate import THRESHOLD, MissingReferenceError, ValidationReport, validate


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMEMBED_HOME", str(home))
        yield home


def test_minilm_passes_against_sentence_transformers(home):
    report = validate("minilm-l6")
    assert (report.name, report.kind) == ("minilm-l6", "bert")
    assert "sentence-transformers" in report.reference
    assert len(report.examples) >= 5 and {e.modality for e in report.examples} == {"text"}
    assert all(e.cosine >= THRESHOLD for e in report.examples)
    assert report.min_cosine >= 0.9999 and report.passed
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["passed"] is True and len(as_json["examples"]) == len(report.examples)


def test_whisper_tiny_passes_against_ctranslate2(home):
    report = validate("whisper-tiny.en")
    assert report.kind == "whisper" and "ctranslate2" in report.reference
    assert {e.modality for e in report.examples} == {"audio"}
    assert report.min_cosine >= 0.9999 and report.passed


@pytest.fixture(scope="module")
def broken_bert(home) -> str:
    """minilm-l6 with one weight matrix perturbed."""
    stored = weights.load(registry.resolve("minilm-l6"))
    torch.manual_seed(0)
    weight = stored.tensors["blocks.5.mlp.fc2.weight"]
    stored.tensors["blocks.5.mlp.fc2.weight"] = weight + 0.05 * torch.randn_like(weight)
    weights.save(stored, registry.models_dir() / "broken-bert.parquet")
    return "broken-bert"


def test_a_wrong_model_fails(broken_bert):
    report = validate(broken_bert)
    assert report.min_cosine < THRESHOLD and not report.passed
    assert report.to_dict()["passed"] is False


def test_a_store_without_source_cannot_be_validated(home):
    stored = weights.load(registry.resolve("minilm-l6"))
    stored.source = None
    weights.save(stored, registry.models_dir() / "orphan-bert.parquet")
    with pytest.raises(ModelLoadError, match="'orphan-bert': it records no source checkpoint"):
        validate("orphan-bert")


def test_missing_reference_package_names_the_extra(home, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # makes the import raise ImportError
    with pytest.raises(MissingReferenceError, match=r"needs sentence-transformers .*pip install 'mmembed\[dev\]'"):
        validate("minilm-l6")


def test_report_pass_is_per_example():
    from encoders.validate import ExampleResult

    examples = (ExampleResult("text", "a", 1.0), ExampleResult("text", "b", 0.99989))
    report = ValidationReport("m", "bert", "ref", examples)
    assert report.min_cosine == 0.99989 and not report.passed
    assert ValidationReport("m", "bert", "ref", examples[:1]).passed


def write_tiny_clip(path):
    from tokenizers import Tokenizer
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from encoders.vocab import train_tokenizer

    path.mkdir()
    tokenizer = train_tokenizer(
        ["a red circle on a grey background", "a blue square", "the cat sat on the mat"] * 5, 560
    )
    (path / "tokenizer.json").write_text(tokenizer)
    vocab = Tokenizer.from_str(tokenizer).get_vocab()
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    text = layers | dict(
        vocab_size=len(vocab), max_position_embeddings=16, eos_token_id=eos, bos_token_id=bos, pad_token_id=eos
    )
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=layers | dict(image_size=32, patch_size=8), projection_dim=24)
    ).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 16} | specials)
    )
    return path


def test_clip_passes_from_its_checkpoint_and_from_an_export(home, tmp_path):
    import shutil

    from encoders.convert import convert

    src = write_tiny_clip(tmp_path / "tiny-clip")
    convert(src, registry.models_dir() / "tiny-clip.parquet")
    report = validate("tiny-clip")
    assert report.kind == "clip" and "CLIPModel" in report.reference
    assert {e.modality for e in report.examples} == {"image", "text"}
    assert report.min_cosine >= 0.9999 and report.passed
    shutil.rmtree(src)  # as for a model this project trained: no checkpoint on disk, so validate exports one
    exported = validate("tiny-clip")
    assert exported.passed and [e.label for e in exported.examples] == [e.label for e in report.examples]


def test_shapes_clip_passes_through_its_export(home):
    """The bundled demo model was trained here with a word-level tokenizer and validates through export_hf: the
    export must make transformers use its tokenizer.json as it is (CLIPTokenizer rebuilt CLIP's BPE pipeline around
    the vocabulary and turned most words into the unknown token: text cosines fell to about 0)."""
    report = validate("shapes-clip")
    assert report.kind == "clip" and "CLIPModel" in report.reference
    assert report.min_cosine >= 0.9999 and report.passed


def test_the_command_prints_each_figure_and_the_verdict(broken_bert, capsys):
    from jobs.cli import main

    assert main(["models", "validate", "broken-bert"]) == 1
    out = capsys.readouterr().out.splitlines()
    report = validate("broken-bert")
    assert out[0] == f"broken-bert (bert) against {report.reference}, cosine >= {THRESHOLD} on every example:"
    assert len(out) == len(report.examples) + 2
    for line, example in zip(out[1:], report.examples):
        assert line.split()[0] == ("ok" if example.cosine >= THRESHOLD else "FAIL")
        assert line.endswith(f"{example.cosine:.6f}")
    assert out[-1] == f"FAIL: lowest cosine {report.min_cosine:.6f} over {len(report.examples)} examples"
    assert main(["models", "validate", "minilm-l6"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("PASS: lowest cosine ")
