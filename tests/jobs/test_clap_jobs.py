"""CLAP in jobs and search: a converted CLAP embeds a directory's audio (and texts) through `mmembed embed`, and a
sentence finds the recordings in `query`, `classify` and SQL, each figure equal to the encoder run directly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from encoders.convert import convert
from encoders.registry import load_encoder, models_dir
from jobs.bench.clap import write_reference
from jobs.cli import main

FIXTURES = Path(__file__).parents[1] / "fixtures" / "audio"
SPEECH = Path(__file__).parents[2] / "jobs" / "sample_media" / "speech"
AUDIO = dict(
    spec_size=192, num_mel_bins=32, patch_size=6, patch_stride=[4, 4], window_size=5,
    patch_embeds_hidden_size=6, depths=[2, 2], num_attention_heads=[2, 3], hidden_size=12,
)  # fmt: skip
TEXT = dict(
    hidden_size=20, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, max_position_embeddings=40
)
FEATURES = dict(feature_size=32, frequency_min=50, frequency_max=14_000, truncation="rand_trunc")
LABELS = ["a dog barking", "rain on a window", "a man speaking"]


@pytest.fixture(scope="module")
def clap_store(tmp_path_factory, ray_session) -> tuple[Path, dict[str, bytes]]:
    """A tiny random CLAP converted as `tiny-clap`, and a store of 4 clips and 2 texts embedded with it."""
    tmp = tmp_path_factory.mktemp("clap-job")
    convert(write_reference(tmp / "hf", AUDIO, TEXT, FEATURES), models_dir() / "tiny-clap.parquet")
    media = tmp / "media"
    media.mkdir()
    for src in (
        FIXTURES / "fox_8k.wav",
        FIXTURES / "rain_44k_stereo.mp3",
        SPEECH / "cat_us.flac",
        SPEECH / "train_us.flac",
    ):
        shutil.copy(src, media / src.name)
    (media / "note.txt").write_text("a dog barking at night")
    (media / "other.txt").write_text("the train leaves at nine")
    root = tmp / "store"
    assert (
        main(["embed", str(media), str(root), "--model", "audio=tiny-clap", "--model", "text=minilm-l6,tiny-clap"]) == 0
    )
    return root, {p.name: p.read_bytes() for p in media.glob("*") if p.suffix != ".txt"}


def test_the_job_embeds_audio_and_text_with_clap(clap_store, capsys):
    root, _ = clap_store
    capsys.readouterr()
    assert (
        main(
            [
                "sql",
                str(root),
                "SELECT modality, model, count(*) AS n FROM embeddings GROUP BY ALL ORDER BY ALL",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [
        {"modality": "audio", "model": "tiny-clap", "n": 4},
        {"modality": "text", "model": "minilm-l6", "n": 2},
        {"modality": "text", "model": "tiny-clap", "n": 2},
    ]


def test_a_sentence_finds_recordings_as_the_encoder_ranks_them(clap_store, capsys):
    root, clips = clap_store
    encoder = load_encoder("tiny-clap")
    names = sorted(clips)
    audio = encoder.encode("audio", [clips[n] for n in names])
    query = encoder.encode("text", ["a dog barking"])[0]
    want = sorted(zip(names, audio @ query), key=lambda x: -x[1])
    capsys.readouterr()
    assert main(["query", str(root), "--text", "a dog barking", "--modality", "audio", "--json", "-k", "4"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in got] == [n for n, _ in want] and {r["model"] for r in got} == {"tiny-clap"}
    assert np.allclose([r["score"] for r in got], [s for _, s in want], atol=1e-5)


def test_sound_labels_classify_by_clap_s_own_score(clap_store, capsys):
    root, clips = clap_store
    encoder = load_encoder("tiny-clap")
    names = sorted(clips)
    logits = encoder.logit_scale * encoder.encode("audio", [clips[n] for n in names]) @ encoder.encode("text", LABELS).T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    capsys.readouterr()
    assert main(["classify", str(root), "--labels", ",".join(LABELS), "--modality", "audio", "--json"]) == 0
    got = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    for name, row in zip(names, p):
        assert got[name]["label"] == LABELS[row.argmax()] and abs(got[name]["probability"] - row.max()) < 1e-4


def test_sql_embed_text_scores_audio_with_clap(clap_store, capsys):
    root, clips = clap_store
    encoder = load_encoder("tiny-clap")
    want = encoder.encode("audio", [clips["fox_8k.wav"]])[0] @ encoder.encode("text", ["rain on a window"])[0]
    sql = ("SELECT array_cosine_similarity(embedding, embed_text('tiny-clap', 'rain on a window')) AS s "
           "FROM audio WHERE model = 'tiny-clap' AND id = 'fox_8k.wav'")  # fmt: skip
    capsys.readouterr()
    assert main(["sql", str(root), sql, "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)[0]["s"] - want) < 1e-5
