"""Audio bytes -> CLAP log-mel inputs, as Hugging Face's `ClapFeatureExtractor` makes them, but deterministic.

48 kHz mono (decoded by `audio.decode`), a centred STFT (periodic Hann, reflect padding), power
spectrum through a mel filterbank, then dB (`10 log10`, floored at 1e-10, no top-dB clip: the
extractor never passes its `top_db` on). A clip of at most `max_samples` (10 s) is padded by the
extractor's `padding` rule (`repeatpad`: tiled whole, then zeros). The filterbank follows the
extractor's truncation mode: Slaney scale and norm for `rand_trunc` (the unfused models), HTK with
no norm for `fusion`.

The extractor picks at random where a longer clip is read; here the choice is fixed:

- unfused (`rand_trunc`, one random 10 s crop): the clip is read as `ceil(n / max_samples)` 10 s
  windows with evenly spaced starts from 0 to `n - max_samples` (rounded), each one of the crops
  `rand_trunc` could pick; the encoder averages their L2-normalised embeddings.
- fused (`fusion`: a downsampled whole-clip mel plus one random chunk from each third of the
  possible starts): the chunk at the middle of each third's range of starts. A clip is fused exactly
  when it is longer than 10 s (the extractor also marks one random clip of a batch that holds no long
  one, a training device the encoder leaves out).

An item is one float32 array (n, frames, n_mels): unfused, its n windows; fused, 1 mel (a clip
of at most 10 s, which the model repeats into its 4 channels) or the 4 fusion channels.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import scipy.fft

from . import audio
from .errors import AudioValidationError

MEL_FLOOR = 1e-10  # the extractor's floor on mel power before dB (-100 dB)
PADDINGS = ("repeatpad", "repeat", "pad")
MEL_SCALES = ("slaney", "htk")  # slaney: librosa's scale and area norm (rand_trunc); htk: torchaudio's (fusion)
FUSION_CHANNELS = 4  # the whole clip shrunk, then a front, middle and back chunk


def decode(data: bytes, settings: dict, max_seconds: float = audio.MAX_AUDIO_SECONDS) -> np.ndarray:
    """WAV/FLAC/OGG/MP3 bytes -> mono float32 samples at the model's sampling rate (at most `max_seconds` of them)."""
    return audio.decode(data, settings["sampling_rate"], max_seconds)


def _hz_to_mel(hz: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    # Slaney: linear below 1 kHz, logarithmic above
    return np.where(
        hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) * 27.0 / math.log(6.4), 3.0 * hz / 200.0
    )


