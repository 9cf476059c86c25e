"""The bundled sample media set that `mmembed demo` embeds: jobs/sample_media.

    python -m jobs.samples [--out DIR]

- shapes/<colour>_<shape>_<n>.png: 64x64 renders of every colour x shape class (jobs.shapes.render,
  with a seed neither training nor evaluation uses), for text->image retrieval with shapes-clip;
- photos/<name>.jpg: scikit-image's sample photos, downsized;
- speech/<sentence>_<voice>.flac: sentences spoken by several espeak-ng voices, 16 kHz mono;
  regenerated only where espeak-ng is installed (the committed clips stay otherwise);
- texts/<name>.txt: one text each: shape captions, and sentences about the photos and the speech.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from encoders import audio

from .shapes import render as shapes

SAMPLE_DIR = Path(__file__).parent / "sample_media"

SHAPES_SEED = 7_000  # not a seed jobs.shapes.train trains or evaluates on
SHAPES_PER_CLASS = 5

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "camera",
    "rocket",
    "coins",
    "moon",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
)
PHOTO_MAX_SIDE = 256
JPEG_QUALITY = 85

SENTENCES = {
    "astronaut": "An astronaut in a white space suit smiles for the camera.",
    "coffee": "A cup of hot coffee sits on a saucer.",
    "cat": "A ginger cat looks straight at me.",
    "rocket": "The rocket stands on the launch pad, ready to fly.",
    "shapes": "A red circle and a small blue square.",
    "weather": "It will rain tomorrow morning, so take an umbrella.",
    "moon": "The full moon is bright tonight.",
    "train": "The next train to the city leaves at nine o'clock.",
}
VOICES = {"us": "en-us", "gb-female": "en-gb+f3", "scottish": "en-gb-scotland"}
REPEATED = ("astronaut", "coffee", "cat", "rocket", "shapes", "weather")  # spoken by every voice
SPOKEN = [(s, v) for s in REPEATED for v in VOICES] + [("moon", "gb-female"), ("train", "us")]
SAMPLE_RATE = 16_000

CAPTIONS = (
    "a red circle",
    "a small blue square in the top left",
    "a picture of a green star",
    "a large yellow triangle in the center",
    "an orange heart",
    "a white cross on a dark grey background",
    "a purple star at the bottom",
    "a black square",
)
PHOTO_TEXTS = {
    "astronaut": "An astronaut in a space suit with the American flag behind her.",
    "coffee": "A cup of coffee on a saucer with a spoon.",
    "chelsea": "A ginger cat with green eyes.",
    "camera": "A cameraman with a camera on a tripod.",
    "rocket": "A rocket on the launch pad before take-off.",
    "coins": "Old coins on a flat surface.",
    "moon": "The surface of the moon with craters.",
}


def write_shapes(out: Path) -> int:
    rng = random.Random(SHAPES_SEED)
    for colour, shape in shapes.CLASSES:
        for n in range(SHAPES_PER_CLASS):
            scene = shapes.sample_scene(rng, colour, shape)
            (out / f"{colour}_{shape}_{n}.png").write_bytes(shapes.to_png(shapes.render(scene)))
    return len(shapes.CLASSES) * SHAPES_PER_CLASS


def write_photos(out: Path) -> int:
    from skimage import data

    for name in PHOTOS:
        img = Image.fromarray(getattr(data, name)())
        img.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.Resampling.LANCZOS)
        img.save(out / f"{name}.jpg", quality=JPEG_QUALITY)
    return len(PHOTOS)


def speak(text: str, voice: str) -> np.ndarray:
    """-> float32 mono samples at SAMPLE_RATE."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], check=True, capture_output=True).stdout
    return audio.decode(wav, SAMPLE_RATE)


def write_speech(out: Path) -> int:
    import soundfile as sf  # encoding, here only: the rest of this module runs where no audio library is installed

    for sentence, voice in SPOKEN:
        sf.write(
            out / f"{sentence}_{voice}.flac", speak(SENTENCES[sentence], VOICES[voice]), SAMPLE_RATE, subtype="PCM_16"
        )
    return len(SPOKEN)


def write_texts(out: Path) -> int:
    texts = {f"caption_{c.removeprefix('a ').removeprefix('an ').replace(' ', '_')}": c for c in CAPTIONS}
    texts |= {f"photo_{name}": t for name, t in PHOTO_TEXTS.items()}
    texts |= {f"speech_{sid}": t for sid, t in SENTENCES.items()}
    for name, text in texts.items():
        (out / f"{name}.txt").write_text(text + "\n")
    return len(texts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    for kind, write in (
        ("shapes", write_shapes),
        ("photos", write_photos),
        ("speech", write_speech),
        ("texts", write_texts),
    ):
        if kind == "speech" and shutil.which("espeak-ng") is None:
            print("espeak-ng not installed: speech/ left as it is", file=sys.stderr)
            continue
        out = args.out / kind
        out.mkdir(parents=True, exist_ok=True)
        print(f"{kind}: {write(out)} files in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
