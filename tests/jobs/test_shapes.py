"""The synthetic shapes, and shapes-clip: the committed demo CLIP trained on them."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer

from encoders import image, registry
from encoders.clip import HF_LEGACY_EOS_ID, hf_config, pool_eos
from encoders.text import TextTokenizer
from jobs import samples
from jobs.shapes import render as shapes
from jobs.shapes.train import EVAL_SEED, PREPROCESS, RETRIEVAL_SEED, TRAIN_SEED, batch, contrastive_loss

TEST_SEED = 31_337
assert TEST_SEED not in (TRAIN_SEED, EVAL_SEED, RETRIEVAL_SEED, samples.SHAPES_SEED)


@pytest.fixture(scope="module")
def shapes_clip():
    return registry.load_encoder("shapes-clip")


def pngs(scenes: list[shapes.Scene]) -> list[bytes]:
    return [shapes.to_png(shapes.render(s)) for s in scenes]


# --- renderer and captions ---------------------------------------------------------------


def test_rendering_is_deterministic_per_seed():
    assert shapes.scenes(5, 30) == shapes.scenes(5, 30)
    assert pngs(shapes.scenes(5, 30)) == pngs(shapes.scenes(5, 30))
    assert pngs(shapes.scenes(5, 30)) != pngs(shapes.scenes(6, 30))


def test_scenes_draw_what_they_name():
    assert len(shapes.CLASSES) >= 40
    for scene in shapes.scenes(3, 300):
        img = shapes.render(scene)
        assert img.size == (64, 64) and img.mode == "RGB"
        assert math.dist(shapes.COLOURS[scene.colour], shapes.BACKGROUNDS[scene.background]) >= shapes.MIN_CONTRAST
        # every shape covers its centre; the image corner farthest from it is background
        assert img.getpixel((int(scene.cx), int(scene.cy))) == scene.rgb
        corner = (0 if scene.cx > 32 else 63, 0 if scene.cy > 32 else 63)
        assert img.getpixel(corner) == scene.background_rgb
        fx, fy = shapes.POSITIONS[scene.position]
        assert abs(scene.cx - 64 * fx) <= shapes.POSITION_JITTER and abs(scene.cy - 64 * fy) <= shapes.POSITION_JITTER
        assert shapes.SIZES[scene.size][0] <= scene.radius <= shapes.SIZES[scene.size][1]


def shape_pixels(scene: shapes.Scene) -> np.ndarray:
    """(64, 64) bool: the pixels drawn in the shape's colour."""
    return np.abs(np.asarray(shapes.render(scene), dtype=int) - scene.rgb).max(-1) < 30


def test_sizes_and_positions_are_told_apart_by_pixels():
    rng = random.Random(TEST_SEED)
    small, large = (shapes.sample_scene(rng, "red", "circle", size, "center") for size in ("small", "large"))
    assert shape_pixels(large).sum() > 2 * shape_pixels(small).sum()
    left, right = (shapes.sample_scene(rng, "blue", "square", "large", where) for where in ("left", "right"))
    assert np.nonzero(shape_pixels(left).any(0))[0].max() < 40 < np.nonzero(shape_pixels(right).any(0))[0].min() + 16


def test_captions_state_their_scene_and_tokenise_without_unknowns():
    tokenizer = Tokenizer.from_str(shapes.build_tokenizer())
    unk = tokenizer.token_to_id(shapes.UNK)
    rng = random.Random(TEST_SEED)
    for scene in shapes.scenes(TEST_SEED, 200):
        for template in shapes.TEMPLATES:
            text = shapes.fill(template, scene, rng)
            assert scene.colour in text.split() and scene.shape in text.split()
            assert unk not in tokenizer.encode(text).ids, text
    orange = dataclasses.replace(scene, colour="orange", size="small")
    assert shapes.fill("a {colour} {shape}", orange).startswith("an orange ")
    assert shapes.fill("a {size} {colour} {shape}", orange).startswith("a small orange ")
    assert shapes.mentioned("a {size} {colour} {shape} {where}") == ("colour", "shape", "size", "position")


def test_tokenizer_wraps_in_start_and_end_with_end_highest_and_not_2():
    tokenizer = Tokenizer.from_str(shapes.build_tokenizer())
    eos = tokenizer.token_to_id(shapes.EOS)
    assert eos == tokenizer.get_vocab_size() - 1 and eos != HF_LEGACY_EOS_ID
    ids = tokenizer.encode("A red circle, in the TOP left.").ids
    assert ids[0] == tokenizer.token_to_id(shapes.BOS) and ids[-1] == eos and ids.count(eos) == 1
    assert tokenizer.decode(ids) == "a red circle , in the top left ."
    assert tokenizer.encode("a zebra").ids[2] == tokenizer.token_to_id(shapes.UNK)
    # the end token is the highest id in every row, so legacy (argmax) pooling would pick it too
    ids, _ = TextTokenizer(shapes.build_tokenizer(), 32)(
        ["a red circle", "a small blue square in the top left corner", "x"]
    )
    ids = torch.from_numpy(ids)
    x = torch.randn(*ids.shape, 8)
    first_eos = pool_eos(x, ids, eos, legacy=False)
    torch.testing.assert_close(first_eos, pool_eos(x, ids, eos, legacy=True))
    torch.testing.assert_close(first_eos[0], x[0, 4])


