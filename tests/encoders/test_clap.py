"""CLAP against transformers' ClapModel, ClapFeatureExtractor and RobertaTokenizer (small random checkpoints)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from transformers import ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

from encoders import clap_audio, registry, weights
from encoders.clap import ClapEncoder, convert_hf, preprocess_from_hf
from encoders.convert import convert, detect
from encoders.errors import ConversionError
from encoders.model import Options
from jobs.bench.clap import bench_audio, write_reference

FIXTURES = Path(__file__).parents[1] / "fixtures" / "audio"
SPEECH = Path(__file__).parents[2] / "jobs" / "sample_media" / "speech"
RATE = 48_000

# Odd sizes with the real structure: three Swin stages, shifted windows that do not divide the grid (5 over 48, 24
# and 12 tokens: padded), a patch kernel wider than its stride, heads of 3, 4 and 6 dims.
UNFUSED = dict(
    spec_size=192, num_mel_bins=32, patch_size=6, patch_stride=[4, 4], window_size=5,
    patch_embeds_hidden_size=6, depths=[2, 3, 2], num_attention_heads=[2, 3, 4], hidden_size=24,
)  # fmt: skip
# LAION's layout shrunk in width only: 64 mel bins on a 256 square, four stages, the last one window-sized (unshifted)
LAION_LIKE = dict(
    spec_size=256, num_mel_bins=64, window_size=8, patch_embeds_hidden_size=6,
    depths=[2, 2, 1, 2], num_attention_heads=[2, 3, 4, 6], hidden_size=48,
)  # fmt: skip
# fused (64 mel bins: transformers' fusion fixes them), windows of 6 over 64, 32 and 16 tokens: padded
FUSED = dict(
    window_size=6, patch_embeds_hidden_size=9, depths=[2, 2, 2], num_attention_heads=[1, 2, 3], hidden_size=36,
    enable_fusion=True, fusion_type="aff_2d", aff_block_r=4,
)  # fmt: skip
TEXT = dict(
    hidden_size=20, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, max_position_embeddings=40
)
FEATURES = dict(frequency_min=50, frequency_max=14_000)
TEXTS = [
    "a dog barking",
    "the sound of rain on a tin roof",
    "Hello world, how are you? <mask> and  <mask>",
    "</s> special <s> tokens inside, café naïve 東京 🙂",
    " leading space",
    "rain " * 60,  # past the 38 tokens the 40 positions leave
]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def clips() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    t = np.arange(int(1.5 * 44_100)) / 44_100
    return {
        "speech_us": (SPEECH / "cat_us.flac").read_bytes(),
        "speech_gb": (SPEECH / "rocket_gb-female.flac").read_bytes(),
        "fox_8k": (FIXTURES / "fox_8k.wav").read_bytes(),
        "stella_stereo": (FIXTURES / "stella_44k_stereo.flac").read_bytes(),
        "rain_mp3": (FIXTURES / "rain_44k_stereo.mp3").read_bytes(),
        "tone": wav((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44_100),
        "noise_10s": wav((0.1 * rng.standard_normal(10 * RATE)).astype(np.float32), RATE),  # exactly 10 s: no padding
        "click": wav(np.r_[np.ones(40), np.zeros(4000)].astype(np.float32), 16_000),  # 0.25 s: repeated 40 times
    }


CLIPS = clips()
LONG = (FIXTURES / "long_8k.ogg").read_bytes()  # 33.8 s


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clap")
    return {
        "unfused": write_reference(root / "unfused", UNFUSED, TEXT, FEATURES | dict(feature_size=32, truncation="rand_trunc")),
        "laion_like": write_reference(root / "laion_like", LAION_LIKE, TEXT, FEATURES | dict(truncation="rand_trunc"), seed=1),
        "fused": write_reference(root / "fused", FUSED, TEXT, FEATURES | dict(truncation="fusion"), seed=2),
    }  # fmt: skip


@pytest.fixture(scope="module")
def encoders(checkpoints) -> dict[str, ClapEncoder]:
    return {
        k: ClapEncoder(k, convert_hf(src), Options(device="cpu", normalize=False)) for k, src in checkpoints.items()
    }


def reference(src: Path) -> tuple[ClapModel, ClapFeatureExtractor]:
    return ClapModel.from_pretrained(src).eval(), ClapFeatureExtractor.from_pretrained(src)


def hf_audio(model: ClapModel, features: np.ndarray, longer: list[bool] | None = None) -> np.ndarray:
    inputs = {"input_features": torch.from_numpy(features)}
    if longer is not None:
        inputs["is_longer"] = torch.tensor(longer)[:, None]
    with torch.no_grad():
        return model.get_audio_features(**inputs).pooler_output.numpy()


def decoded(raw: bytes) -> np.ndarray:
    return clap_audio.audio.decode(raw, RATE)


@pytest.mark.parametrize(
    "settings",
    [
        dict(feature_size=64, frequency_min=50, truncation="rand_trunc"),  # LAION unfused
        dict(feature_size=64, frequency_min=50, truncation="fusion"),  # LAION fused: HTK filters
        dict(
            feature_size=40,
            fft_window_size=800,
            hop_length=320,
            frequency_min=20,
            frequency_max=16_000,
            max_length_s=3,
            truncation="rand_trunc",
            padding="repeat",
        ),
        dict(feature_size=32, max_length_s=5, truncation="rand_trunc", padding="pad"),
    ],
)
def test_features_match_extractor(settings):
    extractor = ClapFeatureExtractor(**settings)
    ours = preprocess_from_hf(extractor.to_dict(), fusion=settings["truncation"] == "fusion")
    for name, raw in CLIPS.items():
        samples = decoded(raw)
        if len(samples) > ours["max_samples"]:
            continue
        expected = extractor(samples, sampling_rate=RATE, return_tensors="np")["input_features"][0]
        got = clap_audio.features(samples, ours)
        assert got.shape == (1, *expected.shape[1:]), name
        np.testing.assert_allclose(got[0], expected[0], atol=1e-4, err_msg=name)


def test_long_clip_windows_are_extractor_crops(encoders, checkpoints, monkeypatch):
    samples = decoded(LONG)
    settings = encoders["unfused"].stored.preprocess
    starts = clap_audio.window_starts(len(samples), settings["max_samples"])
    assert len(starts) == 4 and starts[0] == 0 and starts[-1] == len(samples) - settings["max_samples"]
    ours = encoders["unfused"].preprocess("audio", LONG)
    _, extractor = reference(checkpoints["unfused"])
    for start, window in zip(starts, ours):
        monkeypatch.setattr(np.random, "randint", lambda low, high, start=start: start)
        expected = extractor(samples, sampling_rate=RATE, return_tensors="np")["input_features"][0, 0]
        np.testing.assert_allclose(window, expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["unfused", "laion_like"])
def test_audio_matches_transformers(kind, encoders, checkpoints):
    model, extractor = reference(checkpoints[kind])
    samples = [decoded(raw) for raw in CLIPS.values()]
    features = extractor(samples, sampling_rate=RATE, return_tensors="np")["input_features"]
    items = [encoders[kind].preprocess("audio", raw) for raw in CLIPS.values()]
    np.testing.assert_allclose(np.concatenate(items), features[:, 0], atol=1e-4)
    ours = encoders[kind].embed("audio", items)
    assert ours.shape == (len(CLIPS), 24) and ours.dtype == np.float32
    assert cosine(ours, hf_audio(model, features)).min() >= 0.9999


def test_long_clip_is_mean_of_window_embeddings(encoders, checkpoints):
    model, _ = reference(checkpoints["unfused"])
    items = [encoders["unfused"].preprocess("audio", raw) for raw in (CLIPS["tone"], LONG, CLIPS["fox_8k"])]
    windows = hf_audio(model, items[1][:, None])  # each window as the extractor's crop at its start (test above)
    expected = (windows / np.linalg.norm(windows, axis=1, keepdims=True)).mean(0)
    tone, long, fox = encoders["unfused"].embed("audio", items)
    assert cosine(long, expected) >= 0.9999
    assert cosine(tone, hf_audio(model, items[0][:, None])[0]) >= 0.9999  # neighbours in the batch unaffected
    assert cosine(fox, hf_audio(model, items[2][:, None])[0]) >= 0.9999


def test_fused_matches_transformers(encoders, checkpoints, monkeypatch):
    """Short clips unfused into 4 channels, a long one fused from the middle chunk of each third, in one batch."""
    model, extractor = reference(checkpoints["fused"])
    raws = [CLIPS["speech_us"], LONG, CLIPS["noise_10s"], CLIPS["click"]]
    samples = [decoded(raw) for raw in raws]
    settings = encoders["fused"].stored.preprocess
    chunk = settings["max_samples"] // settings["hop_length"] + 1
    picks = iter(clap_audio.fusion_starts(len(samples[1]) // settings["hop_length"] + 1, chunk))
    monkeypatch.setattr(np.random, "choice", lambda choices: next(picks))
    features = np.concatenate(
        [extractor(s, sampling_rate=RATE, return_tensors="np")["input_features"] for s in samples]
    )
    items = [encoders["fused"].preprocess("audio", raw) for raw in raws]
    assert [len(item) for item in items] == [1, 4, 1, 1]
    for item, expected in zip(items, features):
        np.testing.assert_allclose(item, expected[: len(item)], atol=1e-4)
    # the extractor marks a random clip of a batch holding no long one as long; here a clip is long exactly when it is
    expected = hf_audio(model, features, longer=[False, True, False, False])
    assert cosine(encoders["fused"].embed("audio", items), expected).min() >= 0.9999


def test_text_matches_transformers(encoders, checkpoints, tmp_path):
    src = checkpoints["unfused"]
    model, _ = reference(src)
    tokenizer = ClapProcessor.from_pretrained(src).tokenizer
    assert isinstance(tokenizer, RobertaTokenizer)
    expected = tokenizer(TEXTS, padding=True, truncation=True, max_length=38, return_tensors="pt")
    ids, mask = encoders["unfused"].tokenizer(TEXTS)
    np.testing.assert_array_equal(ids, expected["input_ids"].numpy())
    np.testing.assert_array_equal(mask, expected["attention_mask"].numpy())
    with torch.no_grad():
        reference_texts = model.get_text_features(**expected).pooler_output.numpy()
    ours = encoders["unfused"].embed("text", TEXTS)
    assert ours.shape == (len(TEXTS), 24) and cosine(ours, reference_texts).min() >= 0.9999
    # a release shipping tokenizer.json (as RobertaTokenizer saves it) tokenises the same
    shipped = tmp_path / "shipped"
    shutil.copytree(src, shipped)
    for name in ("vocab.json", "merges.txt"):
        (shipped / name).unlink()
    tokenizer.save_pretrained(shipped)
    assert convert_hf(shipped).tokenizer is not None
    np.testing.assert_array_equal(ClapEncoder("x", convert_hf(shipped)).tokenizer(TEXTS)[0], ids)


def test_tokenizer_config_settings_are_followed(tmp_path):
    """A mask token that strips the space before it, and a prefix space, as RobertaTokenizer reads them."""
    mask = {
        "__type": "AddedToken",
        "content": "<mask>",
        "lstrip": True,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
    }
    src = write_reference(
        tmp_path / "c", UNFUSED, TEXT, FEATURES | dict(feature_size=32, truncation="rand_trunc"),
        tokenizer_config={"mask_token": mask, "add_prefix_space": True},
    )  # fmt: skip
    expected = RobertaTokenizer.from_pretrained(src)(TEXTS, padding=True, truncation=True, max_length=38)["input_ids"]
    np.testing.assert_array_equal(ClapEncoder("x", convert_hf(src)).tokenizer(TEXTS)[0], expected)


def test_zero_shot_is_logits_per_audio_softmax(encoders, checkpoints):
    src = checkpoints["laion_like"]
    model, extractor = reference(src)
    labels = ["a dog barking", "rain", "speech"]
    raws = [CLIPS["speech_us"], CLIPS["tone"]]
    inputs = extractor([decoded(r) for r in raws], sampling_rate=RATE, return_tensors="pt")
    inputs |= RobertaTokenizer.from_pretrained(src)(labels, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_audio.softmax(-1).numpy()
    encoder = encoders["laion_like"]
    assert encoder.logit_scale == pytest.approx(12.0)  # logit_scale_a (12), not logit_scale_t (40)
    probabilities = encoder.zero_shot(encoder.encode("audio", raws), encoder.encode("text", labels))
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


def test_config_defaults_are_transformers():
    """The defaults the converter fills in for keys a config.json leaves out are transformers' own."""
    from transformers import ClapAudioConfig, ClapConfig, ClapTextConfig

    from encoders import clap

    for ours, theirs in (
        (clap.HF_DEFAULTS, ClapConfig().to_dict()),
        (clap.HF_AUDIO_DEFAULTS, ClapAudioConfig().to_dict()),
        (clap.HF_TEXT_DEFAULTS, ClapTextConfig().to_dict()),
        (clap.HF_FEATURE_DEFAULTS, ClapFeatureExtractor().to_dict()),
    ):
        assert {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.items() if k in ours} == ours


