"""The model's steps of a pipeline, on plain batches without Ray, held to the model's own preprocessing and the
bare encoder: preprocessing at idle priority, the encoder actor and its one-call task, a model that fails to load."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
from PIL import Image

from encoders.options import Options
from encoders.registry import load_encoder, load_inputs
from pipelines import stages
from pipelines.errors import EncoderLoadError


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return buf.getvalue()


def batch() -> dict[str, np.ndarray]:
    data = [png((200, 30, 30)), b"not an image", png((10, 200, 90)), None]
    return {
        "id": np.array(["a", "b", "c", "d"]),
        "data": np.array(data, dtype=object),
        "read_error": np.array(["", "", "", "cannot read d"]),
    }


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_idle_thread_runs_at_idle_priority_and_leaves_the_caller_alone():
    assert stages.idle_thread().submit(os.sched_getscheduler, 0).result() == os.SCHED_IDLE
    assert stages.idle_thread().submit(threading.get_ident).result() != threading.get_ident()
    assert os.sched_getscheduler(0) != os.SCHED_IDLE, "the task's own thread (a pooled Ray worker's) keeps its policy"


def unpack(out: dict[str, np.ndarray], i: int) -> np.ndarray:
    return np.frombuffer(out["features"][i], dtype=np.float32).reshape(out["shape"][i])


def test_preprocessing_gives_the_models_inputs_at_idle_priority_or_not():
    """Both ways, the packed features are what the model's own preprocessing (held to CLIPImageProcessor in
    tests/encoders/test_image.py) makes of each good file, and each bad one is an error row with its stage."""
    raws = batch()["data"]
    expected = {i: load_inputs("shapes-clip")("image", raws[i]) for i in (0, 2)}
    for yield_cpu in (False, True):
        out = stages.preprocess(batch(), "shapes-clip", "image", Options(), yield_cpu=yield_cpu)
        assert list(out["error_type"]) == ["", "ImageValidationError", "", "OSError"]
        assert list(out["error_stage"]) == ["", "preprocess", "", "read"]
        assert list(out["shape"][[0, 2]]) == [[3, 64, 64], [3, 64, 64]] and list(out["features"][[1, 3]]) == [b"", b""]
        for i, inputs in expected.items():
            assert np.array_equal(unpack(out, i), inputs), (yield_cpu, i)
        assert (out["preprocess_s"] > 0).all(), "CPU seconds of the thread that did the work"


def test_the_actor_and_the_one_call_task_embed_what_the_bare_encoder_does_and_keep_every_row():
    ready = stages.preprocess(batch(), "shapes-clip", "image", Options())
    bare = load_encoder("shapes-clip", Options(device="cpu")).encode("image", list(batch()["data"][[0, 2]]))
    for out in (
        stages.embed_in_task(dict(ready), "shapes-clip", "image", Options(device="cpu")),
        stages.EmbedBatch("shapes-clip", "image", Options(device="cpu"))(dict(ready)),
    ):
        assert list(out["id"]) == ["a", "b", "c", "d"] and list(out["error_type"]) == list(ready["error_type"])
        assert (out["embedding"][[0, 2]] * bare).sum(1).min() >= 0.9999
        assert not out["embedding"][[1, 3]].any(), "a row that failed before the encoder keeps its error, no vector"


def test_a_model_that_does_not_load_fails_at_the_first_batch_with_one_line(tmp_path):
    """From __init__, Ray would turn the failure into text about a dead actor: the first batch raises it instead."""
    actor = stages.EmbedBatch(str(tmp_path / "missing.parquet"), "image", Options(device="cpu"))
    with pytest.raises(
        EncoderLoadError, match=r"^model '.*missing.parquet' cannot load in its encoder: no model store"
    ):
        actor(stages.preprocess(batch(), "shapes-clip", "image", Options()))
    assert isinstance(stages.load_failure("m", MemoryError()), EncoderLoadError)
    assert (
        str(stages.load_failure("m", MemoryError()))
        == "model 'm' cannot load in its encoder: MemoryError (out of memory)"
    )
    bug = KeyError("x")
    assert stages.load_failure("m", bug) is bug, "a bug keeps its type and traceback"


def test_a_tally_row_passes_every_step_untouched_and_the_writer_counts_it(tmp_path):
    """Rows skipped as done are counted where they are skipped (the tally row of sources.skip_done) and reach the
    driver through the writer, instead of being the remainder of what was read."""
    from pipelines import sinks, sources
    from storage.store import row_key

    rows = sources.load_rows({"id": np.array(["a", "b", "c"]), "text": np.array(["one", "", "three"])}, "SRC")
    done = np.array([row_key("SRC", "c", rows["content_hash"][2])])
    batch = sources.skip_done(rows, done)
    assert list(batch["done_rows"]) == [0, 0, 1]
    ready = stages.preprocess(batch, "shapes-clip", "text", Options())
    assert list(ready["error_type"]) == ["", "TextValidationError", ""], "the tally row is not decoded"
    embedded = stages.EmbedBatch("shapes-clip", "text", Options(device="cpu"))(dict(ready))
    assert not embedded["embedding"][2].any(), "nor embedded"
    out = sinks.write_shard(embedded, str(tmp_path), "text", "shapes-clip", "d", "job1", ())
    assert [(k, n) for k, n in zip(out["kind"], out["rows"])] == [("embeddings", 1), ("errors", 1), ("done", 1)]
    assert out["path"][2] == "" and set(sinks.FATES) == set(out["kind"])


def test_a_vector_of_nan_is_an_error_row_not_an_embedding():
    ready = stages.preprocess(batch(), "shapes-clip", "image", Options())
    actor = stages.EmbedBatch("shapes-clip", "image", Options(device="cpu"))
    real = actor.encoder.embed

    def embed(modality, items):
        vectors = real(modality, items)
        vectors[0] = np.nan
        return vectors

    actor.encoder.embed = embed
    out = actor(dict(ready))
    assert list(out["error_type"]) == ["NonFiniteEmbedding", "ImageValidationError", "", "OSError"]
    assert out["error_stage"][0] == "encode" and "NaN or infinite" in out["error_message"][0]
    assert np.isfinite(out["embedding"]).all()
