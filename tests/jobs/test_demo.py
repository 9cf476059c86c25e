"""`mmembed demo` end to end: the bundled sample set through the real pipeline, and what it finds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image

from jobs import demo, samples
from jobs.shapes import render as shapes


@pytest.fixture(scope="module")
def result(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run_demo(out)


def test_every_sample_is_embedded_by_every_model_of_its_modality(result):
    _, got = result
    files = {m: sum(1 for p in (demo.SAMPLES / d).iterdir()) for m, d in (("audio", "speech"), ("text", "texts"))}
    files["image"] = sum(1 for d in ("shapes", "photos") for _ in (demo.SAMPLES / d).iterdir())
    counts = got["record"]["counts"]
    assert set(counts) == {"image/shapes-clip", "audio/whisper-tiny.en", "text/minilm-l6", "text/shapes-clip"}
    for c in counts.values():
        assert (c["read"], c["embedded"], c["errored"]) == (files[c["modality"]], files[c["modality"]], 0), c


def test_text_to_image_finds_what_the_text_says(result):
    _, got = result
    for query, colour_shape in (
        ("a red circle", "red_circle"),
        ("a green star", "green_star"),
        ("a yellow triangle", "yellow_triangle"),
    ):
        hits = [Path(h["id"]).stem for h in got["text_to_image"][query]]
        assert all(h.startswith(colour_shape) for h in hits), (query, hits)
    # a caption naming size and place too: the sample that fits it all comes first or second, among blue shapes
    fits = [
        f"blue_square_{n}"
        for n, scene in enumerate(sample_scenes("blue", "square"))
        if (scene.size, scene.position) == ("small", "top left")
    ]
    hits = [Path(h["id"]).stem for h in got["text_to_image"]["a small blue square in the top left"]]
    assert fits and fits[0] in hits[:2] and all(h.startswith("blue_") for h in hits), hits


def sample_scenes(colour: str, shape: str) -> list:
    """The scenes jobs/samples.py rendered for one class, in file-number order."""
    rng = random.Random(samples.SHAPES_SEED)
    drawn = [(c, s, shapes.sample_scene(rng, c, s)) for c, s in shapes.CLASSES for _ in range(samples.SHAPES_PER_CLASS)]
    return [scene for c, s, scene in drawn if (c, s) == (colour, shape)]


def test_zero_shot_labels_match_the_file_names_as_the_readme_says(result):
    """README, The demo: "how many labels match the file names (237 of 240 on the committed model)"."""
    _, got = result
    assert (got["classify"]["correct"], len(got["classify"]["rows"])) == (237, 240)


def test_each_repeated_sentence_finds_itself_in_another_voice_as_the_readme_says(result):
    """README, The demo: "the nearest other clip was that sentence in another voice, 18 of 18"."""
    _, got = result
    assert (got["voices"]["hits"], got["voices"]["clips"]) == (18, 18)


def test_contact_sheet_shows_every_query(result):
    out, _ = result
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.height >= len(demo.TEXT_TO_IMAGE) * demo.THUMB and sheet.width >= 5 * demo.THUMB
