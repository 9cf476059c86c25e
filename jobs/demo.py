"""`mmembed demo`: the bundled sample set through the real pipeline, then a few queries.

Embeds jobs/sample_media/ with the bundled models into DIR/store, prints text->image,
zero-shot classification, image->image, audio->audio and text->text results and one SQL
example as tables, with the figures a reader can check (labels matching the file names; clips
whose nearest neighbour is the same sentence in another voice), and draws the text->image
results as a contact sheet (DIR/contact_sheet.png).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from . import api, config, output
from .samples import SAMPLE_DIR as SAMPLES
from .shapes import render as shapes

TEXT_TO_IMAGE = ("a red circle", "a small blue square in the top left", "a green star", "a yellow triangle")
SQL = """SELECT id, round(array_cosine_similarity(embedding, embed_text('shapes-clip', 'a purple heart')), 4) AS score
FROM images WHERE model = 'shapes-clip' ORDER BY score DESC LIMIT 3"""
THUMB = 96


def _title(text: str) -> None:
    print(f"\n== {text}")


def _search(root: str, modality: str, model: str, query_modality: str, value: str, k: int = 5) -> list[dict]:
    return api.search(root, query_modality, value, modality, model, k=k)[1].to_pylist()


def _classify_shapes(root: str) -> dict:
    """Every sample shape labelled zero-shot; a label is right when it names the file's colour and shape."""
    labels = [f"a {colour} {shape}" for colour, shape in shapes.CLASSES]
    rows = api.classify(root, labels, "image", "shapes-clip", where="id LIKE 'shapes/%'")[0].to_pylist()
    return {
        "rows": rows,
        "correct": sum(r["label"] == "a {} {}".format(*Path(r["id"]).stem.split("_")[:2]) for r in rows),
    }


def _same_sentence_other_voice(root: str) -> dict:
    """For each clip of a sentence several voices speak: is its nearest other clip that sentence?"""
    clips = sorted((SAMPLES / "speech").glob("*.flac"))
    sentence = {f"speech/{c.name}": c.stem.rsplit("_", 1)[0] for c in clips}
    repeated = [c for c in clips if sum(s == sentence[f"speech/{c.name}"] for s in sentence.values()) > 1]
    hits = 0
    for clip in repeated:
        own = f"speech/{clip.name}"
        nearest = next(h for h in _search(root, "audio", "whisper-tiny.en", "audio", str(clip), k=2) if h["id"] != own)
        hits += sentence[nearest["id"]] == sentence[own]
    return {"clips": len(repeated), "hits": hits}


def contact_sheet(results: dict[str, list[dict]], dest: Path) -> Path:
    """One row per query: the query text, then the top-k thumbnails with their scores."""
    k = max(len(r) for r in results.values())
    label_h, pad = 18, 6
    sheet = Image.new("RGB", (pad + k * (THUMB + pad), len(results) * (label_h + THUMB + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for query, hits in results.items():
        draw.text((pad, y), f'"{query}"', fill="black")
        for i, hit in enumerate(hits):
            x = pad + i * (THUMB + pad)
            with Image.open(hit["uri"]) as im:
                thumb = im.convert("RGB")
                thumb.thumbnail((THUMB, THUMB))
            sheet.paste(thumb, (x, y + label_h))
            draw.text((x, y + label_h + THUMB + 2), f"{hit['score']:.3f} {Path(hit['id']).stem[:14]}", fill="black")
        y += label_h + THUMB + label_h + pad
    sheet.save(dest)
    return dest


def run_demo(out: Path) -> dict:
    store_dir = out / "store"
    if store_dir.exists():
        shutil.rmtree(store_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"embedding the sample set ({SAMPLES}) into {store_dir} ...", file=sys.stderr)
    record = api.run_job(config.load(overrides={"input": str(SAMPLES), "root": str(store_dir)}))
    root = str(store_dir)
    _title("the job")
    output.table(
        [
            {"modality/model": k, **{c: v[c] for c in ("read", "embedded", "errored")}}
            for k, v in record["counts"].items()
        ]
    )

    sheet = {}
    for text in TEXT_TO_IMAGE:
        _title(f'text -> image (shapes-clip): "{text}"')
        sheet[text] = _search(root, "image", "shapes-clip", "text", text)
        output.table(sheet[text], ["score", "id"])
    _title("zero-shot classification of shapes/ against the 48 colour x shape labels (shapes-clip)")
    labelled = _classify_shapes(root)
    output.table(labelled["rows"][::40], ["id", "label", "probability"])
    print(f"labels matching the file name: {labelled['correct']}/{len(labelled['rows'])}")
    probe = SAMPLES / "shapes" / "red_circle_0.png"
    _title(f"image -> image (shapes-clip): {probe.relative_to(SAMPLES)}")
    output.table(_search(root, "image", "shapes-clip", "image", str(probe)), ["score", "id"])
    voice = SAMPLES / "speech" / "rocket_us.flac"
    _title(f"audio -> audio (whisper-tiny.en, mean-pooled encoder states): {voice.relative_to(SAMPLES)}")
    output.table(_search(root, "audio", "whisper-tiny.en", "audio", str(voice)), ["score", "id"])
    voices = _same_sentence_other_voice(root)
    print(f"clips whose best other clip is the same sentence in another voice: {voices['hits']}/{voices['clips']}")
    _title('text -> text (minilm-l6): "a cat with orange fur"')
    output.table(_search(root, "text", "minilm-l6", "text", "a cat with orange fur"), ["score", "id"])
    _title("SQL: " + " ".join(SQL.split()))
    output.table(api.sql(root, SQL).to_pylist())
    path = contact_sheet(sheet, out / "contact_sheet.png")
    print(f"\ncontact sheet of the text -> image results: {path}", file=sys.stderr)
    print(f'try: mmembed query {root} --text "a blue star" --modality image --model shapes-clip -k 5', file=sys.stderr)
    print(f"search page: mmembed serve {root}   then open http://127.0.0.1:8088/", file=sys.stderr)
    return {"record": record, "text_to_image": sheet, "classify": labelled, "voices": voices}
