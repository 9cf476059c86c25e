"""SigLIP and OpenCLIP checkpoints, laid out as their releases are, converted with `mmembed models convert`, encoded by
`mmembed encode`, embedded by `mmembed embed`, and searched by `query`, `classify` (each model's own score) and SQL:
every figure equal to the encoder run directly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from encoders.registry import load_encoder
from encoders.validate import open_clip_modules
from jobs.cli import main
from tests.releases import hf_siglip, model_cfg, save_release, train_spiece, write_openclip

SAMPLES = Path(__file__).parents[2] / "jobs" / "sample_media"
SHAPES = ["red_circle_0.png", "red_circle_1.png", "blue_square_0.png", "green_star_0.png"]
LABELS = ["a red circle", "a blue square", "a green star"]
OPENAI_NORM = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    media = tmp_path_factory.mktemp("media")
    for name in SHAPES:
        shutil.copy(SAMPLES / "shapes" / name, media / name)
    (media / "caption.txt").write_text("a red circle on a grey background")
    return media


@pytest.fixture(scope="module", params=["siglip", "openclip"])
def model(request, tmp_path_factory) -> str:
    """A random SigLIP or OpenCLIP release, converted through the CLI into the model home."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "siglip":
        spm = train_spiece(tmp)
        from encoders import spiece

        release = save_release(hf_siglip(len(spiece.read(spm).pieces)), tmp / "release", spm)
    else:
        release = tmp / "release"
        write_openclip(open_clip_modules(), release, model_cfg(), OPENAI_NORM)
    name = f"tiny-{request.param}"
    assert main(["models", "convert", str(release), name]) == 0
    return name


@pytest.fixture(scope="module")
def store(model, media, tmp_path_factory, ray_session) -> Path:
    root = tmp_path_factory.mktemp("store") / "store"
    assert main(["embed", str(media), str(root), "--model", f"image={model}", "--model", f"text={model}"]) == 0
    return root


def test_encode_gives_the_encoder_s_vectors(model, media, capsys):
    capsys.readouterr()
    assert main(["encode", model, str(media / SHAPES[0]), "--text", LABELS[0], "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    encoder = load_encoder(model)
    assert np.allclose(rows[0]["embedding"], encoder.encode("image", [(media / SHAPES[0]).read_bytes()])[0], atol=1e-6)
    assert np.allclose(rows[1]["embedding"], encoder.encode("text", [LABELS[0]])[0], atol=1e-6)


def test_query_ranks_as_the_encoder_does(model, media, store, capsys):
    encoder = load_encoder(model)
    images = encoder.encode("image", [(media / n).read_bytes() for n in SHAPES])
    scores = images @ encoder.encode("text", [LABELS[0]])[0]
    capsys.readouterr()
    assert main(["query", str(store), "--text", LABELS[0], "--modality", "image", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in got] == [SHAPES[i] for i in np.argsort(-scores)] and {r["model"] for r in got} == {model}
    assert np.allclose([r["score"] for r in got], np.sort(scores)[::-1], atol=1e-5)


def test_classify_uses_the_model_s_own_score(model, media, store, capsys):
    encoder = load_encoder(model)
    cos = encoder.encode("image", [(media / n).read_bytes() for n in SHAPES]) @ encoder.encode("text", LABELS).T
    scale = float(encoder.stored.tensors["logit_scale"].float().exp())
    if model == "tiny-siglip":  # a sigmoid per label
        p = 1 / (1 + np.exp(-(scale * cos + float(encoder.stored.tensors["logit_bias"].float()))))
    else:  # a softmax over the labels
        p = np.exp(scale * cos - (scale * cos).max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    capsys.readouterr()
    assert main(["classify", str(store), "--labels", ",".join(LABELS), "--json"]) == 0
    got = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    for name, c, row in zip(SHAPES, cos, p):
        assert got[name]["label"] == LABELS[row.argmax()]
        assert abs(got[name]["probability"] - row.max()) < 1e-4 and abs(got[name]["cosine"] - c.max()) < 1e-5


def test_sql_embed_text_against_the_model_s_images(model, media, store, capsys):
    encoder = load_encoder(model)
    want = encoder.encode("image", [(media / SHAPES[2]).read_bytes()])[0] @ encoder.encode("text", [LABELS[1]])[0]
    sql = (f"SELECT array_cosine_similarity(embedding, embed_text('{model}', '{LABELS[1]}')) AS s FROM images "
           f"WHERE model = '{model}' AND id = '{SHAPES[2]}'")  # fmt: skip
    capsys.readouterr()
    assert main(["sql", str(store), sql, "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)[0]["s"] - want) < 1e-5
