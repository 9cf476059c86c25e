"""The model registry and converter front end: names, first-use conversion into $MMEMBED_HOME, listing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from encoders import registry, weights
from encoders.bert import BertEncoder
from encoders.convert import detect
from encoders.errors import ConversionError, ModelLoadError
from encoders.options import Options

MINILM_DIR = registry.PACKAGED["minilm-l6"]()


@pytest.fixture(scope="module")
def converted_home(tmp_path_factory):
    """A model home where minilm-l6 has been converted once (the conversion takes seconds)."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMEMBED_HOME", str(home))
        registry.resolve("minilm-l6")
        yield home


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MMEMBED_HOME", str(tmp_path))
    return tmp_path


def test_bundled_names_include_the_packaged_models():
    assert {"minilm-l6", "whisper-tiny.en"} <= set(registry.bundled_names())


def test_packaged_model_is_converted_once_into_the_home(converted_home):
    path = registry.resolve("minilm-l6")
    assert path == registry.models_dir() / "minilm-l6.parquet"
    meta = weights.read_meta(path)
    assert meta["kind"] == "bert"
    assert meta["source"] == str(MINILM_DIR.resolve())
    assert meta["config"]["max_seq_length"] == 256 and meta["config"]["normalize"] is True
    before = path.stat().st_mtime_ns
    assert registry.resolve("minilm-l6") == path
    assert path.stat().st_mtime_ns == before


def test_load_encoder_by_name_and_by_path(converted_home):
    encoder = registry.load_encoder("minilm-l6", Options(device="cpu"))
    assert isinstance(encoder, BertEncoder)
    assert (encoder.name, encoder.kind, encoder.dim) == ("minilm-l6", "bert", 384)
    by_path = registry.load_encoder(str(registry.resolve("minilm-l6")), Options(device="cpu"))
    assert by_path.name == "minilm-l6" and by_path.digest == encoder.digest
    out = encoder.encode("text", ["a cat", "a dog"])
    assert out.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(out, by_path.encode("text", ["a cat", "a dog"]))


def test_unknown_name_says_what_is_known(converted_home):
    shutil.copy(registry.resolve("minilm-l6"), registry.models_dir() / "my-bert.parquet")
    with pytest.raises(ModelLoadError) as e:
        registry.resolve("no-such-model")
    message = str(e.value)
    assert "unknown model 'no-such-model'" in message
    for name in ("minilm-l6", "whisper-tiny.en", "my-bert"):
        assert name in message
    assert "mmembed models convert SRC NAME" in message
    (registry.models_dir() / "my-bert.parquet").unlink()


def test_missing_store_path_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model store at"):
        registry.resolve(str(tmp_path / "gone.parquet"))


def test_list_models_before_any_conversion(empty_home):
    infos = {m.name: m for m in registry.list_models()}
    assert infos["minilm-l6"].kind == "bert" and infos["whisper-tiny.en"].kind == "whisper"
    for name in ("minilm-l6", "whisper-tiny.en"):
        assert (infos[name].source, infos[name].path, infos[name].size_bytes) == ("bundled", None, None)
    assert not registry.models_dir().exists()  # listing converts nothing


def test_list_models_after_conversion_shows_bundled_and_converted(converted_home):
    path = registry.resolve("minilm-l6")
    mine = registry.models_dir() / "mine.parquet"
    shutil.copy(path, mine)
    infos = {m.name: m for m in registry.list_models()}
    assert infos["minilm-l6"] == registry.ModelInfo("minilm-l6", "bert", "bundled", path, path.stat().st_size)
    assert infos["mine"] == registry.ModelInfo("mine", "bert", "converted", mine, mine.stat().st_size)
    mine.unlink()


def test_detect_formats(tmp_path):
    assert detect(MINILM_DIR) == "hf-bert"
    assert detect(registry.PACKAGED["whisper-tiny.en"]()) == "ct2-whisper"
    with pytest.raises(ConversionError, match="no config.json"):
        detect(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConversionError, match="unsupported model_type 'gpt2'"):
        detect(tmp_path)


def test_unknown_kind_is_a_load_error():
    with pytest.raises(ModelLoadError, match="unknown model kind 'llama'"):
        registry.encoder_class("llama")
    assert registry.encoder_class("bert") is BertEncoder
