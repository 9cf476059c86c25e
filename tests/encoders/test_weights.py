import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encoders import registry, weights
from encoders.clip import CLIP, CLIPDims, ClipEncoder
from encoders.errors import ModelLoadError
from encoders.weights import StoredModel


def rewrite_rows(path, edit) -> None:
    """Apply edit(rows) to a saved store's rows in place, keeping its metadata (a corruption, on purpose)."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def row(rows: list[dict], name: str) -> dict:
    return next(r for r in rows if r["name"] == name)


def test_round_trip_keeps_every_tensor_and_setting(tmp_path, tiny_clip):
    tiny_clip.tensors |= {
        "extra.bf16": torch.randn(3, 5).bfloat16(),
        "extra.fp16": torch.randn(7).half(),
        "extra.int64": torch.arange(6).reshape(2, 3),
        "extra.scalar": torch.tensor(2.5),
    }
    tiny_clip.source = "/somewhere/checkpoint"
    path = weights.save(tiny_clip, tmp_path / "m.parquet")
    back = weights.load(path)
    assert back.meta() == tiny_clip.meta() and back.source == "/somewhere/checkpoint"
    assert back.tensors.keys() == tiny_clip.tensors.keys()
    for name, t in tiny_clip.tensors.items():
        assert back.tensors[name].dtype == t.dtype and torch.equal(back.tensors[name], t), name
    assert back.digest == tiny_clip.digest
    assert weights.read_meta(path) == tiny_clip.meta() | {"source": "/somewhere/checkpoint"}


def test_digest_follows_weights_and_settings_but_not_source(tiny_clip):
    digest = tiny_clip.digest
    assert StoredModel(**vars(tiny_clip) | {"source": "elsewhere"}).digest == digest
    changed = dict(tiny_clip.tensors)
    changed["text.proj.weight"] = changed["text.proj.weight"].clone()
    changed["text.proj.weight"][3, 4] += 1e-6
    assert StoredModel(**vars(tiny_clip) | {"tensors": changed}).digest != digest
    assert StoredModel(**vars(tiny_clip) | {"config": tiny_clip.config | {"layer_norm_eps": 1e-6}}).digest != digest
    assert StoredModel(**vars(tiny_clip) | {"preprocess": tiny_clip.preprocess | {"size": 40}}).digest != digest
    assert StoredModel(**vars(tiny_clip) | {"tokenizer": tiny_clip.tokenizer + " "}).digest != digest


def test_save_replaces_atomically(tmp_path, tiny_clip):
    path = weights.save(tiny_clip, tmp_path / "m.parquet")
    tiny_clip.preprocess = tiny_clip.preprocess | {"size": 48}
    weights.save(tiny_clip, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temp file left
    assert weights.load(path).preprocess["size"] == 48


def test_load_state_assign_uses_the_stored_tensors(tiny_clip):
    with torch.device("meta"):
        model = CLIP(CLIPDims(**tiny_clip.config))
    weights.load_state(model, tiny_clip, assign=True)
    assert model.text.proj.weight.data_ptr() == tiny_clip.tensors["text.proj.weight"].data_ptr()
    assert not any(p.is_meta for p in model.parameters())


# --- corrupt stores ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path, tiny_clip):
    return weights.save(tiny_clip, tmp_path / "tiny.parquet")


def test_altered_tensor_fails_its_checksum(saved):
    def flip(rows):
        r = row(rows, "text.blocks.1.attn.qkv.weight")
        r["data"] = r["data"][:100] + bytes([r["data"][100] ^ 1]) + r["data"][101:]

    rewrite_rows(saved, flip)
    with pytest.raises(ModelLoadError, match=r"'text.blocks.1.attn.qkv.weight' fails its checksum"):
        weights.load(saved)


def test_truncated_tensor_is_named(saved):
    def cut(rows):
        r = row(rows, "vision.positional_embedding")
        r["data"] = r["data"][:-8]
        r["sha256"] = hashlib.sha256(r["data"]).hexdigest()  # consistent checksum: only the size is wrong

    rewrite_rows(saved, cut)
    with pytest.raises(ModelLoadError, match=r"'vision.positional_embedding' has \d+ bytes"):
        weights.load(saved)


def test_truncated_tensor_without_new_checksum_is_named(saved):
    rewrite_rows(saved, lambda rows: row(rows, "logit_scale").update(data=b"\x00\x00"))
    with pytest.raises(ModelLoadError, match="'logit_scale' fails its checksum"):
        weights.load(saved)


def test_removed_tensor_is_named_when_loading_the_model(saved):
    rewrite_rows(saved, lambda rows: rows.remove(row(rows, "vision.ln_post.bias")))
    with pytest.raises(ModelLoadError, match="missing tensor 'vision.ln_post.bias'"):
        registry.load_encoder(str(saved))


def test_reshaped_tensor_is_named(saved):
    rewrite_rows(saved, lambda rows: row(rows, "text.proj.weight").update(shape=[32 * 24]))
    stored = weights.load(saved)  # bytes and checksum are fine; the shape is not the module's
    with pytest.raises(ModelLoadError, match=r"'text.proj.weight' has shape \(768,\), expected \(24, 32\)"):
        _ = ClipEncoder("tiny", stored).model  # the network (and its weights) is built on first use


def test_unexpected_tensor_is_named(saved, tiny_clip):
    tiny_clip.tensors["vision.blocks.9.ln1.weight"] = torch.ones(32)
    with pytest.raises(ModelLoadError, match="unexpected tensor 'vision.blocks.9.ln1.weight'"):
        _ = ClipEncoder("tiny", tiny_clip).model


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cannot read model store"):
        weights.load(saved)


def test_not_a_store(tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(ModelLoadError, match="not an mmembed model store"):
        weights.load(path)
    with pytest.raises(ModelLoadError, match="cannot read model store"):
        weights.load(tmp_path / "missing.parquet")
