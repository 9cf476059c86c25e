"""`mmembed bench`: the pipeline's throughput against the code a user would otherwise write.

In one run, for each modality, on a generated raw-media Parquet dataset:

1. the pipeline end to end (Parquet in, store out: `jobs.run.run_job`), fp32 and bf16;
2. the reference loop a user would write, fp32, timed from the bytes in memory to embeddings
   (model loading and Parquet reading left out, which favours it): transformers
   `CLIPImageProcessorPil` + `CLIPModel.get_image_features`, `WhisperFeatureExtractor` +
   `WhisperModel` encoder (30 s windows, mean over positions), sentence-transformers `encode`;
3. our encoder's bare `embed` on pre-made inputs (the machine's ceiling), fp32 and bf16;

then a sweep of encoder actors x batch size x threads, retrieval latency over synthetic stores,
the incremental check on the largest, peak memory of an image job and of one 10x larger, and the
fixed cost of a 10-item job (those two in a subprocess `mmembed embed`, with a fresh Ray).

Models: `minilm-l6` and `whisper-tiny.en` are the real packaged ones; no CLIP weights can be
downloaded, so images use a CLIP with ViT-B/32 dimensions and random weights, built with
transformers and converted into the model home once. The Whisper baseline is transformers'
encoder loaded with the same tiny.en weights, mapped back from our store.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont

from encoders import audio, image, registry
from encoders import weights
from encoders.model import Options
from encoders.registry import load_encoder, load_inputs
from pipelines.embed import start as start_ray
from pipelines.embed import stop as stop_ray
from pipelines.errors import ResourceError
from storage.store import Store, duckdb_connection

from . import config
from .run import run_job
from .samples import SAMPLE_DIR

MODALITIES = ("image", "audio", "text")
DTYPES = ("float32", "bfloat16")
IMAGE_SIZES = ((640, 480), (640, 480), (480, 640), (800, 600))  # mostly VGA landscape, some portrait and larger
CLIP_SECONDS = 5.0
FILE_ROWS, ROW_GROUP = 1000, 100  # dataset layout: files of 1000 rows, row groups of 100 (~6 MB of JPEGs)
WARMUP_ITEMS = 8  # a job this small before the timed ones, so they measure a warm Ray, as a user's second job does
TEXT_FACTOR = 10  # texts are ~100x cheaper than images: 10x as many keep the fixed costs from dominating
RETRIEVAL_DIM, TOP_K = 512, 10
RSS_MODEL = (
    "shapes-clip"  # the memory jobs' model: streaming does not depend on it, and a small one keeps the 20k job short
)
WORKER_NICENESS = "RAY_worker_niceness"  # Ray's setting (default 15), read when Ray starts
CHECK_BATCH = 20_000  # input hashes in one incremental check, half of them already embedded
INDEX_CLUSTERS, INDEX_NOISE = (
    200,
    0.7,
)  # the HNSW store: points around centres (cosine ~0.8 to theirs), like real embeddings
TOP_PROCESSES = 5  # the largest processes named at a memory peak
# seconds between memory samples: a sample reads every process's smaps_rollup, ~3 ms each for Ray's workers (they
# map the whole object store), so sampling every 0.2 s took a third of a core from the jobs it measured
MEMORY_SAMPLING = 1.0
WORDS = [
    "the",
    "a",
    "small",
    "large",
    "red",
    "blue",
    "green",
    "old",
    "new",
    "quiet",
    "bright",
    "dark",
    "cold",
    "warm",
    "river",
    "city",
    "train",
    "station",
    "morning",
    "evening",
    "night",
    "dog",
    "cat",
    "bird",
    "child",
    "woman",
    "man",
    "house",
    "garden",
    "road",
    "bridge",
    "market",
    "window",
    "door",
    "table",
    "coffee",
    "tea",
    "bread",
    "apple",
    "music",
    "song",
    "voice",
    "picture",
    "camera",
    "photo",
    "mountain",
    "forest",
    "lake",
    "sea",
    "beach",
    "boat",
    "ship",
    "plane",
    "car",
    "bus",
    "street",
    "light",
    "rain",
    "snow",
    "wind",
    "sun",
    "moon",
    "star",
    "cloud",
    "sky",
    "field",
    "flower",
    "tree",
    "leaf",
    "stone",
    "wall",
    "tower",
    "church",
    "school",
    "office",
    "book",
    "letter",
    "paper",
    "pen",
    "phone",
    "computer",
    "screen",
    "game",
    "ball",
    "team",
    "player",
    "crowd",
    "festival",
    "dinner",
    "kitchen",
    "chair",
    "bed",
    "room",
    "floor",
    "walks",
    "runs",
    "sits",
    "stands",
    "looks",
    "waits",
    "opens",
    "closes",
    "carries",
    "holds",
    "reads",
    "writes",
    "sings",
    "plays",
    "builds",
    "paints",
    "finds",
    "near",
    "under",
    "over",
    "behind",
    "beside",
    "across",
    "through",
    "after",
    "before",
    "during",
    "with",
    "without",
    "and",
    "while",
    "because",
    "slowly",
    "quickly",
    "together",
    "alone",
    "again",
    "today",
    "yesterday",
    "tomorrow",
    "always",
    "never",
    "often",
]

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


class BenchError(RuntimeError):
    """A benchmark run could not be completed or produced an invalid measurement."""


def _counts(n: int) -> dict[str, int]:
    return {"image": n, "audio": n, "text": TEXT_FACTOR * n}


@dataclass(frozen=True)
class Plan:
    """What one bench run measures, and how much of it."""

    n: dict[str, int]  # items per modality
    modalities: tuple[str, ...] = MODALITIES
    clip: dict = field(default_factory=lambda: CLIP_B32)  # CLIPConfig kwargs of the image model
    clip_name: str = "bench-clip-b32"
    baseline_items: dict[str, int] = field(
        default_factory=lambda: {"image": 256, "audio": 128, "text": 2560}
    )  # steady speed: a sample will do
    sweep: tuple[tuple[int, int, int], ...] = (
        (1, 64, 0),
        (1, 64, 1),
        (1, 16, 0),
        (1, 128, 0),
        (2, 64, 0),
    )  # actors, batch, threads (0: auto)
    sweep_images: int = 500
    query_rows: tuple[int, ...] = (100_000, 1_000_000)
    index_rows: int = 100_000  # the HNSW index against exact search (building it costs minutes per 100k rows)
    queries: int = 20
    naive_queries: int = 5
    rss_images: tuple[int, int] = (2_000, 20_000)
    bare_reps: int = (
        15  # batches: 6-13 s of forward here, long enough that a moment of other work on the machine averages out
    )
    whole_run: bool = True  # also retrieval, the peak-memory ratio and the 10-item job (they need every modality)
    quick: bool = False


def make_plan(n: int | None, quick: bool, modalities: tuple[str, ...] = MODALITIES) -> Plan:
    """The full plan (N=1000 per modality, 1M-row retrieval, 2k/20k-image memory jobs) or the quick one."""
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
            whole_run=full,
            quick=True,
            baseline_items={"image": n, "audio": max(1, n // 2), "text": TEXT_FACTOR * n},
        )
    return Plan(n=_counts(n or 1000), modalities=modalities, whole_run=full)


# -- synthetic raw media --------------------------------------------------------------------


def make_image(rng: np.random.Generator, noise: Image.Image) -> bytes:
    """A JPEG of ~VGA size: a colour gradient, 3-8 random shapes, sensor-like noise (a crop of `noise`)."""
    width, height = IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    corners = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    picture = Image.fromarray(corners).resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.integers(0, width - 20), rng.integers(0, height - 20)
        x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(
                [(int(x), int(y)) for x, y in zip(rng.integers(x0, x1, 3), rng.integers(y0, y1, 3))], fill=fill
            )
    left, top = rng.integers(0, noise.width - width + 1), rng.integers(0, noise.height - height + 1)
    picture = Image.blend(picture, noise.crop((left, top, left + width, top + height)), float(rng.uniform(0.04, 0.2)))
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def speech_pool() -> list[np.ndarray]:
    """The bundled espeak sentences (jobs/sample_media/speech) as 16 kHz mono samples."""
    return [audio.decode(p.read_bytes()) for p in sorted((SAMPLE_DIR / "speech").glob("*.flac"))]


def make_clip(rng: np.random.Generator, speech: list[np.ndarray]) -> bytes:
    """A 5 s 16 kHz mono FLAC: two spoken sentences with a gap, a tone and background noise."""
    n = int(CLIP_SECONDS * audio.SAMPLE_RATE)
    gap = np.zeros(int(rng.uniform(0.1, 0.8) * audio.SAMPLE_RATE), np.float32)
    voice = np.concatenate([speech[rng.integers(len(speech))], gap, speech[rng.integers(len(speech))]])
    offset = rng.integers(0, max(1, len(voice) - n))
    clip = np.zeros(n, np.float32)
    part = voice[offset : offset + n]
    clip[: len(part)] = part
    t = np.arange(n, dtype=np.float32) / audio.SAMPLE_RATE
    clip += rng.uniform(0, 0.05) * np.sin(2 * np.pi * rng.uniform(100, 2000) * t)
    clip += rng.uniform(0.001, 0.02) * rng.standard_normal(n).astype(np.float32)
    clip *= rng.uniform(0.3, 0.9) / max(float(np.abs(clip).max()), 1e-6)
    buf = io.BytesIO()
    sf.write(buf, clip, audio.SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def make_text(rng: np.random.Generator) -> str:
    words = rng.choice(WORDS, size=rng.integers(10, 21))
    return " ".join(words).capitalize() + "."


def generate(modality: str, n: int, seed: int = 0) -> Iterator[tuple[str, bytes | str]]:
    """(id, bytes or text) for n synthetic items of `modality`; the same for the same seed."""
    rng = np.random.default_rng([seed, MODALITIES.index(modality)])
    if modality == "image":
        noise = Image.fromarray(rng.normal(128, 48, (700, 900, 3)).clip(0, 255).astype(np.uint8))
        return ((f"img-{i:06d}.jpg", make_image(rng, noise)) for i in range(n))
    if modality == "audio":
        speech = speech_pool()
        return ((f"clip-{i:06d}.flac", make_clip(rng, speech)) for i in range(n))
    return ((f"text-{i:06d}.txt", make_text(rng)) for i in range(n))


DATASET_SCHEMA = pa.schema(
    [("id", pa.string()), ("modality", pa.string()), ("uri", pa.string()), ("data", pa.binary()), ("text", pa.string())]
)


def write_dataset(dest: Path, items: dict[str, int], seed: int = 0) -> Path:
    """A raw-media Parquet dataset directory with `items[modality]` items of each modality; kept if it exists."""
    if dest.exists():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows: list[dict] = []
    files = 0

    def flush():
        nonlocal rows, files
        pq.write_table(
            pa.Table.from_pylist(rows, schema=DATASET_SCHEMA),
            tmp / f"part-{files:05d}.parquet",
            row_group_size=ROW_GROUP,
        )
        rows, files = [], files + 1

    for modality, n in items.items():
        for id_, value in generate(modality, n, seed):
            is_text = isinstance(value, str)
            rows.append(
                {
                    "id": id_,
                    "modality": modality,
                    "uri": f"bench://{modality}/{id_}",
                    "data": None if is_text else value,
                    "text": value if is_text else None,
                }
            )
            if len(rows) == FILE_ROWS:
                flush()
    if rows:
        flush()
    tmp.rename(dest)
    return dest


def read_items(dataset: Path, limit: int | None = None) -> list[bytes | str]:
    """The raw items of a dataset (bytes, or text), in id order."""
    table = pq.read_table(dataset, columns=["id", "data", "text"]).sort_by("id")
    if limit is not None:
        table = table.slice(0, limit)
    return [d if d is not None else t for d, t in zip(table["data"].to_pylist(), table["text"].to_pylist())]


# -- models ---------------------------------------------------------------------------------


def bench_clip(name: str, clip_config: dict) -> Path:
    """A random-weight CLIP as a transformers checkpoint (for the baseline), converted into the model home as `name`.

    Built once per model home; seeded, so every build is the same model.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from encoders.convert import convert
    from encoders.vocab import train_tokenizer

    src = registry.model_home() / "bench" / name
    dest = registry.models_dir() / f"{name}.parquet"
    if src.exists() and dest.exists():
        return src
    tmp = src.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = train_tokenizer(
        [" ".join(WORDS)] * 4, 600
    )  # the text tower is not benchmarked: a small vocabulary will do
    (tmp / "tokenizer.json").write_text(tokenizer)
    vocab = Tokenizer.from_str(tokenizer).get_vocab()
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    text = clip_config["text_config"] | {
        "vocab_size": len(vocab),
        "eos_token_id": eos,
        "bos_token_id": bos,
        "pad_token_id": eos,
    }
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(**(clip_config | {"text_config": text}))).save_pretrained(tmp)
    size = clip_config["vision_config"]["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(tmp)
    convert(tmp, dest)
    shutil.rmtree(src, ignore_errors=True)
    tmp.rename(src)
    return src


def hf_whisper_encoder(name: str):
    """transformers' Whisper encoder with the weights of our store `name`: our converter's table, inverted."""
    from transformers import WhisperConfig, WhisperModel

    from encoders.whisper import WhisperDims, hf_table

    stored = weights.load(registry.resolve(name))
    dims = WhisperDims(**stored.config)
    config = WhisperConfig(
        num_mel_bins=dims.n_mels,
        max_source_positions=dims.n_ctx,
        d_model=dims.width,
        encoder_layers=dims.layers,
        encoder_attention_heads=dims.heads,
        encoder_ffn_dim=dims.hidden,
        decoder_layers=1,
    )
    state = {}
    for ours, parts in hf_table(dims.layers).items():
        for hf, tensor in zip(parts, stored.tensors[ours].chunk(len(parts))):
            if hf is not None:  # None: the key bias Whisper lacks, stored as zeros
                state[hf] = tensor.contiguous()
    encoder = WhisperModel(config).encoder.eval()
    encoder.load_state_dict(state, strict=True)
    return encoder


# -- measuring ------------------------------------------------------------------------------


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50": sig(float(np.percentile(ms, 50))), "p95": sig(float(np.percentile(ms, 95)))}


def _process_tree(root: int) -> list[int]:
    """`root` and every process descending from it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return str(pid)


def _private_bytes(pid: int) -> int:
    """The process's private memory (RssAnon: heap, arrays, model weights), from /proc/PID/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _shm_bytes() -> int:
    """Shared memory in use (/dev/shm, where Ray's object store lives); 0 where there is none."""
    try:
        return shutil.disk_usage("/dev/shm").used
    except OSError:
        return 0


class PeakMemory:
    """Peak memory of a process and all its descendants (Ray's GCS, raylet and workers included).

    Sampled every `interval` s as the sum of each process's private memory (RssAnon) plus the
    shared memory in use above its level at the start, i.e. Ray's object store counted once. Shared
    libraries are left out: they are page cache, mapped by every worker. Reading PSS from
    smaps_rollup instead cost ~3.5 ms per Ray process per sample (each maps the whole object store):
    5-7% of a core, taken from the pipelines being timed; a sample now takes ~2 ms in all.
    """

    METHOD = (
        f"sum of private memory (RssAnon, /proc/PID/status) over the process tree incl. Ray GCS, raylet and workers, "
        f"plus /dev/shm in use above its level at the start (Ray's object store), sampled every {MEMORY_SAMPLING:g} s"
    )

    def __init__(self, pid: int | None = None, interval: float = MEMORY_SAMPLING):
        self.pid, self.interval = pid or os.getpid(), interval
        self.peak = 0
        self.at_peak: list[tuple[int, int]] = []  # (pid, bytes), largest first, at the peak sample
        self.names: dict[int, str] = {}
        self.shm_at_start = _shm_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            sizes = sorted(((_private_bytes(p), p) for p in _process_tree(self.pid)), reverse=True)
            total = sum(size for size, _ in sizes) + max(0, _shm_bytes() - self.shm_at_start)
            if total > self.peak:
                self.peak, self.at_peak = total, [(p, size) for size, p in sizes[:TOP_PROCESSES]]
                self.names = {p: _name(p) for p, _ in self.at_peak}  # now, while they live
            if self._stop.wait(self.interval):
                return

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)

    def largest(self) -> list[dict]:
        """The largest processes at the peak: name (Ray's process title for a worker) and MB."""
        return [{"process": self.names.get(p, str(p)), "mb": round(size / 2**20, 1)} for p, size in self.at_peak]

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pipeline(
    dataset: Path,
    root: Path,
    modality: str,
    model: str,
    dtype: str,
    actors: int = 1,
    batch: int | None = None,
    threads: int = 0,
) -> dict:
    """One `run_job` job into a fresh store: items/s end to end, the job's stage seconds, peak memory."""
    shutil.rmtree(root, ignore_errors=True)
    overrides = {
        "input": str(dataset),
        "root": str(root),
        "models": {modality: [model]},
        "dtype": dtype,
        "actors": actors,
        "threads_per_actor": threads,
        "device": "auto",
    }
    if batch:
        overrides["batch_size"] = {modality: batch}
    with PeakMemory() as memory:
        record = run_job(config.load(None, overrides), log=io.StringIO())
    counts = record["counts"][f"{modality}/{model}"]
    if counts["errored"]:
        raise BenchError(
            f"{counts['errored']} {modality} item(s) failed in the pipeline; see the errors table in {root}"
        )
    stages = record["stages_s"]
    return {
        "items": counts["embedded"],
        "items_per_s": sig(counts["embedded"] / stages["wall"]),
        "stages_s": stages,
        "encode_items_per_s": sig(counts["embedded"] / stages["encode_s"]) if stages.get("encode_s") else None,
        "peak_rss_mb": memory.peak_mb,
        "largest_at_peak": memory.largest(),
    }


