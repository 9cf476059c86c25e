"""Backfill: a new model over every input the store has recorded."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.cli import main
from storage.query import connect, run_readonly


def test_backfill_embeds_recorded_inputs_with_a_new_model(tmp_path, ray_session, tiny_clip_model, capsys):
    folder, gone, root = tmp_path / "a", tmp_path / "b", tmp_path / "store"
    for d in (folder, gone):
        d.mkdir()
    for i in range(3):
        (folder / f"a{i}.txt").write_text(f"text {i} in folder a")
    (gone / "b0.txt").write_text("a folder that will disappear")
    pq.write_table(
        pa.table({"id": ["p0.txt", "p1.txt"], "text": ["parquet one", "parquet two"]}), tmp_path / "raw.parquet"
    )
    for source in (folder, gone, tmp_path / "raw.parquet"):
        assert main(["embed", str(source), str(root), "--model", "text=minilm-l6"]) == 0
    (folder / "a9.txt").write_text("added after the first run: embedded by the backfill too")
    shutil.rmtree(gone)
    capsys.readouterr()

    assert main(["backfill", str(root), "--model", tiny_clip_model, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kind"] == "backfill" and record["status"] == "succeeded"
    assert [m["input"] for m in record["missing_inputs"]] == [str(gone)]
    assert record["counts"][f"text/{tiny_clip_model}"]["embedded"] == 6
    rows = run_readonly(
        connect(str(root)), "SELECT model, count(*) AS n FROM texts GROUP BY model ORDER BY model"
    ).to_pylist()
    assert rows == [{"model": "minilm-l6", "n": 6}, {"model": tiny_clip_model, "n": 6}]

    assert main(["backfill", str(root), "--model", tiny_clip_model, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["counts"][f"text/{tiny_clip_model}"]
    assert (again["embedded"], again["already_done"]) == (0, 6)