# --- training pieces -------------------------------------------------------------------


def test_training_batch_positives_are_the_images_fitting_each_caption():
    tokenizer = TextTokenizer(shapes.build_tokenizer(), 32)
    pixels, ids, mask, positives = batch(random.Random(TEST_SEED), 64, tokenizer)
    assert pixels.shape == (64, 3, 64, 64) and ids.shape == mask.shape and positives.shape == (64, 64)
    assert positives.diagonal().all()
    assert positives.sum() > 64  # a bare "a red circle" fits other red circles in the batch
    assert not positives.all()


def test_contrastive_loss_with_one_positive_each_is_clips():
    logits = torch.randn(6, 6)
    labels = torch.arange(6)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(contrastive_loss(logits, torch.eye(6, dtype=torch.bool)), clip)
    both = torch.eye(6, dtype=torch.bool) | torch.eye(6, dtype=torch.bool).roll(1, 1)
    assert contrastive_loss(logits, both) != clip


# --- the committed model -----------------------------------------------------------------


def test_committed_model_uses_this_tokenizer_and_preprocessing(shapes_clip):
    assert shapes_clip.inputs.settings == PREPROCESS
    assert json.loads(shapes_clip.stored.tokenizer) == json.loads(shapes.build_tokenizer())
    dims = shapes_clip.dims
    assert (dims.image_size, dims.vocab_size) == (64, Tokenizer.from_str(shapes.build_tokenizer()).get_vocab_size())
    assert dims.eos_token_id != HF_LEGACY_EOS_ID and not dims.legacy_eos_pooling
    assert hf_config(dims)["text_config"]["eos_token_id"] == dims.eos_token_id


def test_inference_pixels_are_the_training_pixels(shapes_clip):
    for scene in shapes.scenes(TEST_SEED, 20):
        img = shapes.render(scene)
        trained_on = image.preprocess(img, **PREPROCESS)
        np.testing.assert_array_equal(shapes_clip.preprocess("image", shapes.to_png(img)), trained_on)


def test_padding_does_not_move_the_pooled_token(shapes_clip):
    ids, mask = shapes_clip.tokenizer(["a red circle", "a small blue square in the top left corner"])
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.inference_mode():
        together = shapes_clip.model.encode_text(ids, mask)
        alone = shapes_clip.model.encode_text(ids[:1, : int(mask[0].sum())], mask[:1, : int(mask[0].sum())])
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-5)


def test_each_held_out_caption_picks_its_own_image(shapes_clip):
    """Batches of one image per colour x shape class (a caption names at least those), seed unseen in training."""
    rng = random.Random(TEST_SEED)
    hits = []
    for _ in range(2):
        scenes = [shapes.sample_scene(rng, c, s) for c, s in shapes.CLASSES]
        rng.shuffle(scenes)
        captions = [shapes.random_caption(s, rng) for s in scenes]
        sims = shapes_clip.encode("text", captions) @ shapes_clip.encode("image", pngs(scenes)).T
        hits += list(sims.argmax(1) == np.arange(len(scenes)))
    assert np.mean(hits) >= 0.95, f"{np.mean(hits):.3f} of captions pick their own image"


def test_sample_media_shapes_are_rendered_and_recognised(shapes_clip, tmp_path):
    committed = sorted((samples.SAMPLE_DIR / "shapes").glob("*.png"))
    samples.write_shapes(tmp_path)
    assert [p.name for p in committed] == sorted(p.name for p in tmp_path.iterdir())
    for p in committed[::20]:
        np.testing.assert_array_equal(
            np.asarray(Image.open(p)), np.asarray(Image.open(io.BytesIO((tmp_path / p.name).read_bytes())))
        )
    labels = [tuple(p.stem.split("_")[:2]) for p in committed]
    prompts = shapes_clip.encode("text", [f"a {c} {s}" for c, s in shapes.CLASSES])
    predicted = (shapes_clip.encode("image", [p.read_bytes() for p in committed]) @ prompts.T).argmax(1)
    accuracy = np.mean([shapes.CLASSES[k] == label for k, label in zip(predicted, labels)])
    assert accuracy >= 0.95, f"zero-shot accuracy on jobs/sample_media/shapes: {accuracy:.3f}"