def stored_embeddings(root: Path) -> np.ndarray:
    """Every committed embedding of a one-model store, in id order."""
    store = Store(str(root))
    files = [f for part in store.partitions("embeddings").values() for f in part]
    table = store.dataset(files).to_table(columns=["id", "embedding"]).sort_by("id")
    return table["embedding"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return round(float((a * b).sum(1).min()), 6)


def batched(items: list, size: int) -> Iterator[list]:
    return (items[i : i + size] for i in range(0, len(items), size))


def baseline(modality: str, items: list, batch: int, plan: Plan) -> tuple[str, float, np.ndarray]:
    """The loop a transformers / sentence-transformers user writes, fp32: (what it is, items/s, embeddings)."""
    import torch

    device = _device()
    if modality == "text":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(registry.PACKAGED["minilm-l6"]()), device=device)
        seconds, out = timed(lambda: model.encode(items, batch_size=batch, convert_to_numpy=True))
        return "sentence-transformers SentenceTransformer.encode (all-MiniLM-L6-v2)", len(items) / seconds, out
    if modality == "image":
        from transformers import CLIPImageProcessorPil, CLIPModel

        src = bench_clip(plan.clip_name, plan.clip)
        processor = CLIPImageProcessorPil.from_pretrained(src)
        model = CLIPModel.from_pretrained(src).eval().to(device)

        def embed(chunk):
            pixels = processor(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in chunk], return_tensors="pt")[
                "pixel_values"
            ]
            return model.get_image_features(pixel_values=pixels.to(device)).pooler_output

        what = "transformers CLIPImageProcessorPil + CLIPModel.get_image_features"
    else:
        from transformers import WhisperFeatureExtractor

        extractor = WhisperFeatureExtractor(feature_size=80)
        encoder = hf_whisper_encoder("whisper-tiny.en").to(device)

        def embed(chunk):
            clips = [sf.read(io.BytesIO(b), dtype="float32")[0] for b in chunk]  # 16 kHz mono: no resampling
            features = extractor(clips, sampling_rate=audio.SAMPLE_RATE, return_tensors="pt").input_features
            return encoder(features.to(device)).last_hidden_state.mean(1)

        what = "transformers WhisperFeatureExtractor + WhisperModel encoder (30 s windows), tiny.en weights"
    with torch.inference_mode():
        seconds, out = timed(lambda: torch.cat([embed(chunk).float().cpu() for chunk in batched(items, batch)]).numpy())
    return what, len(items) / seconds, out


