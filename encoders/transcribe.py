"""Speech -> text with a Whisper store that holds the decoder: windows, seeking, segments, text.

Each clip is decoded on 30 s windows of its own features, whatever audio mode its embeddings use (Whisper's
decoder was trained on 30 s windows):

- features as faster-whisper's `transcribe` makes them: the log-mel of the whole clip (160 samples of zeros
  appended), floored at its overall maximum - 8 (so a window of a long clip sees the clip's floor, not its own);
  a window is the 3000 frames from `seek`, its part past the clip's end zeros in the mel (`pad_or_trim`);
- a clip of at most 30 s without `timestamps` is one window decoded with `<|notimestamps|>` (the tokens of
  CTranslate2's `generate`); with `timestamps`, or when it is longer, windows are decoded with timestamp tokens and
  split into segments, and the next window starts at the last complete segment's end (whisper.transcribe's
  seeking), so a word cut by a window's edge is decoded whole in the next one;
- a window is skipped as silence when P(<|nospeech|>) > `NO_SPEECH_THRESHOLD` (0.6) and the decoder is unsure
  too: its average log-probability is at most `LOGPROB_THRESHOLD` (-1), whisper.transcribe's rule; and (ours)
  whatever the log-probability above `NO_SPEECH_CERTAIN` (0.9), as tiny.en writes a confident " you" on digital
  silence and faint noise (P(<|nospeech|>) 0.95, log-probability -0.4 to -0.9). espeak-ng speech windows stayed
  below 0.77, noise and silence above 0.86. A window that looped (the repetition guard of `encoders.decoding`)
  keeps its loop's first copy;
- segments of zero length or blank text are dropped (openai's and faster-whisper's rule); the transcript's text
  is its segments' texts joined, stripped.

There is no temperature fallback and no conditioning on the previous window's text: decoding is greedy, as
faster-whisper's with beam_size=1, temperature=0, condition_on_previous_text=False, vad_filter=False.
Windows of all the clips of a call are encoded and decoded together, `WINDOWS_PER_PASS` at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import scipy.fft
import torch
from tokenizers import Tokenizer

from . import audio
from .decoding import TIME_PRECISION, Decoded, detect_language, greedy
from .errors import ModelLoadError
from .whisper_decoder import SpecialTokens

if TYPE_CHECKING:
    from .whisper import WhisperEncoder

NO_SPEECH_THRESHOLD = 0.6  # whisper.transcribe's no_speech_threshold
LOGPROB_THRESHOLD = -1.0  # whisper.transcribe's logprob_threshold
NO_SPEECH_CERTAIN = 0.9  # silence whatever the log-probability (ours)
WINDOWS_PER_PASS = 16  # windows encoded and decoded together (a tiny.en window's cross-attention cache: 18 MB)
FRAME = audio.HOP_LENGTH / audio.SAMPLE_RATE  # s per mel frame
STRIDE = 2  # mel frames per encoder position, and per timestamp step of TIME_PRECISION


class Segment(NamedTuple):
    start: float  # s from the clip's start
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    segments: list[Segment]  # with `timestamps`; empty without


def features(samples: np.ndarray, n_mels: int) -> np.ndarray:
    """Mono SAMPLE_RATE samples -> (n_mels, len(samples) // HOP_LENGTH + 1) float32: faster-whisper's features
    (its FeatureExtractor, padding=160), computed a window of frames at a time. The last frame is past the clip."""
    x = np.concatenate([samples.astype(np.float32), np.zeros(audio.HOP_LENGTH, np.float32)])
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(x, audio.N_FFT // 2, mode="reflect"), audio.N_FFT)
    frames = frames[:: audio.HOP_LENGTH][:-1]
    parts = []
    for start in range(0, len(frames), audio.N_FRAMES):
        spectrum = scipy.fft.rfft(frames[start : start + audio.N_FRAMES] * audio.hann_window(), axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        parts.append(np.log10(np.maximum(audio.mel_filters(n_mels) @ power.T, 1e-10)))
    log_spec = np.concatenate(parts, axis=1)
    return ((np.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0).astype(np.float32)


@dataclass
class _Clip:
    mel: np.ndarray
    timestamps: bool  # decode with timestamp tokens
    language: str | None
    seek: int = 0  # the next window's first frame
    segments: list[Segment] = field(default_factory=list)

    @property
    def frames(self) -> int:
        return self.mel.shape[1] - 1  # the last frame lies past the clip (faster-whisper's content_frames)

    def window(self) -> tuple[np.ndarray, int]:
        """The next window's features (n_mels, N_FRAMES) and its count of real frames."""
        size = min(audio.N_FRAMES, self.frames - self.seek)
        window = np.zeros((self.mel.shape[0], audio.N_FRAMES), np.float32)
        window[:, :size] = self.mel[:, self.seek : self.seek + size]
        return window, size


def preprocess(raw: bytes, n_mels: int) -> np.ndarray:
    """Audio file bytes -> the features `transcribe_features` takes (a CPU task's work; no torch)."""
    return features(audio.decode(bytes(raw)), n_mels)


def transcribe(
    encoder: WhisperEncoder, clips: Sequence[bytes], timestamps: bool = False, language: str | None = None
) -> list[Transcript]:
    """Audio files' bytes -> their transcripts, all clips decoded together (the module docstring gives the rules).

    language: a multilingual model's language code for every clip; None detects each clip's from its first
    window. An English-only model takes none.
    """
    return transcribe_features(encoder, [preprocess(c, encoder.dims.n_mels) for c in clips], timestamps, language)


def transcribe_features(
    encoder: WhisperEncoder, mels: Sequence[np.ndarray], timestamps: bool = False, language: str | None = None
) -> list[Transcript]:
    """`transcribe` on clips already through `preprocess`."""
    special, tokenizer = encoder.special_tokens, _tokenizer(encoder)
    if language is not None and not special.languages:
        raise ModelLoadError(f"model {encoder.name!r} is English-only: it takes no language")
    clips = [_Clip(mel, timestamps or mel.shape[1] - 1 > audio.N_FRAMES, language) for mel in mels]
    with torch.inference_mode():
        while pending := [c for c in clips if c.seek < c.frames]:
            for start in range(0, len(pending), WINDOWS_PER_PASS):
                _step(encoder, pending[start : start + WINDOWS_PER_PASS], tokenizer)
    return [Transcript("".join(s.text for s in c.segments).strip(), c.segments if timestamps else []) for c in clips]


def _step(encoder: WhisperEncoder, clips: list[_Clip], tokenizer: Tokenizer) -> None:
    """Decode the next window of each of `clips` and move each on."""
    special, options = encoder.special_tokens, encoder.options
    windows, sizes = zip(*(c.window() for c in clips))
    mel = torch.from_numpy(np.stack(windows)).to(options.torch_device, options.torch_dtype)
    states = encoder.model(mel)
    if special.languages and (unknown := [i for i, c in enumerate(clips) if c.language is None]):
        for i, code in zip(unknown, detect_language(encoder.decoder, states[unknown], special)):
            clips[i].language = code
    groups: dict[tuple[bool, str | None], list[int]] = {}
    for i, c in enumerate(clips):
        groups.setdefault((c.timestamps, c.language), []).append(i)
    for (timestamps, language), rows in groups.items():
        prompt = special.prompt(language, timestamps)
        for i, decoded in zip(rows, greedy(encoder.decoder, states[rows], prompt, special, timestamps)):
            _advance(clips[i], decoded, sizes[i], special, tokenizer)


def _advance(clip: _Clip, decoded: Decoded, size: int, special: SpecialTokens, tokenizer: Tokenizer) -> None:
    """Add a decoded window's segments to its clip and seek past what they cover (faster-whisper's
    `_split_segments_by_timestamps`)."""
    start, tokens, begin = clip.seek, decoded.tokens, special.timestamp_begin
    offset, clip.seek = start * FRAME, start + size
    unsure = decoded.avg_logprob <= LOGPROB_THRESHOLD or decoded.no_speech_prob > NO_SPEECH_CERTAIN
    if decoded.no_speech_prob > NO_SPEECH_THRESHOLD and unsure:
        return
    segments = []  # (start s, end s, tokens)
    pairs = [i for i in range(1, len(tokens)) if tokens[i] >= begin and tokens[i - 1] >= begin]
    if not clip.timestamps:
        segments = [(offset, offset + size * FRAME, tokens)]
    elif pairs:
        single_ending = len(tokens) >= 2 and tokens[-2] < begin <= tokens[-1]  # nothing said after it
        bounds = [0, *pairs] + ([len(tokens)] if single_ending else [])
        for a, b in pairwise(bounds):
            piece = tokens[a:b]
            segments.append(
                (offset + (piece[0] - begin) * TIME_PRECISION, offset + (piece[-1] - begin) * TIME_PRECISION, piece)
            )
        if not single_ending:  # the last segment is unfinished: the next window starts where it does
            clip.seek = start + (tokens[bounds[-1] - 1] - begin) * STRIDE
    else:
        stamps = [t for t in tokens if t >= begin]
        end = (stamps[-1] - begin) * TIME_PRECISION if stamps and stamps[-1] != begin else size * FRAME
        segments = [(offset, offset + end, tokens)]
    for a, b, piece in segments:
        text = tokenizer.decode([t for t in piece if t < special.eot])
        if a != b and text.strip():
            clip.segments.append(Segment(round(a, 3), round(b, 3), text))


def _tokenizer(encoder: WhisperEncoder) -> Tokenizer:
    if encoder.stored.tokenizer is None:
        raise ModelLoadError(f"model {encoder.name!r} has no tokenizer.json to turn tokens into text")
    return _parse(encoder.stored.tokenizer)


@lru_cache(maxsize=4)
def _parse(tokenizer_json: str) -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json)
