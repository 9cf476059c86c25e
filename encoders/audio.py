"""Audio bytes -> Whisper log-mel features, as Hugging Face's `WhisperFeatureExtractor` makes them.

Decoding follows `transformers.audio_utils.load_audio` (soundfile, channel mean, soxr "HQ"
resampling, the same output length as `librosa.load`). The features are the extractor's,
one 30 s window at a time, so a clip longer than 30 s is split, never cut.

A clip's features are one float32 array (n_mels, n_frames): its windows' frames side by
side. Every window but the last has `N_FRAMES` frames; the last has

- `padded`: `N_FRAMES`, the reference behaviour (the window's audio zero-padded to 30 s);
- `trimmed`: the frames whose centre lies inside the audio, `ceil(samples / HOP_LENGTH)`,
  rounded up to an even count so the encoder's stride-2 convolution sees only real frames.
  They are exactly the first frames of the `padded` window (same values, same max-8 floor),
  so `trimmed` only drops the frames of zero padding after the clip.
"""

from __future__ import annotations

import io
import math
from functools import cache, lru_cache

import numpy as np
import scipy.fft

from .errors import AudioValidationError
from .options import MAX_AUDIO_SECONDS

SAMPLE_RATE = 16000  # Hz, what every Whisper model was trained on
N_FFT = 400  # 25 ms STFT window
HOP_LENGTH = 160  # 10 ms between frames
CHUNK_LENGTH = 30  # seconds in one encoder window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a 30 s mel input
MODES = ("trimmed", "padded")
BLOCK_SECONDS = 10  # decoded (and resampled) at a time: bounds what a long file costs beyond its 16 kHz samples


def settings(n_mels: int) -> dict:
    """The feature settings a Whisper store records."""
    return {
        "n_mels": n_mels,
        "sampling_rate": SAMPLE_RATE,
        "n_fft": N_FFT,
        "hop_length": HOP_LENGTH,
        "chunk_length": CHUNK_LENGTH,
    }


def decode(data: bytes, rate: int = SAMPLE_RATE, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """WAV/FLAC/OGG/MP3 bytes -> mono float32 samples at `rate` Hz (Whisper's SAMPLE_RATE unless given).

    Decoded and resampled in pieces of BLOCK_SECONDS, so that what a long clip costs is its mono output at `rate`,
    never the whole file at its own rate and channel count; a clip longer than `max_seconds` (by its header, or
    once its samples say so) is refused, naming its length, before more of it is decoded."""
    import soundfile as sf  # imported where decoding happens: a process that only runs networks (the GPU check) has none
    import soxr

    if not data:
        raise AudioValidationError("empty audio (0 bytes)")
    pieces, frames = [], 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            source_rate = f.samplerate
            if 0 < f.frames < 1 << 62:  # libsndfile's count (an estimate for MP3); unknown is 0 or a huge sentinel
                _check_length(f.frames / source_rate, max_seconds)
            stream = None if source_rate == rate else soxr.ResampleStream(source_rate, rate, 1, "float32", "soxr_hq")
            block = max(1, int(BLOCK_SECONDS * source_rate))
            # read() until it runs dry, not blocks(): that one trusts the header's count, which MP3 only estimates
            while len(piece := f.read(block, dtype="float32", always_2d=True)):
                frames += len(piece)
                _check_length(frames / source_rate, max_seconds)
                if not np.isfinite(piece).all():
                    raise AudioValidationError("audio holds NaN or infinite samples")
                mono = piece.mean(axis=1)
                pieces.append(mono if stream is None else stream.resample_chunk(mono))
            if stream is not None:
                pieces.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioValidationError(f"cannot decode audio ({len(data)} bytes): {e}") from None
    if frames == 0:
        raise AudioValidationError("audio holds no samples")
    mono = np.concatenate(pieces)
    del pieces
    n = math.ceil(frames * rate / source_rate)  # librosa's length
    if len(mono) != n:
        mono = np.pad(mono, (0, max(0, n - len(mono))))[:n]
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_length(seconds: float, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise AudioValidationError(
            f"audio is {seconds:.1f} s long, over the {max_seconds:g} s limit (a job's limits.audio_seconds)"
        )


@cache
def mel_filters(n_mels: int) -> np.ndarray:
    """(n_mels, N_FFT // 2 + 1) Slaney-style mel filterbank over 0-8 kHz, as transformers' `mel_filter_bank`."""
    f_sp = 200.0 / 3  # Slaney's mel scale: linear below 1 kHz, logarithmic above
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, math.log(6.4) / 27.0

    def hz_to_mel(hz: np.ndarray) -> np.ndarray:
        return np.where(
            hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep, hz / f_sp
        )

    def mel_to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)

    edges = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(SAMPLE_RATE / 2)), n_mels + 2))
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    slopes = edges[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    weights = np.maximum(0.0, np.minimum(down, up)) * (2.0 / (edges[2:] - edges[:-2]))
    return weights.T.astype(np.float32)


def n_frames(n_samples: int, mode: str) -> int:
    """Frames of the features of a clip of `n_samples` samples (at SAMPLE_RATE)."""
    full, rest = divmod(n_samples, N_SAMPLES)
    if rest == 0:
        return full * N_FRAMES
    last = N_FRAMES if mode == "padded" else 2 * math.ceil(math.ceil(rest / HOP_LENGTH) / 2)
    return full * N_FRAMES + last


def log_mel(window: np.ndarray, n_mels: int, frames: int) -> np.ndarray:
    """Up to N_SAMPLES samples -> (n_mels, frames) float32: the first frames of the extractor's 30 s features.

    Only enough zero padding for those frames (and for every frame that touches the audio,
    which the max-8 floor looks at) is transformed; the 30 s frames past it are silence.
    """
    n = len(window)
    size = min(N_SAMPLES, max(n + N_FFT, frames * HOP_LENGTH))
    x = np.zeros(size, dtype=np.float32)
    x[:n] = window
    # the STFT of torch.stft / the extractor: centred frames (reflect padding), periodic Hann window, last frame dropped
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:-1]
    spectrum = scipy.fft.rfft(windows * hann_window(), axis=1)  # single precision: numpy's is 8x slower here
    power = spectrum.real**2 + spectrum.imag**2
    log_spec = np.log10(np.maximum(mel_filters(n_mels) @ power.T, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec[:, :frames] + 4.0) / 4.0).astype(np.float32)


@lru_cache(maxsize=1)
def hann_window() -> np.ndarray:
    """(N_FFT,) float32 periodic Hann window, as torch.hann_window and the extractor's window_function."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def features(samples: np.ndarray, n_mels: int, mode: str) -> np.ndarray:
    """Mono SAMPLE_RATE samples -> (n_mels, n_frames(len(samples), mode)) float32, windows side by side."""
    if mode not in MODES:
        raise ValueError(f"audio mode must be one of {', '.join(MODES)}, not {mode!r}")
    if len(samples) == 0:
        raise AudioValidationError("audio holds no samples")
    windows = [samples[i : i + N_SAMPLES] for i in range(0, len(samples), N_SAMPLES)]
    return np.concatenate([log_mel(w, n_mels, n_frames(len(w), mode)) for w in windows], axis=1)


def split_windows(mel: np.ndarray) -> list[np.ndarray]:
    """(n_mels, n_frames) features -> one (n_mels, <= N_FRAMES) array per 30 s window."""
    return [mel[:, i : i + N_FRAMES] for i in range(0, mel.shape[1], N_FRAMES)]