def bare(model: str, modality: str, items: list, dtype: str, batch: int, reps: int) -> float:
    """items/s of our encoder's `embed` on inputs preprocessed beforehand (after one warm-up batch)."""
    encoder = load_encoder(model, Options(device=_device(), dtype=dtype))
    ready = [encoder.preprocess(modality, raw) for raw in (items * math.ceil(batch / len(items)))[:batch]]
    encoder.embed(modality, ready)
    seconds, _ = timed(lambda: [encoder.embed(modality, ready) for _ in range(reps)])
    return batch * reps / seconds


def preprocess_costs(model: str, modality: str, items: list) -> dict[str, float]:
    """Milliseconds per item in the bench process, as a pipeline task runs it: decoding, and the whole of `preprocess`."""
    inputs = load_inputs(model)
    decode = {"image": image.decode, "audio": audio.decode}.get(modality)
    decode_s = timed(lambda: [decode(raw) for raw in items])[0] if decode else 0.0
    total_s = timed(lambda: [inputs(modality, raw) for raw in items])[0]
    return {"decode_ms": round(1000 * decode_s / len(items), 3), "preprocess_ms": round(1000 * total_s / len(items), 3)}


_STARTED = time.monotonic()


def log(message: str) -> None:
    print(f"bench [{time.monotonic() - _STARTED:6.1f} s]: {message}", file=sys.stderr, flush=True)


