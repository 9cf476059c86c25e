"""The model's steps of a pipeline, on plain batches without Ray: preprocessing at idle priority."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
from PIL import Image

from encoders.options import Options
from pipelines import stages


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


def test_preprocessing_at_idle_priority_gives_the_same_rows():
    here = stages.preprocess(batch(), "shapes-clip", "image", Options())
    idle = stages.preprocess(batch(), "shapes-clip", "image", Options(), yield_cpu=True)
    assert list(idle["error_type"]) == list(here["error_type"]) == ["", "ImageValidationError", "", "OSError"]
    assert list(idle["error_stage"]) == ["", "preprocess", "", "read"]
    assert list(idle["features"]) == list(here["features"]) and list(idle["shape"]) == list(here["shape"])
    assert list(idle["shape"][[0, 2]]) == [[3, 64, 64], [3, 64, 64]]
    assert (idle["preprocess_s"] > 0).all(), "CPU seconds of the thread that did the work"


def test_the_one_call_task_embeds_what_the_actor_embeds_and_keeps_every_row():
    ready = stages.preprocess(batch(), "shapes-clip", "image", Options())
    in_task = stages.embed_in_task(dict(ready), "shapes-clip", "image", Options(device="cpu"))
    in_actor = stages.EmbedBatch("shapes-clip", "image", Options(device="cpu"))(dict(ready))
    assert list(in_task["id"]) == ["a", "b", "c", "d"] and list(in_task["error_type"]) == list(ready["error_type"])
    assert np.array_equal(in_task["embedding"], in_actor["embedding"])
    good = in_task["embedding"][[0, 2]]
    assert np.allclose(np.linalg.norm(good, axis=1), 1, atol=1e-5) and not in_task["embedding"][[1, 3]].any()


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
