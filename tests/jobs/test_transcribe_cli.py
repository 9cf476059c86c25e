"""`mmembed transcribe`: what the bundled tiny.en hears in the sample speech, one JSON line per file, a bad file its
own error line, and a model without a decoder refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.cli import main

SPEECH = Path(__file__).parents[2] / "jobs" / "sample_media" / "speech"


def test_transcribe_prints_each_file_s_text_and_segments(tmp_path, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really")
    files = [SPEECH / "train_us.flac", SPEECH / "moon_gb-female.flac", bad]
    assert main(["transcribe", "whisper-tiny.en", *map(str, files), "--timestamps", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == [str(f) for f in files]
    train, moon, broken = rows
    assert train["text"].startswith("The next train to the city leaves at")  # espeak-ng said "... at nine o'clock."
    assert moon["text"].lower().endswith("tonight.")  # "The full moon is bright tonight.": tiny.en hears "fall"
    for row in (train, moon):
        assert row["segments"] and row["segments"][0]["start"] == 0.0
        assert all(s["start"] < s["end"] <= 5.0 for s in row["segments"])
        assert "".join(s["text"] for s in row["segments"]).strip() == row["text"]
    assert "cannot decode audio" in broken["error"] and "text" not in broken


def test_a_model_without_a_decoder_cannot_transcribe(capsys):
    assert main(["transcribe", "minilm-l6", str(SPEECH / "train_us.flac")]) == 1
    assert (
        capsys.readouterr().err == "mmembed: error: model 'minilm-l6' cannot transcribe: it holds no Whisper decoder\n"
    )