MODELS = {"audio": "whisper-tiny.en", "text": "minilm-l6"}


def model_for(modality: str, plan: Plan) -> str:
    return plan.clip_name if modality == "image" else MODELS[modality]


def measure_modality(modality: str, plan: Plan, work: Path) -> dict:
    """Pipeline (fp32, bf16), baseline, bare forward (fp32, bf16) and parity figures for one modality."""
    model = model_for(modality, plan)
    n = plan.n[modality]
    dataset = write_dataset(work / "data" / f"{modality}-{n}", {modality: n})
    items = read_items(dataset)
    batch = getattr(config.load().batch_size, modality)
    out: dict = {"model": model, "items": n, "encode_batch": batch, "pipeline": {}, "bare": {}}
    embeddings = {}
    for dtype in DTYPES:
        log(f"{modality}: pipeline {dtype} over {n} items")
        root = work / "stores" / f"{modality}-{dtype}"
        out["pipeline"][dtype] = pipeline(dataset, root, modality, model, dtype)
        embeddings[dtype] = stored_embeddings(root)
    log(f"{modality}: reference baseline")
    sample = items[: plan.baseline_items[modality]]
    what, rate, reference = baseline(modality, sample, batch, plan)
    out["baseline"] = {"what": what, "dtype": "float32", "items": len(sample), "items_per_s": sig(rate)}
    for dtype in DTYPES:
        log(f"{modality}: bare encoder {dtype}")
        out["bare"][dtype] = {"items_per_s": sig(bare(model, modality, items, dtype, batch, plan.bare_reps))}
    out["preprocess_costs"] = preprocess_costs(model, modality, items[:32])
    out["cosine_min"] = {"bfloat16_vs_float32": min_cosine(embeddings["bfloat16"], embeddings["float32"])}
    if modality == "audio":  # the baseline pads to 30 s: held to our padded mode, which computes the same function
        padded = load_encoder(model, Options(device=_device(), audio_mode="padded")).encode("audio", items[:4])
        out["cosine_min"]["baseline_vs_ours_padded"] = min_cosine(padded, reference[:4])
    else:
        out["cosine_min"]["float32_vs_baseline"] = min_cosine(embeddings["float32"][: len(reference)], reference)
    return out


def warm_up(plan: Plan, work: Path) -> float:
    """Convert the packaged models and run one small job, so that the timed jobs meet a warm Ray, as a user's second job does."""
    for modality in plan.modalities:
        registry.resolve(model_for(modality, plan))
    modality = plan.modalities[-1]  # text when it is measured: the cheapest
    log(f"warm-up: a {WARMUP_ITEMS}-item {modality} job")
    dataset = write_dataset(work / "data" / f"{modality}-{WARMUP_ITEMS}", {modality: WARMUP_ITEMS})
    return pipeline(dataset, work / "stores" / "warmup", modality, model_for(modality, plan), "float32")["stages_s"][
        "wall"
    ]


def measure_sweep(plan: Plan, work: Path) -> list[dict]:
    """Image pipeline fp32 items/s over actors x encoder batch x torch threads per actor (0 = the default: the node's CPUs
    shared by the actors)."""
    dataset = write_dataset(work / "data" / f"image-{plan.sweep_images}", {"image": plan.sweep_images})
    points = []
    for actors, batch, threads in plan.sweep:
        log(f"sweep: {actors} actor(s), batch {batch}, threads {threads or 'auto'}")
        try:
            result = pipeline(
                dataset, work / "stores" / "sweep", "image", plan.clip_name, "float32", actors, batch, threads
            )
        except ResourceError as e:
            points.append({"actors": actors, "batch": batch, "threads": threads, "skipped": str(e)})
            continue
        points.append(
            {
                "actors": actors,
                "batch": batch,
                "threads": threads,
                "items_per_s": result["items_per_s"],
                "encode_items_per_s": result["encode_items_per_s"],
                "peak_rss_mb": result["peak_rss_mb"],
            }
        )
    return points


