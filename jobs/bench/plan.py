"""What a bench run measures and how much of it (`Plan`), and the helpers every section shares."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from encoders.errors import MmembedError

MODALITIES = ("image", "audio", "text")
DTYPES = ("float32", "bfloat16")  # the pipelines' dtypes
BARE_DTYPES = (*DTYPES, "int8")  # the bare forward's: int8 against the peak and float32 too
# (tokens in one encoder call, width) of the measured encoders, for the peak's GEMM shapes: ViT-B/32 at batch 16 (50
# tokens an image), Whisper tiny at batch 16 (250 positions for 5 s, trimmed), MiniLM at chunks of 64 texts (~20 tokens)
PEAK_WIDTHS = ((16 * 50, 768), (16 * 250, 384), (64 * 20, 384))
PEAK_SQUARE = 2048  # and one square GEMM, the shape GEMM libraries are tuned on
IMAGE_SIZES = ((640, 480), (640, 480), (480, 640), (800, 600))  # mostly VGA landscape, some portrait and larger
CLIP_SECONDS = 5.0
FILE_ROWS, ROW_GROUP = 1000, 100  # dataset layout: files of 1000 rows, row groups of 100 (~6 MB of JPEGs)
WARMUP_ITEMS = 8  # a job this small before the timed ones, so they measure a warm Ray, as a user's second job does
TEXT_FACTOR = 10  # texts are ~100x cheaper than images: 10x as many keep the fixed costs from dominating
RETRIEVAL_DIM, TOP_K = 512, 10
# the memory jobs' model: streaming does not depend on it, and a small one keeps the 20k job short
RSS_MODEL = "shapes-clip"
WORKER_NICENESS = "RAY_worker_niceness"  # Ray's setting (default 15), read when Ray starts
CHECK_BATCH = 20_000  # input hashes in one incremental check, half of them already embedded
# the HNSW store: points around centres (cosine ~0.8 to theirs), like real embeddings
INDEX_CLUSTERS, INDEX_NOISE = 200, 0.7
TOP_PROCESSES = 5  # the largest processes named at a memory peak
# seconds between memory samples: a sample reads every process's smaps_rollup, ~3 ms each for Ray's workers (they
# map the whole object store), so sampling every 0.2 s took a third of a core from the jobs it measured
MEMORY_SAMPLING = 1.0
WORDS = (
    "the a small large red blue green old new quiet bright dark cold warm river city train station morning "
    "evening night dog cat bird child woman man house garden road bridge market window door table coffee tea "
    "bread apple music song voice picture camera photo mountain forest lake sea beach boat ship plane car bus "
    "street light rain snow wind sun moon star cloud sky field flower tree leaf stone wall tower church school "
    "office book letter paper pen phone computer screen game ball team player crowd festival dinner kitchen chair "
    "bed room floor walks runs sits stands looks waits opens closes carries holds reads writes sings plays builds "
    "paints finds near under over behind beside across through after before during with without and while because "
    "slowly quickly together alone again today yesterday tomorrow always never often"
).split()  # the vocabulary of the synthetic texts

# transformers CLIPConfig keyword arguments: the ViT-B/32 vision tower (and text tower widths).
CLIP_B32 = {
    "projection_dim": 512,
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
    },
    "text_config": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
    },
}


class BenchError(MmembedError):
    """A benchmark run could not be completed or produced an invalid measurement."""


def _counts(n: int) -> dict[str, int]:
    return {"image": n, "audio": n, "text": TEXT_FACTOR * n}


def gemm_shapes(widths: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(tokens, width) pairs of the encoders -> GEMM shapes (M, K, N): their two linear shapes, and a square one."""
    shapes = {(PEAK_SQUARE, PEAK_SQUARE, PEAK_SQUARE)}
    for tokens, width in widths:
        shapes |= {(tokens, width, width), (tokens, width, 4 * width)}
    return sorted(shapes)


@dataclass(frozen=True)
class Plan:
    """What one bench run measures, and how much of it."""

    n: dict[str, int]  # items per modality
    modalities: tuple[str, ...] = MODALITIES
    clip: dict = field(default_factory=lambda: CLIP_B32)  # CLIPConfig kwargs of the image model
    clip_name: str = "bench-clip-b32"
    image_model: str | None = (
        None  # a converted model to measure instead (CLIP, SigLIP, OpenCLIP), against its reference
    )
    # items the baselines run: their speed is steady, a sample will do
    baseline_items: dict[str, int] = field(default_factory=lambda: {"image": 256, "audio": 128, "text": 2560})
    # the image pipeline's sweep: actors, batch, threads (0: auto)
    sweep: tuple[tuple[int, int, int], ...] = ((1, 64, 0), (1, 64, 1), (1, 16, 0), (1, 128, 0), (2, 64, 0))
    sweep_images: int = 500
    query_rows: tuple[int, ...] = (100_000, 1_000_000)
    index_rows: int = 100_000  # the HNSW index against exact search (building it costs minutes per 100k rows)
    queries: int = 20
    naive_queries: int = 5
    rss_images: tuple[int, int] = (2_000, 20_000)
    # batches: 6-13 s of forward here, long enough that a moment of other work on the machine averages out
    bare_reps: int = 15
    clap: dict | None = None  # {"audio": ClapAudioConfig kwargs, "features": extractor kwargs}; None: LAION's unfused
    transcribe_clips: tuple[int, int] = (32, 4)  # 5 s and 60 s clips transcribed by ours and faster-whisper
    serve_rows: int = 100_000  # the search page's API, timed at the client over this many 512-d rows
    peak_shapes: tuple[tuple[int, int, int], ...] = tuple(gemm_shapes(PEAK_WIDTHS))  # (M, K, N) of the GEMM peak
    whole_run: bool = True  # also retrieval, the peak-memory ratio and the 10-item job (they need every modality)
    quick: bool = False


def make_plan(
    n: int | None, quick: bool, modalities: tuple[str, ...] = MODALITIES, image_model: str | None = None
) -> Plan:
    """The full plan (N=1000 per modality, 1M-row retrieval, 2k/20k-image memory jobs) or the quick one; images by
    `image_model` (a converted CLIP, SigLIP or OpenCLIP) instead of the bench's random ViT-B/32 CLIP if given."""
    full = modalities == MODALITIES
    if quick:
        n = n or 32
        return Plan(
            n=_counts(n),
            modalities=modalities,
            sweep=(),
            sweep_images=n,
            query_rows=(10_000, 100_000),
            index_rows=2_000,
            queries=10,
            naive_queries=3,
            rss_images=(16, 64),
            bare_reps=1,
            serve_rows=10_000,
            transcribe_clips=(4, 1),
            whole_run=full,
            quick=True,
            image_model=image_model,
            baseline_items={"image": n, "audio": max(1, n // 2), "text": TEXT_FACTOR * n},
        )
    return Plan(n=_counts(n or 1000), modalities=modalities, whole_run=full, image_model=image_model)


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50": sig(float(np.percentile(ms, 50))), "p95": sig(float(np.percentile(ms, 95)))}


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"bench [{time.monotonic() - _STARTED:6.1f} s]: {message}", file=sys.stderr, flush=True)


MODELS = {"audio": "whisper-tiny.en", "text": "minilm-l6"}


def model_for(modality: str, plan: Plan) -> str:
    if modality == "image":
        return plan.image_model or plan.clip_name
    return MODELS[modality]


def sig(x: float) -> float:
    """`x` to 4 significant digits (a ratio of two very different rates keeps its digits)."""
    return float(f"{x:.4g}")


def ratio(a: float | None, b: float | None) -> float | None:
    return sig(a / b) if a and b else None
