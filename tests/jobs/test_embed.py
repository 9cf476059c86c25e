"""End to end: `mmembed embed` over a generated directory with good and broken media of every
kind, then the store checked row by row against the encoders run directly."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from encoders.registry import load_encoder
from jobs.cli import main
from storage.query import connect, run_readonly
from storage.store import Store

FIXTURES = Path(__file__).parents[1] / "fixtures"
GOOD = {"image": 6, "audio": 3, "text": 4}
BAD = {"image": 3, "audio": 2, "text": 2}
CLIP = "tiny-clip"  # the tiny random CLIP of tests/conftest.py; any CLIP exercises the pipeline


def _photo(name: str, size: int) -> bytes:
    from skimage import data

    image = Image.fromarray(getattr(data, name)())
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if image.mode == "RGB" else "PNG")
    return buf.getvalue()


def make_media(root: Path) -> Path:
    (root / "photos").mkdir(parents=True)
    (root / "sounds").mkdir()
    (root / "notes" / "deep").mkdir(parents=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        (root / "photos" / f"{name}.jpg").write_bytes(_photo(name, 160))
    (root / "photos" / "camera.PNG").write_bytes(_photo("camera", 128))  # grayscale, upper-case extension
    Image.new("RGBA", (50, 30), (255, 0, 0, 128)).save(root / "photos" / "red.webp")
    for src in ("fox_8k.wav", "numbers_22k.ogg", "stella_44k_stereo.flac"):
        shutil.copy(FIXTURES / "audio" / src, root / "sounds" / src)
    texts = [
        "a red circle",
        "the quick brown fox jumps over the lazy dog",
        "numbers one two three",
        "ein Bild einer Katze",
    ]
    for i, t in enumerate(texts):
        (root / "notes" / ("deep" if i % 2 else "") / f"t{i}.txt").write_text(t)
    # broken inputs, one reason each
    (root / "photos" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (root / "photos" / "truncated.png").write_bytes(_photo("camera", 64)[:100])
    (root / "photos" / "empty.gif").write_bytes(b"")
    (root / "sounds" / "empty.wav").write_bytes(b"")
    (root / "sounds" / "noise.mp3").write_bytes(b"\x00\x01not audio" * 10)
    (root / "notes" / "blank.txt").write_text("   \n")
    (root / "notes" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "README.md").write_text("skipped: not a media file")
    (root / "photos" / "thumbs.db").write_bytes(b"skipped")
    return root


@pytest.fixture(scope="module")
def job(tmp_path_factory, ray_session, tiny_clip_model):
    media = make_media(tmp_path_factory.mktemp("media"))
    root = tmp_path_factory.mktemp("store")
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(
                [
                    "embed",
                    str(media),
                    str(root),
                    "--model",
                    f"image={CLIP}",
                    "--model",
                    f"text=minilm-l6,{CLIP}",
                    "--json",
                ]
            )
            == 0
        )
    return media, root, json.loads(out.getvalue())


def test_counts_per_modality_and_model(job):
    _, _, record = job
    assert record["status"] == "succeeded"
    assert record["skipped_files"] == 2
    expected_models = {"image": [CLIP], "audio": ["whisper-tiny.en"], "text": ["minilm-l6", CLIP]}
    keys = {f"{m}/{name}" for m, names in expected_models.items() for name in names}
    assert set(record["counts"]) == keys
    for key, c in record["counts"].items():
        modality = c["modality"]
        assert (c["read"], c["embedded"], c["errored"]) == (
            GOOD[modality] + BAD[modality],
            GOOD[modality],
            BAD[modality],
        ), key
    assert record["nodes"], "the job record names the Ray nodes that did the work"


def test_every_broken_file_has_an_error_row(job):
    _, root, _ = job
    con = connect(str(root))
    rows = run_readonly(con, "SELECT id, model, stage, error_type, message FROM errors ORDER BY id, model").to_pylist()
    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
        assert r["message"], r
        assert r["stage"] in ("read", "preprocess", "encode")
    assert set(by_id) == {
        "photos/garbage.jpg",
        "photos/truncated.png",
        "photos/empty.gif",
        "sounds/empty.wav",
        "sounds/noise.mp3",
        "notes/blank.txt",
        "notes/latin1.txt",
    }
    assert [r["model"] for r in by_id["notes/blank.txt"]] == ["minilm-l6", CLIP]
    assert by_id["photos/garbage.jpg"][0]["error_type"] == "ImageValidationError"
    assert by_id["sounds/empty.wav"][0]["error_type"] == "AudioValidationError"
    assert by_id["notes/blank.txt"][0]["error_type"] == "TextValidationError"


@pytest.mark.parametrize(
    "modality,model", [("image", CLIP), ("audio", "whisper-tiny.en"), ("text", "minilm-l6"), ("text", CLIP)]
)
def test_embeddings_equal_the_encoder_run_directly(job, modality, model):
    media, root, _ = job
    con = connect(str(root))
    view = {"image": "images", "audio": "audio", "text": "texts"}[modality]
    # a view holding models of several dims pads the narrower vectors with zeros: slice them back
    rows = run_readonly(
        con,
        f"SELECT id, uri, content_hash, embedding[1:dim] AS embedding FROM {view} WHERE model = ? ORDER BY id",
        [model],
    ).to_pylist()
    assert len(rows) == GOOD[modality]
    encoder = load_encoder(model)
    raws = [(media / r["id"]).read_bytes() for r in rows]
    direct = encoder.encode(modality, raws)
    stored = np.array([r["embedding"] for r in rows], dtype=np.float32)
    cos = (direct * stored).sum(1) / np.linalg.norm(direct, axis=1) / np.linalg.norm(stored, axis=1)
    assert cos.min() >= 0.9999, (rows, cos)
    assert np.allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-5)
    for r, raw in zip(rows, raws):
        import hashlib

        assert r["content_hash"] == hashlib.sha256(raw).hexdigest()
        assert r["uri"] == str(media / r["id"])


def stored_images(root: Path) -> dict[str, np.ndarray]:
    con = connect(str(root))
    rows = run_readonly(con, "SELECT id, embedding[1:dim] AS embedding FROM images WHERE model = ?", [CLIP]).to_pylist()
    return {r["id"]: np.array(r["embedding"], dtype=np.float32) for r in rows}


def brute_force(stored: dict[str, np.ndarray], q: np.ndarray, k: int) -> tuple[list[str], list[float]]:
    """The top k by cosine, in numpy over the stored vectors: what `query` and SQL must return."""
    scores = {i: float(v @ q / np.linalg.norm(v) / np.linalg.norm(q)) for i, v in stored.items()}
    top = sorted(scores, key=scores.get, reverse=True)[:k]
    return top, [scores[i] for i in top]


def test_query_and_sql_topk_match_brute_force(job, capsys, tmp_path):
    """A query image that is not in the store (a self-match at score 1 would pass whatever the ranking did) and a
    text query through SQL's embed_text, each against numpy over the stored vectors and the encoder run directly."""
    _, root, _ = job
    query = tmp_path / "moon.png"
    query.write_bytes(_photo("moon", 96))
    stored, encoder = stored_images(root), load_encoder(CLIP)
    capsys.readouterr()
    assert main(["query", str(root), "--image", str(query), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    ids, scores = brute_force(stored, encoder.encode("image", [query.read_bytes()])[0], 3)
    assert [h["id"] for h in hits] == ids and [h["modality"] for h in hits] == ["image"] * 3
    assert [h["score"] for h in hits] == pytest.approx(scores, abs=1e-5) and scores[0] < 0.9999, "not a self-match"

    sql = (
        f"SELECT id, array_cosine_similarity(embedding, embed_text('{CLIP}', 'a red circle')) AS score "
        f"FROM images WHERE model = '{CLIP}' ORDER BY score DESC LIMIT 4"
    )
    assert main(["sql", str(root), sql, "--json"]) == 0
    top = json.loads(capsys.readouterr().out)
    ids, scores = brute_force(stored, encoder.encode("text", ["a red circle"])[0], 4)
    assert [t["id"] for t in top] == ids
    assert [t["score"] for t in top] == pytest.approx(scores, abs=1e-5)


def test_classify_labels_every_image_by_the_clip_text_tower(job, capsys, tmp_path):
    _, root, _ = job
    labels = ["a red circle", "a photo of a cat", "an astronaut"]
    capsys.readouterr()
    assert (
        main(["classify", str(root), "--labels", ",".join(labels), "--json", "--out", str(tmp_path / "labels.parquet")])
        == 0
    )
    out = capsys.readouterr()
    got = json.loads(out.out)
    rows = run_readonly(
        connect(str(root)), "SELECT id, embedding[1:dim] AS embedding FROM images WHERE model = ? ORDER BY id", [CLIP]
    ).to_pylist()
    encoder = load_encoder(CLIP)
    logits = encoder.logit_scale * np.array([r["embedding"] for r in rows]) @ encoder.encode("text", labels).T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    by_id = {g["id"]: g for g in got}
    assert sorted(by_id) == [r["id"] for r in rows]
    assert [by_id[r["id"]]["label"] for r in rows] == [labels[i] for i in p.argmax(1)]
    assert [by_id[r["id"]]["probability"] for r in rows] == pytest.approx(p.max(1), abs=1e-5)
    assert pq.read_table(tmp_path / "labels.parquet").to_pylist() == got
    assert "a red circle: " in out.err

    assert main(["classify", str(root), "--labels", "just one"]) == 1
    assert main(["classify", str(root), "--labels", "a,b", "--modality", "audio"]) == 1
    assert "can encode a text query" in capsys.readouterr().err


def test_index_command_and_query_through_it(job, capsys, tmp_path):
    media, root, _ = job
    root = shutil.copytree(root, tmp_path / "store")  # the module's store stays unindexed
    capsys.readouterr()
    assert main(["index", str(root), "--modality", "image", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert [(b["modality"], b["model"], b["rows"], b["status"]) for b in built] == [
        ("image", CLIP, GOOD["image"], "built")
    ]
    query = ["query", str(root), "--image", str(media / "photos/coffee.jpg"), "-k", "3", "--json"]
    assert main(query) == 0
    out = capsys.readouterr()
    assert "searching the HNSW index of image/tiny-clip" in out.err
    hits = json.loads(out.out)
    assert main([*query, "--exact"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in hits] == [h["id"] for h in exact] and hits[0]["id"] == "photos/coffee.jpg"
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in exact], abs=1e-5)
    assert main(["index", str(root), "--json"]) == 0
    statuses = {(b["modality"], b["model"]): b["status"] for b in json.loads(capsys.readouterr().out)}
    assert statuses.pop(("image", CLIP)) == "fresh" and set(statuses.values()) == {"built"}, (
        "only the missing indexes are built"
    )
    with pytest.raises(SystemExit, match="2"):
        main(["index", str(root), "--m", "1"])  # vss's least; once a traceback from inside DuckDB
    assert "argument --m: must be at least 2, not 1" in capsys.readouterr().err


def test_rerun_jobs_listing(job, capsys):
    _, root, record = job
    capsys.readouterr()
    assert main(["jobs", str(root), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["job_id"] for r in records] == [record["job_id"]]


def test_parquet_input_with_passthrough_and_model_flags(tmp_path, ray_session, capsys):
    rows = [
        {"id": "a.txt", "text": "a red circle", "data": None, "lang": "en", "rank": 1},
        {"id": "b", "modality": "text", "text": "a blue square", "data": None, "lang": "en", "rank": 2},
        {"id": "c.txt", "text": "", "data": None, "lang": "de", "rank": 3},
    ]
    for r in rows:
        r.setdefault("modality", None)
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("modality", pa.string()),
                ("text", pa.string()),
                ("data", pa.binary()),
                ("lang", pa.string()),
                ("rank", pa.int64()),
            ]
        ),
    )
    pq.write_table(table, tmp_path / "raw.parquet")
    root = tmp_path / "store"
    assert (
        main(
            [
                "embed",
                str(tmp_path / "raw.parquet"),
                str(root),
                "--model",
                "text=minilm-l6",
                "--passthrough",
                "lang",
                "--passthrough",
                "rank",
                "--json",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert list(record["counts"]) == ["text/minilm-l6"]
    assert (record["counts"]["text/minilm-l6"]["embedded"], record["counts"]["text/minilm-l6"]["errored"]) == (2, 1)
    got = run_readonly(connect(str(root)), "SELECT id, lang, rank FROM texts ORDER BY id").to_pylist()
    assert got == [{"id": "a.txt", "lang": "en", "rank": 1}, {"id": "b", "lang": "en", "rank": 2}]
    assert main(["query", str(root), "--text", "a red circle", "--where", "lang = 'en' AND rank > 1", "--json"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)] == ["b"]
    where = ["--where", "lang = $lang AND rank > $rank", "--param", "lang=en", "--param", "rank=1"]
    assert main(["query", str(root), "--text", "a red circle", *where, "--json"]) == 0
    assert [h["id"] for h in json.loads(capsys.readouterr().out)] == ["b"]
    assert main(["query", str(root), "--text", "a red circle", "--where", "1=1) OR (1=1"]) == 1
    assert (
        capsys.readouterr().err
        == "mmembed: error: bad predicate '1=1) OR (1=1': a ')' closes nothing; give one expression\n"
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["embed", "/no/such/dir", "ROOT"], "does not exist"),
        (["embed", "MEDIA", "ROOT", "--model", "video=x"], "--model 'video=x'"),
        (["embed", "MEDIA", "ROOT", "--model", "image=no-such-model"], "unknown model 'no-such-model'"),
        (["query", "ROOT", "--text", "x", "--modality", "audio"], "no audio embeddings"),
        (["sql", "ROOT", "DROP TABLE x"], "only SELECT"),
        (["embed", "MEDIA", "FILE"], "FILE is a file, not a store"),  # was [Errno 17] File exists
        (["embed", "MEDIA", "FILE/store"], "FILE is a file"),  # was [Errno 20] Not a directory
        (["backfill", "FILE", "--model", "minilm-l6"], "FILE is a file, not a store"),
        (["query", "FILE", "--text", "x"], "FILE is a file, not a store"),
        (["sql", "FILE", "SELECT 1"], "FILE is a file, not a store"),
        (["jobs", "FILE"], "FILE is a file, not a store"),
        (["index", "FILE"], "FILE is a file, not a store"),
        (["embed", "MEDIA", "ROOT", "--device", "cuda"], "no GPU"),  # before any pipeline starts
        (["embed", "MEDIA", "ROOT", "--actors", "100000"], "too many for the cluster"),  # before any pipeline too
        (["embed", "MEDIA", "ROOT", "--format", "parquet"], "holds no Parquet files"),
        (["embed", "ROOT", "ROOT"], "is the store"),
    ],
)
def test_bad_commands_fail_with_one_line(tmp_path, ray_session, capsys, argv, message):
    media = tmp_path / "media"
    media.mkdir()
    (media / "x.png").write_bytes(_photo("camera", 32))
    (tmp_path / "file").write_text("not a store")
    names = {"MEDIA": media, "ROOT": tmp_path / "store", "FILE": tmp_path / "file"}
    argv = [str(names[a]) if a in names else a.replace("FILE", str(names["FILE"])) for a in argv]
    message = message.replace("FILE", str(names["FILE"]))
    (tmp_path / "store").mkdir()
    if "--device" in argv and ray.cluster_resources().get("GPU"):
        pytest.skip("the cluster has a GPU")
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    if "--device" in argv or "--actors" in argv:  # no pipeline ran: its counts are set when one starts
        assert [(j["status"], j["counts"]) for j in Store(str(tmp_path / "store")).jobs()] == [("failed", {})]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["embed", "MEDIA", "ROOT", "--batch-size", "0"], "argument --batch-size: must be at least 1, not 0"),
        (["embed", "MEDIA", "ROOT", "--actors", "-1"], "argument --actors: must be at least 1, not -1"),
        (["embed", "MEDIA", "ROOT", "--commit-every", "x"], "argument --commit-every: invalid integer: 'x'"),
        (["query", "ROOT", "--text", "x", "-k", "0"], "argument -k: must be at least 1, not 0"),
        (["query", "ROOT", "--text", "x", "--ef-search", "0"], "argument --ef-search: must be at least 1"),
        (["index", "ROOT", "--ef-construction", "0"], "argument --ef-construction: must be at least 1"),
        (["bench", "--n", "0"], "argument --n: must be at least 1, not 0"),
        (["sql", "ROOT", "SELECT $x", "--param", "x"], "argument --param: 'x': expected NAME=VALUE"),
    ],
)
def test_bad_numbers_are_refused_before_anything_runs(capsys, argv, message):
    """`--batch-size 0` once reached Ray and printed a traceback."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