# -- retrieval ------------------------------------------------------------------------------


def write_vector_store(
    root: Path, rows: int, rng: np.random.Generator, model: str = "bench-vectors", centres: np.ndarray | None = None
) -> str:
    """A committed store of `rows` random unit vectors (dim 512) under modality=image/model=`model`:
    uniform, or scattered around `centres` (see `around`)."""
    import hashlib

    from storage.schema import TIMESTAMP, embedding_schema

    shutil.rmtree(root, ignore_errors=True)
    store = Store(str(root))
    job, files, chunk = "bench-vectors", [], 100_000
    now = datetime.now(UTC)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        vectors = (
            rng.standard_normal((n, RETRIEVAL_DIM), dtype=np.float32) if centres is None else around(centres, n, rng)
        )
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"v{i:08d}" for i in range(start, start + n)]
        table = pa.table(
            {
                "id": ids,
                "uri": [f"bench://{i}" for i in ids],
                "source": ["bench"] * n,
                "content_hash": [hashlib.sha256(i.encode()).hexdigest() for i in ids],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), RETRIEVAL_DIM),
                "model_digest": ["random"] * n,
                "job_id": [job] * n,
                "created_at": pa.array([now] * n, TIMESTAMP),
            },
            schema=embedding_schema(RETRIEVAL_DIM),
        )
        files.append(store.write_embeddings("image", model, table))
    store.commit(job, files)
    return model