def _mel_to_hz(mel: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    return np.where(mel >= 15.0, 1000.0 * np.exp(math.log(6.4) / 27.0 * (mel - 15.0)), 200.0 * mel / 3.0)


@lru_cache(maxsize=4)
def mel_filters(n_fft: int, n_mels: int, f_min: float, f_max: float, rate: int, scale: str) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) float64 triangular filterbank, as transformers' `mel_filter_bank`."""
    edges = _mel_to_hz(
        np.linspace(_hz_to_mel(np.array(f_min), scale), _hz_to_mel(np.array(f_max), scale), n_mels + 2), scale
    )
    fft_freqs = np.linspace(0, rate // 2, n_fft // 2 + 1)
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    weights = np.maximum(0.0, np.minimum(down, up))
    if scale == "slaney":  # area normalisation: about constant energy per filter
        weights *= 2.0 / (edges[2:] - edges[:-2])
    return weights


@lru_cache(maxsize=4)
def hann_window(n: int) -> np.ndarray:
    """(n,) periodic Hann window in float64, as the extractor's `window_function(n, "hann")`."""
    return np.hanning(n + 1)[:-1]


def log_mel(samples: np.ndarray, settings: dict) -> np.ndarray:
    """Mono samples -> (1 + len // hop_length, n_mels) float32 dB mel spectrogram."""
    n_fft, hop = settings["n_fft"], settings["hop_length"]
    padded = np.pad(samples.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    # float64 like the extractor, whose STFT is then kept in complex64: rounded the same way here
    spectrum = scipy.fft.rfft(frames * hann_window(n_fft), axis=1).astype(np.complex64)
    power = np.abs(spectrum, dtype=np.float64) ** 2
    filters = mel_filters(
        n_fft,
        settings["n_mels"],
        settings["f_min"],
        settings["f_max"],
        settings["sampling_rate"],
        settings["mel_scale"],
    )
    mel = np.maximum(MEL_FLOOR, power @ filters)
    return (10.0 * np.log10(mel)).astype(np.float32)


def pad(samples: np.ndarray, max_samples: int, padding: str) -> np.ndarray:
    """A clip of at most max_samples -> exactly max_samples, by the extractor's padding rule."""
    n = len(samples)
    if padding == "repeat":
        samples = np.tile(samples, max_samples // n + 1)[:max_samples]
    elif padding == "repeatpad":
        samples = np.tile(samples, max_samples // n)
    return np.pad(samples, (0, max_samples - len(samples)))


def window_starts(n: int, max_samples: int) -> list[int]:
    """Starts of the 10 s windows a clip of n > max_samples samples is read in: ceil(n / max_samples) of them,
    evenly spaced from 0 to n - max_samples, so they cover the clip and each lies wholly inside it."""
    k = math.ceil(n / max_samples)
    return [round(i * (n - max_samples) / (k - 1)) for i in range(k)]


def fusion_starts(total_frames: int, chunk_frames: int) -> list[int]:
    """The frames where the fusion's front, middle and back chunks start: the middle of each third of the
    possible starts (the extractor draws one at random from each; a third too short to hold one starts at 0)."""
    thirds = np.array_split(np.arange(total_frames - chunk_frames + 1), 3)
    return [int(third[len(third) // 2]) if len(third) else 0 for third in thirds]


def shrink(mel: np.ndarray, frames: int) -> np.ndarray:
    """(n, n_mels) -> (frames, n_mels): linear interpolation along time, as torch's bilinear
    `interpolate(..., align_corners=False)` makes it (the mel axis keeps its size, so it is untouched)."""
    n = mel.shape[0]
    # torch's positions: a float32 ratio, then one fused multiply-add rounded to float32 (in float64 throughout,
    # values moved by up to 0.01 dB)
    ratio = np.float64(np.float32(n / frames))
    source = np.maximum((ratio * (np.arange(frames) + 0.5) - 0.5).astype(np.float32), 0)
    low = np.minimum(source.astype(np.int64), n - 1)
    high = np.minimum(low + 1, n - 1)
    weight = (source - low.astype(np.float32))[:, None]
    return (np.float32(1) - weight) * mel[low] + weight * mel[high]


def features(samples: np.ndarray, settings: dict) -> np.ndarray:
    """Mono samples at the model's rate -> (n, frames, n_mels) float32 (see the module docstring)."""
    n, max_samples = len(samples), settings["max_samples"]
    if n == 0:
        raise AudioValidationError("audio holds no samples")
    if n <= max_samples:
        return log_mel(pad(samples, max_samples, settings["padding"]), settings)[None]
    if not settings["fusion"]:
        return np.stack([log_mel(samples[s : s + max_samples], settings) for s in window_starts(n, max_samples)])
    mel = log_mel(samples, settings)
    chunk = max_samples // settings["hop_length"] + 1
    if mel.shape[0] == chunk:  # under one hop longer than max_samples: the whole mel, as a short clip's
        return mel[None]
    chunks = [mel[s : s + chunk] for s in fusion_starts(mel.shape[0], chunk)]
    return np.stack([shrink(mel, chunk), *chunks])


def preprocess(data: bytes, settings: dict, max_seconds: float = audio.MAX_AUDIO_SECONDS) -> np.ndarray:
    """Audio file bytes -> the model input of one clip."""
    return features(decode(data, settings, max_seconds), settings)