def test_convert_detect_and_load_by_path(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("MMEMBED_HOME", str(tmp_path / "home"))
    src = checkpoints["unfused"]
    assert detect(src) == "hf-clap"
    path = convert(src, tmp_path / "clap.parquet")
    encoder = registry.load_encoder(str(path), Options(device="cpu"))
    assert encoder.kind == "clap" and encoder.modalities == ("audio", "text")
    inputs = registry.load_inputs(str(path))
    np.testing.assert_array_equal(inputs("audio", CLIPS["tone"]), encoder.preprocess("audio", CLIPS["tone"]))
    embeddings = encoder.encode("audio", [CLIPS["tone"], LONG])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert weights.load(path).preprocess["mel_scale"] == "slaney"
    # preprocessing alone, as its workers run it, never imports torch
    (tmp_path / "tone.wav").write_bytes(CLIPS["tone"])
    code = f"""
import sys
from pathlib import Path
from encoders.registry import load_inputs
assert load_inputs({str(path)!r})("audio", Path({str(tmp_path / "tone.wav")!r}).read_bytes()).shape == (1, 1001, 32)
print("torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def _rewrite(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_converter_names_missing_and_misshaped_tensors(checkpoints, tmp_path):
    src = checkpoints["unfused"]
    qkv = "audio_model.audio_encoder.layers.1.blocks.2.attention.self.key.weight"
    missing = _rewrite(src, tmp_path / "missing", lambda t: t.pop(qkv))
    with pytest.raises(ConversionError, match="no tensor 'audio_model.audio_encoder.layers.1.blocks.2.attention"):
        convert_hf(missing)
    table = "audio_model.audio_encoder.layers.0.blocks.1.attention.self.relative_position_bias_table"
    misshaped = _rewrite(src, tmp_path / "misshaped", lambda t: t.update({table: t[table][:-1]}))
    with pytest.raises(ConversionError, match="relative_position_bias_table has shape"):
        convert_hf(misshaped)
    extra = _rewrite(src, tmp_path / "extra", lambda t: t.update({"audio_model.head.weight": torch.zeros(2)}))
    with pytest.raises(ConversionError, match="unexpected tensor 'audio_model.head.weight'"):
        convert_hf(extra)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c, p: c["audio_config"].update(enable_fusion=True, fusion_type="channel_map"),
            "fusion_type 'channel_map'",
        ),
        (lambda c, p: c["audio_config"].update(qkv_bias=False), "qkv_bias=False"),
        (lambda c, p: p.update(truncation="fusion"), "truncation 'fusion' does not fit a unfused model"),
        (lambda c, p: c["audio_config"].update(window_size=16), "smaller than the window 16"),
        (lambda c, p: p.update(max_length_s=30), "do not fit the audio tower"),
    ],
)
def test_converter_refuses_what_transformers_cannot_run(checkpoints, tmp_path, edit, message):
    dest = shutil.copytree(checkpoints["unfused"], tmp_path / "c")
    config = json.loads((dest / "config.json").read_text())
    preprocessor = json.loads((dest / "preprocessor_config.json").read_text())
    config.setdefault("audio_config", {})
    edit(config, preprocessor)
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    with pytest.raises(ConversionError, match=message):
        convert_hf(dest)


def test_bf16_close_to_fp32(encoders):
    stored = encoders["unfused"].stored
    bf16 = ClapEncoder("bf16", stored, Options(device="cpu", dtype="bfloat16"))
    items = [bf16.preprocess("audio", CLIPS[name]) for name in ("speech_us", "tone")]
    assert cosine(bf16.embed("audio", items), encoders["unfused"].embed("audio", items)).min() >= 0.99
    assert cosine(bf16.embed("text", TEXTS[:2]), encoders["unfused"].embed("text", TEXTS[:2])).min() >= 0.99


def test_bench_audio_reports_both_loops(checkpoints):
    result = bench_audio([CLIPS["tone"], LONG], checkpoints["unfused"], batch_size=2)
    assert result["clips"] == 2 and result["clips_per_s_ours"] > 0 and result["clips_per_s_reference"] > 0
    assert result["min_cosine"] >= 0.9999  # over the clip of at most 10 s (the reference crops longer ones at random)
