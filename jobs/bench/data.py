"""Synthetic inputs: raw-media Parquet datasets (photo-like JPEGs, spoken clips, sentences). Seeded: the same seed
gives the same bytes."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from encoders import audio

from ..samples import SAMPLE_DIR
from .plan import CLIP_SECONDS, FILE_ROWS, IMAGE_SIZES, MODALITIES, ROW_GROUP, WORDS

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
    import soundfile as sf  # not at the top: the GPU check imports this module where no decoder is installed

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
