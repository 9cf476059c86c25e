"""Audio decoding and Whisper features, held to transformers' loader and WhisperFeatureExtractor."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import load_audio

from encoders import audio
from encoders.errors import AudioValidationError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "audio"
CLIPS = ["fox_8k.wav", "stella_44k_stereo.flac", "numbers_22k.ogg", "rain_44k_stereo.mp3", "long_8k.ogg"]


@pytest.fixture(scope="module")
def extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=80)


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def hf_windows(samples: np.ndarray) -> list[np.ndarray]:
    return [samples[i : i + audio.N_SAMPLES] for i in range(0, len(samples), audio.N_SAMPLES)]


@pytest.mark.parametrize("name", CLIPS)
def test_decode_matches_transformers_loader(name):
    path = FIXTURES / name
    samples = audio.decode(path.read_bytes())
    frames, rate = sf.read(path)  # not sf.info: its MP3 frame count is an estimate
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert len(samples) == math.ceil(len(frames) * audio.SAMPLE_RATE / rate)
    np.testing.assert_allclose(samples, load_audio(str(path), audio.SAMPLE_RATE, backend="soundfile"), atol=1e-6)


def test_decode_downmixes_channels_by_mean():
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, (1600, 2)).astype(np.float32)
    np.testing.assert_allclose(audio.decode(wav_bytes(stereo, audio.SAMPLE_RATE)), stereo.mean(axis=1), atol=1e-7)


def test_mel_filters_match_transformers(extractor):
    np.testing.assert_allclose(audio.mel_filters(80), extractor.mel_filters.T, atol=1e-7)
    assert audio.mel_filters(80) is audio.mel_filters(80)


@pytest.mark.parametrize("name", CLIPS)
def test_padded_features_match_feature_extractor(name, extractor):
    samples = audio.decode((FIXTURES / name).read_bytes())
    mel = audio.features(samples, 80, "padded")
    windows = hf_windows(samples)
    assert mel.dtype == np.float32 and mel.shape == (80, audio.N_FRAMES * len(windows))
    for got, window in zip(audio.split_windows(mel), windows):
        ref = extractor(window, sampling_rate=audio.SAMPLE_RATE, return_tensors="np").input_features[0]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
        padded = np.pad(window, (0, audio.N_SAMPLES - len(window)))[None]
        np.testing.assert_allclose(got, extractor._np_extract_fbank_features(padded, "cpu")[0], atol=1e-4, rtol=0)


def test_long_clip_is_split_not_cut():
    samples = audio.decode((FIXTURES / "long_8k.ogg").read_bytes())
    rest = len(samples) - audio.N_SAMPLES
    assert 0 < rest < audio.N_SAMPLES
    trimmed = audio.features(samples, 80, "trimmed")
    first, last = audio.split_windows(trimmed)
    assert first.shape == (80, audio.N_FRAMES)
    assert last.shape[1] == math.ceil(rest / audio.HOP_LENGTH) + math.ceil(rest / audio.HOP_LENGTH) % 2
    np.testing.assert_array_equal(first, audio.features(samples[: audio.N_SAMPLES], 80, "trimmed"))
    np.testing.assert_array_equal(last, audio.features(samples[audio.N_SAMPLES :], 80, "trimmed"))


def test_trimmed_keeps_the_max_floor_of_frames_past_the_clip():
    # Quiet noise (log-mel near -9.5), then a click whose loudest frame is centred after the last
    # sample: the trimmed frames must still be floored at that frame's max - 8, not their own.
    samples = (np.random.default_rng(0).standard_normal(16000) * 1e-5).astype(np.float32)
    samples[-5:] = 1.0
    trimmed = audio.features(samples, 80, "trimmed")
    padded = audio.features(samples, 80, "padded")
    assert trimmed.shape == (80, 100)
    np.testing.assert_allclose(trimmed, padded[:, :100], atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    n=st.one_of(
        st.integers(1, 4000),
        st.integers(4000, audio.N_SAMPLES + 2 * audio.HOP_LENGTH),
        st.just(audio.N_SAMPLES),
        st.just(2 * audio.N_SAMPLES + 1),
    ),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.0, 1e-6, 0.1, 1.0, 30.0]),
)
def test_feature_shapes_and_frames(n, seed, scale):
    samples = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    windows = math.ceil(n / audio.N_SAMPLES)
    rest = n - (windows - 1) * audio.N_SAMPLES
    real = math.ceil(rest / audio.HOP_LENGTH)
    padded = audio.features(samples, 80, "padded")
    trimmed = audio.features(samples, 80, "trimmed")
    assert padded.shape == (80, windows * audio.N_FRAMES) and padded.dtype == np.float32
    assert trimmed.shape == (80, (windows - 1) * audio.N_FRAMES + real + real % 2) and trimmed.dtype == np.float32
    assert audio.n_frames(n, "padded") == padded.shape[1] and audio.n_frames(n, "trimmed") == trimmed.shape[1]
    assert np.isfinite(padded).all() and np.isfinite(trimmed).all()
    # Whisper's floor: within 8 (2 after scaling) of each window's max, and log10(1e-10) at the lowest.
    for p, t in zip(audio.split_windows(padded), audio.split_windows(trimmed)):
        assert p.max() - p.min() <= 2.0 + 1e-5 and p.min() >= (-10 + 4) / 4 - 1e-6
        np.testing.assert_allclose(t, p[:, : t.shape[1]], atol=1e-5, rtol=0)


def test_bad_audio_is_rejected_with_a_reason():
    with pytest.raises(AudioValidationError, match="empty"):
        audio.decode(b"")
    with pytest.raises(AudioValidationError, match="cannot decode"):
        audio.decode(b"this is not audio at all" * 10)
    with pytest.raises(AudioValidationError, match="cannot decode"):
        audio.decode((FIXTURES / "fox_8k.wav").read_bytes()[:30])
    with pytest.raises(AudioValidationError, match="no samples"):
        audio.decode(wav_bytes(np.zeros(0, np.float32), 16000, "PCM_16"))
    for bad in (np.nan, np.inf, -np.inf):
        samples = np.zeros(800, np.float32)
        samples[100] = bad
        with pytest.raises(AudioValidationError, match="NaN or infinite"):
            audio.decode(wav_bytes(samples, 16000))
    with pytest.raises(AudioValidationError, match="no samples"):
        audio.features(np.zeros(0, np.float32), 80, "trimmed")
    with pytest.raises(ValueError, match="audio mode"):
        audio.features(np.zeros(10, np.float32), 80, "cropped")


def flac_of_silence(seconds: int, rate: int, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=rate, channels=channels, format="FLAC") as f:
        for start in range(0, seconds, 600):
            f.write(np.zeros((rate * min(600, seconds - start), channels), np.int16))
    return buf.getvalue()


def test_a_clip_over_the_length_limit_is_refused_before_it_is_decoded():
    """A 180 KB FLAC of two hours of silence once decoded whole (at its own rate) in the decoding task."""
    import time
    import tracemalloc

    meeting = flac_of_silence(2 * 3600, 8000)
    assert len(meeting) < 1 << 20
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(AudioValidationError, match=r"audio is 7200\.0 s long, over the 3600 s limit"):
        audio.decode(meeting)
    assert time.perf_counter() - start < 0.5 and tracemalloc.get_traced_memory()[1] < 8 << 20
    tracemalloc.stop()
    with pytest.raises(AudioValidationError, match=r"audio is 33\.8 s long, over the 30 s limit"):
        audio.decode((FIXTURES / "long_8k.ogg").read_bytes(), max_seconds=30)
    assert len(audio.decode((FIXTURES / "long_8k.ogg").read_bytes(), max_seconds=34)) == 541484


def test_a_long_clip_is_decoded_in_pieces():
    """Three minutes of 48 kHz stereo: decoded whole at its own rate, then resampled, the peak was 99 MiB; in pieces
    it is 24 MiB, about its 16 kHz mono output (11 MiB) twice."""
    import tracemalloc

    clip = flac_of_silence(180, 48000, channels=2)
    tracemalloc.start()
    samples = audio.decode(clip)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert samples.shape == (180 * 16000,) and not samples.any()
    assert peak < 30 << 20, f"{peak / 2**20:.0f} MiB"


def test_texts_over_the_size_limit_are_refused():
    from encoders.errors import TextValidationError
    from encoders.text import check_text

    assert check_text("é" * 10, max_bytes=20) == "é" * 10
    with pytest.raises(TextValidationError, match="text is 22 bytes, over the 20 byte limit"):
        check_text("é" * 11, max_bytes=20)
    with pytest.raises(TextValidationError, match="text is 21 bytes"):
        check_text(b"x" * 21, max_bytes=20)