def around(centres: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` points, each a random centre plus Gaussian noise (not normalised)."""
    picked = centres[rng.integers(0, len(centres), n)]
    return picked + INDEX_NOISE * rng.standard_normal(picked.shape, dtype=np.float32)


def brute_force(files: list[str], queries: np.ndarray) -> tuple[list[float], list[str]]:
    """numpy top-k over the vectors read into memory: seconds per query, and the first query's ids."""
    table = pq.read_table(files, columns=["id", "embedding"])
    matrix = table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, RETRIEVAL_DIM)

    def top(q: np.ndarray) -> pa.Array:
        scores = matrix @ (q / np.linalg.norm(q))
        best = np.argpartition(-scores, TOP_K)[:TOP_K]
        return table["id"].take(best[np.argsort(-scores[best])])

    return [timed(lambda q=q: top(q))[0] for q in queries], top(queries[0]).to_pylist()


def measure_retrieval(rows: int, plan: Plan, work: Path) -> dict:
    """Top-10 latency over `rows` x 512 vectors: storage.query.search, numpy brute force, naive DuckDB; the incremental check."""
    from storage.query import search

    rng = np.random.default_rng(rows)
    root = work / "stores" / f"vectors-{rows}"
    log(f"retrieval: writing {rows} x {RETRIEVAL_DIM} vectors")
    model = write_vector_store(root, rows, rng)
    store = Store(str(root))
    files = [store.uri(f) for f in store.partitions("embeddings")[("image", model)]]
    queries = rng.standard_normal((plan.queries, RETRIEVAL_DIM), dtype=np.float32)
    log(f"retrieval: {rows} rows, search / numpy / naive DuckDB")
    cold, first = timed(lambda: search(str(root), queries[0], "image", model, k=TOP_K))
    search_s = [timed(lambda q=q: search(str(root), q, "image", model, k=TOP_K))[0] for q in queries]

    numpy_s, numpy_first = brute_force(files, queries)
    if numpy_first != first["id"].to_pylist():
        raise BenchError("search and numpy brute force disagree on the top-10")
    con = duckdb_connection()
    sql = (
        f"SELECT id, array_cosine_similarity(embedding::FLOAT[{RETRIEVAL_DIM}], ?::FLOAT[{RETRIEVAL_DIM}]) AS score "
        "FROM read_parquet(?) ORDER BY score DESC LIMIT 10"
    )
    naive_s = [
        timed(lambda q=q: con.execute(sql, [q.tolist(), files]).fetchall())[0] for q in queries[: plan.naive_queries]
    ]
    hashes = pq.read_table(files, columns=["content_hash"])["content_hash"]
    half = min(CHECK_BATCH // 2, rows)
    fresh = pa.array([f"{i:064x}" for i in range(half)])
    done_some = timed(lambda: store.done_keys(model, pa.concat_arrays([hashes.slice(0, half).combine_chunks(), fresh])))
    done_all = timed(lambda: store.done_keys(model, hashes))
    if int(done_all[1].sum()) != rows or int(done_some[1].sum()) != half:
        raise BenchError("Store.done_keys did not find the committed rows")
    return {
        "rows": rows,
        "dim": RETRIEVAL_DIM,
        "k": TOP_K,
        "search_first_call_s": round(cold, 3),
        "search_ms": percentiles(search_s),
        "numpy_ms": percentiles(numpy_s),
        "naive_duckdb_ms": percentiles(naive_s),
        "done_keys_s": {"batch": 2 * half, "half_new": round(done_some[0], 3), "all_rows": round(done_all[0], 3)},
    }


def measure_index(rows: int, plan: Plan, work: Path) -> dict:
    """The HNSW index (`mmembed index`) against exact search over `rows` clustered 512-d vectors:
    build time and size, top-10 latency both ways, recall@10 of the index."""
    from storage.index import index_path
    from storage.query import build_index, search

    rng = np.random.default_rng(rows + 1)
    centres = rng.standard_normal((INDEX_CLUSTERS, RETRIEVAL_DIM), dtype=np.float32)
    root = work / "stores" / f"clustered-{rows}"
    log(f"index: writing {rows} clustered vectors, building the HNSW index")
    model = write_vector_store(root, rows, rng, centres=centres)
    build_s, _ = timed(lambda: build_index(str(root)))
    queries = around(centres, plan.queries, rng)
    cold, _ = timed(lambda: search(str(root), queries[0], "image", model, k=TOP_K))
    hnsw_s, exact_s, found = [], [], 0
    for q in queries:
        seconds, got = timed(lambda q=q: search(str(root), q, "image", model, k=TOP_K))
        hnsw_s.append(seconds)
        seconds, want = timed(lambda q=q: search(str(root), q, "image", model, k=TOP_K, use_index=False))
        exact_s.append(seconds)
        found += len(set(got["id"].to_pylist()) & set(want["id"].to_pylist()))
    return {
        "rows": rows,
        "dim": RETRIEVAL_DIM,
        "k": TOP_K,
        "clusters": INDEX_CLUSTERS,
        "build_s": round(build_s, 2),
        "index_mb": round(index_path(Store(str(root)), "image", model).stat().st_size / 1e6, 1),
        "first_call_s": round(cold, 3),
        "hnsw_ms": percentiles(hnsw_s),
        "exact_ms": percentiles(exact_s),
        "recall_at_10": round(found / (TOP_K * len(queries)), 4),
    }


# -- jobs in a subprocess -------------------------------------------------------------------


def cli_job(dataset: Path, root: Path, models: dict[str, str], dtype: str = "float32") -> dict:
    """`mmembed embed DATASET ROOT` in a fresh process (a fresh Ray): seconds end to end, the job record, peak memory."""
    shutil.rmtree(root, ignore_errors=True)
    command = [sys.executable, "-m", "jobs.cli", "embed", str(dataset), str(root), "--json", f"--dtype={dtype}"]
    command += [f"--model={m}={name}" for m, name in models.items()]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as memory:
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise BenchError(
            f"{' '.join(command[1:4])} ... failed ({proc.returncode}): {stderr.strip().splitlines()[-1:] or ''}"
        )
    record = json.loads(stdout)
    return {
        "seconds": round(seconds, 2),
        "job_wall_s": record["stages_s"]["wall"],
        "stages_s": record["stages_s"],
        "peak_rss_mb": memory.peak_mb,
        "largest_at_peak": memory.largest(),
    }


def measure_memory(plan: Plan, work: Path) -> dict:
    out = {"method": PeakMemory.METHOD, "model": RSS_MODEL, "dtype": "float32", "jobs": []}
    for n in plan.rss_images:
        log(f"memory: a {n}-image {RSS_MODEL} job in a subprocess")
        dataset = write_dataset(work / "data" / f"image-{n}", {"image": n})
        out["jobs"].append({"images": n, **cli_job(dataset, work / "stores" / f"rss-{n}", {"image": RSS_MODEL})})
    small, large = out["jobs"]
    out["ratio"] = _ratio(large["peak_rss_mb"], small["peak_rss_mb"])
    return out


def measure_fixed_cost(plan: Plan, work: Path) -> dict:
    """A 10-item job (4 images, 3 clips, 3 texts), `mmembed embed` end to end in a subprocess, Ray start included."""
    log("fixed cost: a 10-item job in a subprocess")
    dataset = write_dataset(work / "data" / "mixed-10", {"image": 4, "audio": 3, "text": 3})
    models = {"image": plan.clip_name, "audio": MODELS["audio"], "text": MODELS["text"]}
    return {"items": 10, "models": models, **cli_job(dataset, work / "stores" / "mixed-10", models)}


# -- the whole run --------------------------------------------------------------------------


def machine() -> dict:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    device = _device()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def sig(x: float) -> float:
    """`x` to 4 significant digits (a ratio of two very different rates keeps its digits)."""
    return float(f"{x:.4g}")


def _ratio(a: float | None, b: float | None) -> float | None:
    return sig(a / b) if a and b else None


def summarize(result: dict) -> None:
    """Add the `ratios`, `latency_ms`, `peak_rss_ratio_20k_vs_2k` and `targets` sections to `result`."""
    m = result["modalities"]

    def rate(modality, kind, dtype="float32"):
        if modality not in m:
            return None
        part = m[modality][kind]
        return part["items_per_s"] if kind == "baseline" else part[dtype]["items_per_s"]

    retrieval = result.get("retrieval") or []
    largest = retrieval[-1] if retrieval else None
    memory, fixed = result.get("memory"), result.get("fixed_cost")
    rss = memory["ratio"] if memory else None
    result["ratios"] = {
        "image_fp32_vs_hf": _ratio(rate("image", "pipeline"), rate("image", "baseline")),
        "image_fp32_vs_bare": _ratio(rate("image", "pipeline"), rate("image", "bare")),
        "image_bf16_vs_hf_fp32": _ratio(rate("image", "pipeline", "bfloat16"), rate("image", "baseline")),
        "image_bf16_vs_bare_bf16": _ratio(rate("image", "pipeline", "bfloat16"), rate("image", "bare", "bfloat16")),
        "audio_trimmed_vs_hf": _ratio(rate("audio", "pipeline"), rate("audio", "baseline")),
        "audio_fp32_vs_bare": _ratio(rate("audio", "pipeline"), rate("audio", "bare")),
        "text_fp32_vs_st": _ratio(rate("text", "pipeline"), rate("text", "baseline")),
        "text_bf16_vs_st": _ratio(rate("text", "pipeline", "bfloat16"), rate("text", "baseline")),
        "text_fp32_vs_bare": _ratio(rate("text", "pipeline"), rate("text", "bare")),
        "query_1m_vs_naive": _ratio(largest["naive_duckdb_ms"]["p50"], largest["search_ms"]["p50"])
        if largest
        else None,
        "peak_rss_ratio_20k_vs_2k": rss,
    }
    result["latency_ms"] = {
        "query_1m_p50": largest["search_ms"]["p50"] if largest else None,
        "query_1m_rows": largest["rows"] if largest else None,  # 100k in --quick
        "job_10_items_s": fixed["seconds"] if fixed else None,  # seconds, despite the section's name
        "query_hnsw_p50": result["index"]["hnsw_ms"]["p50"] if result.get("index") else None,
    }
    result["peak_rss_ratio_20k_vs_2k"] = rss
    result["peak_rss_images"] = list(result["plan"]["rss_images"]) if memory else None  # (200, 2000)-style in --quick
    cos = m.get("image", {}).get("cosine_min", {}).get("bfloat16_vs_float32")
    r, lat = result["ratios"], result["latency_ms"]
    checks = [
        ("image fp32 pipeline / bare forward", r["image_fp32_vs_bare"], ">=", 0.85),
        ("image fp32 pipeline / HF", r["image_fp32_vs_hf"], ">=", 1.2),
        ("image bf16 pipeline / HF fp32", r["image_bf16_vs_hf_fp32"], ">=", 2.5),
        ("image bf16 cosine to fp32 (min)", cos, ">=", 0.999),
        ("audio trimmed pipeline / HF (30 s)", r["audio_trimmed_vs_hf"], ">=", 6.0),
        ("text fp32 pipeline / sentence-transformers", r["text_fp32_vs_st"], ">=", 1.0),
        ("text bf16 pipeline / sentence-transformers", r["text_bf16_vs_st"], ">=", 2.0),
        ("query top-10 p50 (ms) over the largest store", lat["query_1m_p50"], "<=", 100.0),
        ("query: naive DuckDB / search", r["query_1m_vs_naive"], ">=", 10.0),
        ("peak memory large / small image job", rss, "<=", 1.3),
        ("10-item job end to end (s)", lat["job_10_items_s"], "<=", 15.0),
    ]
    result["targets"] = [
        {
            "target": name,
            "value": value,
            "goal": f"{op} {goal}",
            "met": None if value is None else (value >= goal if op == ">=" else value <= goal),
        }
        for name, value, op, goal in checks
    ]


def measure(plan: Plan, out: Path) -> dict:
    """Run every measurement of `plan`, with datasets and stores under `out`; -> the result document."""
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "version": 1,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": plan.quick,
        "machine": machine(),
        "plan": dataclasses.asdict(plan),
        "modalities": {},
    }
    result["plan"].pop("clip")
    started = time.perf_counter()
    if "image" in plan.modalities:
        log("building the benchmark CLIP (once per model home)")
        bench_clip(plan.clip_name, plan.clip)
    # Ray starts its workers at niceness 15: beside any other load they would lose the CPU to the
    # baselines, which run in this (niceness 0) process. Equal footing, in this Ray and the subprocess jobs.
    os.environ.setdefault(WORKER_NICENESS, "0")
    result["machine"]["ray_worker_niceness"] = os.environ[WORKER_NICENESS]
    own_ray = start_ray()
    partial = out / "bench.partial.json"  # each section as it completes: a run cut short still leaves its numbers

    def keep(section: dict, key: str, value) -> None:
        section[key] = value
        partial.write_text(json.dumps(result, indent=1) + "\n")

    keep(result, "warmup_s", warm_up(plan, out))
    for modality in plan.modalities:
        keep(result["modalities"], modality, measure_modality(modality, plan, out))
    if "image" in plan.modalities and plan.sweep:  # --quick skips it
        keep(result, "sweep", measure_sweep(plan, out))
    if own_ray:  # the rest needs no Ray here, and its idle workers would poll beside the subprocess jobs' own Ray
        stop_ray()
    if plan.whole_run:
        keep(result, "retrieval", [measure_retrieval(rows, plan, out) for rows in plan.query_rows])
        keep(result, "index", measure_index(plan.index_rows, plan, out))
        keep(result, "fixed_cost", measure_fixed_cost(plan, out))
        keep(result, "memory", measure_memory(plan, out))
    partial.unlink()
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summarize(result)
    return result


# -- reports --------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows),
    ]


def markdown(result: dict) -> str:
    """The result as markdown tables: throughput, stages, sweep, retrieval, memory and fixed cost, targets."""
    mach = result["machine"]
    lines = [
        f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} threads), device {mach['device']}"
        f"{' ' + mach['gpu'] if mach['gpu'] else ''}; load average (1, 5, 15 min) at start {mach['load_avg_at_start']}, "
        f"at end {mach.get('load_avg_at_end')}. "
        f"{'Quick run. ' if result['quick'] else ''}Total {result['total_s']} s.",
        "",
    ]
    m = result["modalities"]
    if m:
        lines += ["### Pipeline throughput (items/s)", ""]
        rows = [
            [
                mod,
                r["model"],
                r["items"],
                r["pipeline"]["float32"]["items_per_s"],
                r["pipeline"]["bfloat16"]["items_per_s"],
                r["baseline"]["items_per_s"],
                r["bare"]["float32"]["items_per_s"],
                r["bare"]["bfloat16"]["items_per_s"],
                _ratio(r["pipeline"]["float32"]["items_per_s"], r["baseline"]["items_per_s"]),
                _ratio(r["pipeline"]["bfloat16"]["items_per_s"], r["baseline"]["items_per_s"]),
                _ratio(r["pipeline"]["float32"]["items_per_s"], r["bare"]["float32"]["items_per_s"]),
            ]
            for mod, r in m.items()
        ]
        lines += _table(
            [
                "modality",
                "model",
                "N",
                "pipeline fp32",
                "pipeline bf16",
                "baseline fp32",
                "bare fp32",
                "bare bf16",
                "fp32 / baseline",
                "bf16 / baseline",
                "fp32 / bare",
            ],
            rows,
        )
        lines += ["", "Baselines: " + "; ".join(f"{mod}: {r['baseline']['what']}" for mod, r in m.items()) + ".", ""]
        lines += ["### Pipeline stages (seconds; preprocess/encode/write are summed task time)", ""]
        rows = [
            [
                mod,
                dtype,
                p["stages_s"].get("wall"),
                p["stages_s"].get("list"),
                p["stages_s"].get("preprocess_s"),
                p["stages_s"].get("encode_s"),
                p["stages_s"].get("write_s"),
                p["encode_items_per_s"],
                p["peak_rss_mb"],
            ]
            for mod, r in m.items()
            for dtype, p in r["pipeline"].items()
        ]
        lines += _table(
            ["modality", "dtype", "wall", "list", "preprocess", "encode", "write", "encode items/s", "peak memory MB"],
            rows,
        )
        rows = [
            [
                mod,
                r["preprocess_costs"]["decode_ms"],
                r["preprocess_costs"]["preprocess_ms"],
                *(f"{c:.5f}" for c in r["cosine_min"].values()),
            ]
            for mod, r in m.items()
        ]
        lines += [
            "",
            "Per item on one thread (ms), and the lowest cosine per pair (audio: the baseline against our padded mode):",
            "",
        ]
        lines += _table(
            ["modality", "decode", "decode + preprocess", "cosine bf16 vs fp32", "cosine vs baseline"], rows
        )
        lines.append("")
    if result.get("sweep"):
        lines += [
            "### Image pipeline sweep (fp32): actors x batch x threads per actor (0 = auto: the node's CPUs shared by the actors)",
            "",
        ]
        lines += _table(
            ["actors", "batch", "threads", "items/s", "encode items/s", "peak memory MB", "note"],
            [
                [
                    p["actors"],
                    p["batch"],
                    p["threads"],
                    p.get("items_per_s"),
                    p.get("encode_items_per_s"),
                    p.get("peak_rss_mb"),
                    p.get("skipped", ""),
                ]
                for p in result["sweep"]
            ],
        )
        lines.append("")
    if result.get("retrieval"):
        lines += ["### Retrieval: top-10 over random 512-d unit vectors (ms)", ""]
        lines += _table(
            [
                "rows",
                "search p50",
                "search p95",
                "numpy p50",
                "naive DuckDB p50",
                "naive / search",
                "search first call (s)",
                "done_keys 20k, half new (s)",
                "done_keys all rows (s)",
            ],
            [
                [
                    r["rows"],
                    r["search_ms"]["p50"],
                    r["search_ms"]["p95"],
                    r["numpy_ms"]["p50"],
                    r["naive_duckdb_ms"]["p50"],
                    _ratio(r["naive_duckdb_ms"]["p50"], r["search_ms"]["p50"]),
                    r["search_first_call_s"],
                    r["done_keys_s"]["half_new"],
                    r["done_keys_s"]["all_rows"],
                ]
                for r in result["retrieval"]
            ],
        )
        lines.append("")
    if result.get("index"):
        x = result["index"]
        lines += [
            f"### HNSW index (`mmembed index`) vs exact search: top-10 over {x['rows']} 512-d vectors in {x['clusters']} clusters",
            "",
        ]
        lines += _table(
            [
                "build (s)",
                "index MB",
                "HNSW p50 (ms)",
                "HNSW p95",
                "exact p50",
                "exact p95",
                "recall@10",
                "first call (s)",
            ],
            [
                [
                    x["build_s"],
                    x["index_mb"],
                    x["hnsw_ms"]["p50"],
                    x["hnsw_ms"]["p95"],
                    x["exact_ms"]["p50"],
                    x["exact_ms"]["p95"],
                    x["recall_at_10"],
                    x["first_call_s"],
                ]
            ],
        )
        lines.append("")
    if result.get("memory"):
        mem, fixed = result["memory"], result["fixed_cost"]
        lines += ["### Memory and fixed cost (subprocess `mmembed embed`, fresh Ray)", ""]
        rows = [[f"{j['images']} images", j["seconds"], j["job_wall_s"], j["peak_rss_mb"]] for j in mem["jobs"]]
        rows.append(
            [
                f"{fixed['items']} items (4 image, 3 audio, 3 text)",
                fixed["seconds"],
                fixed["job_wall_s"],
                fixed["peak_rss_mb"],
            ]
        )
        lines += _table(["job", "seconds end to end", "job wall (s)", "peak memory MB"], rows)
        lines += [
            "",
            f"Image jobs with {mem['model']} in {mem['dtype']}. Peak memory ratio large / small: {mem['ratio']}. Method: {mem['method']}.",
            "",
        ]
    lines += ["### Targets", ""]
    lines += _table(
        ["target", "value", "goal", "met"], [[t["target"], t["value"], t["goal"], t["met"]] for t in result["targets"]]
    )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """A PNG: per modality, items/s of each way of embedding relative to the reference baseline; then the sweep."""
    bars = [
        ("pipeline fp32", (31, 119, 180)),
        ("pipeline bf16", (255, 127, 14)),
        ("bare fp32", (44, 160, 44)),
        ("bare bf16", (214, 39, 40)),
    ]
    m = result["modalities"]
    sweep = [p for p in result.get("sweep") or [] if "items_per_s" in p]
    width, panel = 900, 320
    canvas = Image.new("RGB", (width, panel * (1 + bool(sweep)) + 60), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    draw.text((10, 8), "items/s relative to the reference baseline (= 1, dashed)", fill="black", font=font)
    values = {
        mod: [
            r["pipeline"]["float32"]["items_per_s"],
            r["pipeline"]["bfloat16"]["items_per_s"],
            r["bare"]["float32"]["items_per_s"],
            r["bare"]["bfloat16"]["items_per_s"],
        ]
        for mod, r in m.items()
    }
    rel = {mod: [v / m[mod]["baseline"]["items_per_s"] for v in vs] for mod, vs in values.items()}
    top = max([1.0, *(v for vs in rel.values() for v in vs)]) * 1.1
    x0, y0, y1 = 60, 40, panel
    scale = (y1 - y0 - 30) / top
    draw.line((x0, y1, width - 20, y1), fill="black")
    group = (width - x0 - 40) / max(len(rel), 1)
    for g, (mod, vs) in enumerate(rel.items()):
        gx = x0 + g * group + 20
        for b, v in enumerate(vs):
            bx = gx + b * (group - 40) / len(vs)
            draw.rectangle((bx, y1 - v * scale, bx + (group - 40) / len(vs) - 6, y1), fill=bars[b][1])
            draw.text((bx, y1 - v * scale - 16), f"{v:.2f}", fill="black", font=font)
        draw.text((gx, y1 + 4), mod, fill="black", font=font)
    for x in range(x0, width - 20, 12):
        draw.line((x, y1 - scale, x + 6, y1 - scale), fill="gray")
    for b, (name, colour) in enumerate(bars):
        draw.rectangle((width - 170, 30 + 18 * b, width - 158, 42 + 18 * b), fill=colour)
        draw.text((width - 152, 28 + 18 * b), name, fill="black", font=font)
    if sweep:
        y0, y1 = panel + 70, 2 * panel + 30
        draw.text((10, y0 - 20), "image pipeline fp32 items/s by actors x batch x threads", fill="black", font=font)
        top = max(p["items_per_s"] for p in sweep) * 1.15
        scale = (y1 - y0 - 20) / top
        step = (width - x0 - 40) / len(sweep)
        draw.line((x0, y1, width - 20, y1), fill="black")
        for i, p in enumerate(sweep):
            bx = x0 + i * step + 10
            draw.rectangle((bx, y1 - p["items_per_s"] * scale, bx + step - 30, y1), fill=bars[0][1])
            draw.text((bx, y1 - p["items_per_s"] * scale - 16), f"{p['items_per_s']:.1f}", fill="black", font=font)
            draw.text((bx, y1 + 4), f"{p['actors']}a b{p['batch']} t{p['threads'] or 'auto'}", fill="black", font=font)
    canvas.save(path)
    return path


def write_reports(result: dict, out: Path, json_path: Path | None) -> dict[str, Path]:
    """bench.json, bench.md and bench.png under `out` (and the JSON at `json_path` too)."""
    text = json.dumps(result, indent=1)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    paths["json"].write_text(text + "\n")
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["plot"])
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    return paths


# -- command line ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.n is not None and args.n < 1:
        raise config.ConfigError("--n must be at least 1")
    modalities = tuple(m for m in MODALITIES if m in (args.modality or MODALITIES))
    plan = make_plan(args.n, args.quick, modalities)
    result = measure(plan, args.out)
    paths = write_reports(result, args.out, args.json)
    print(paths["markdown"].read_text())
    log(f"wrote {', '.join(str(p) for p in paths.values())}" + (f" and {args.json}" if args.json else ""))
    return 0
