"""The pipeline's resources: an encoder pool never takes the CPUs that the tasks feeding it need."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import ray
import soundfile as sf
from PIL import Image

from encoders import registry
from encoders.options import Options
from encoders.registry import load_encoder
from pipelines import embed
from pipelines.errors import ResourceError
from storage.store import Store


def test_actor_resources_leave_a_cpu_for_the_tasks(ray_session):
    cpus = ray.cluster_resources()["CPU"]
    most = int((cpus - embed.FREE_CPUS) / embed.MIN_ACTOR_CPUS)
    for actors in (1, 2, 3, most):
        share = embed.actor_resources(actors, gpu=False)
        assert share["num_gpus"] == 0
        assert embed.MIN_ACTOR_CPUS <= share["num_cpus"] <= 1 and actors * share["num_cpus"] <= cpus - embed.FREE_CPUS
    with pytest.raises(ResourceError, match=f"too many .* use --actors {most} or fewer"):
        embed.actor_resources(most + 1, gpu=False)
    if not ray.cluster_resources().get("GPU"):
        with pytest.raises(ResourceError, match="no GPU"):
            embed.actor_resources(1, gpu=True)


def test_threads_default_to_the_node_cpus_shared_by_a_pool(ray_session):
    cpus = int(ray.cluster_resources()["CPU"])
    assert embed.actor_threads(embed.StageSizes(8, 8, actors=1), gpu=False) == cpus
    assert embed.actor_threads(embed.StageSizes(8, 8, actors=cpus + 1), gpu=False) == 1
    assert embed.actor_threads(embed.StageSizes(8, 8, actors=1, threads_per_actor=3), gpu=False) == 3


def test_a_pool_larger_than_the_cpus_finishes(tmp_path, ray_session, text_inventory):
    """Once, every actor held a whole CPU, and a pool as large as the machine starved its own input:
    the decoding tasks (and Ray Data's file listing, before the reader that needs none) waited forever for a CPU."""
    texts = [f"note number {i}" for i in range(12)]
    inventory = text_inventory(len(texts))
    target = embed.Target("text", "minilm-l6", "digest", 4, np.empty(0, dtype="S32"))
    sizes = embed.StageSizes(read=4, write=4, actors=int(ray.cluster_resources()["CPU"]) + 1)
    store = Store(str(tmp_path / "store"))
    entries = list(embed.stream(inventory, target, Options(device="cpu"), sizes, store.root, "job1"))
    assert {e["kind"] for e in entries} == {"embeddings"} and sum(e["rows"] for e in entries) == len(texts)
    store.commit("job1", [e["path"] for e in entries])
    table = store.dataset(store.partitions("embeddings")[("text", "minilm-l6")]).to_table()
    stored = np.stack(table["embedding"].to_numpy(zero_copy_only=False))[np.argsort(table["id"].to_pylist())]
    assert (stored * load_encoder("minilm-l6").encode("text", texts)).sum(1).min() >= 0.9999


def test_an_input_of_one_encoder_call_is_encoded_in_a_task_on_cpus_only(text_inventory):
    """An actor pool starts a process that imports Ray Data and torch before its model loads: for one call,
    a task in a worker the job already runs does the same work (a 10-item job: 22-28 s -> 18-20 s, BENCHMARKS.md).
    A reused worker keeps the first CUDA device it saw, so GPU encoders always get their actors. (The task's
    resources: tests/pipelines/test_ray_private.py.)"""
    inventory = text_inventory(3)
    for batch, device, task in ((3, "cpu", True), (2, "cpu", False), (3, "cuda", False)):
        target = embed.Target("text", "minilm-l6", "digest", batch, np.empty(0, dtype="S32"))
        assert embed.one_call(inventory, target, gpu=device == "cuda") is task


def test_only_the_encoder_actor_imports_torch(tmp_path):
    """The driver and the read, preprocessing and write workers start in a fraction of the time (importing torch
    takes a core-second) and memory: see `pipelines.stages`. Preprocessing each modality leaves torch unloaded."""
    image, clip, text = (tmp_path / "a.png"), (tmp_path / "a.wav"), "a short text"
    for model in ("whisper-tiny.en", "minilm-l6"):
        registry.resolve(model)  # a packaged model's first use converts it, with torch
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    sf.write(clip, np.zeros(16000, dtype=np.float32), 16000)
    code = f"""
import sys
import numpy as np
import jobs.cli, pipelines.embed, pipelines.sources, pipelines.sinks
from encoders.options import Options
from pipelines.stages import preprocess
for model, modality, raw in [("shapes-clip", "image", {image.read_bytes()!r}), ("whisper-tiny.en", "audio", {clip.read_bytes()!r}),
                             ("minilm-l6", "text", {text!r}), ("shapes-clip", "text", {text!r})]:
    batch = {{"id": np.array(["x"]), "data": np.array([raw, None], dtype=object)[:1], "read_error": np.array([""])}}
    out = preprocess(batch, model, modality, Options())
    assert out["error_type"][0] == "", out["error_message"][0]
print("torch" in sys.modules)
"""
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
