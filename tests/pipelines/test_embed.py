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
from pipelines import embed, ray_private, sources
from pipelines.errors import ResourceError
from storage.store import Store


def text_inventory(tmp_path, n: int) -> sources.Inventory:
    """A directory input of `n` short texts."""
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    for i in range(n):
        (media / f"{i:02d}.txt").write_text(f"note number {i}")
    return sources.open_input(str(media), str(tmp_path / "staging"))


def plan_steps(ds) -> dict:
    """The logical plan's steps by name, last first."""
    return {op.name: op for op in ray_private.logical_steps(ds)}


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


def test_a_pool_larger_than_the_cpus_finishes(tmp_path, ray_session):
    """Once, every actor held a whole CPU, and a pool as large as the machine starved its own input:
    the decoding tasks (and Ray Data's file listing, before the reader that needs none) waited forever for a CPU."""
    texts = [f"note number {i}" for i in range(12)]
    inventory = text_inventory(tmp_path, len(texts))
    target = embed.Target("text", "minilm-l6", "digest", 4, np.empty(0, dtype="S32"))
    sizes = embed.StageSizes(read=4, write=4, actors=int(ray.cluster_resources()["CPU"]) + 1)
    store = Store(str(tmp_path / "store"))
    entries = list(embed.stream(inventory, target, Options(device="cpu"), sizes, store.root, "job1"))
    assert {e["kind"] for e in entries} == {"embeddings"} and sum(e["rows"] for e in entries) == len(texts)
    store.commit("job1", [e["path"] for e in entries])
    table = store.dataset(store.partitions("embeddings")[("text", "minilm-l6")]).to_table()
    stored = np.stack(table["embedding"].to_numpy(zero_copy_only=False))[np.argsort(table["id"].to_pylist())]
    assert (stored * load_encoder("minilm-l6").encode("text", texts)).sum(1).min() >= 0.9999


@pytest.mark.parametrize(("items", "encoder"), [(5, "MapBatches(EmbedBatch)"), (4, "MapBatches(embed_in_task)")])
def test_only_decoding_and_encoding_reserve_cpu(tmp_path, ray_session, items, encoder):
    """Ray Data pauses a task whose output waits for room downstream, and the task keeps what it
    reserved: a read or repartition task holding the CPU the decoding needed stopped a 20k-image
    job on 2 CPUs for good. So the light steps reserve no CPU, and a bounded number run at once."""
    inventory = text_inventory(tmp_path, items)
    target = embed.Target("text", "minilm-l6", "digest", 4, np.empty(0, dtype="S32"))
    ds = embed.dataset(
        inventory, target, Options(device="cpu"), embed.StageSizes(4, 4, actors=1), str(tmp_path / "store"), "job1"
    )
    steps = plan_steps(ds)
    # the column selection is pushed into the read
    tasks = {name: op for name, op in steps.items() if name != "Project"}
    reserving = {name for name, op in tasks.items() if op.ray_remote_args.get("num_cpus", 1) != 0}
    assert reserving == {"MapBatches(load_rows)", "MapBatches(skip_done)", "MapBatches(preprocess)", encoder}, tasks
    light = [op for name, op in tasks.items() if name not in reserving]
    assert any(name.startswith("StreamingRepartition") for name in tasks) and len(light) == 4, (
        "read, modality, repartition, write"
    )
    assert all(op.compute.size == embed.light_tasks() for op in light), "reserving no CPU, they need a bound"
    assert "ListFiles" not in steps, (
        "Ray Data's reader V2 lists files in a task needing a whole CPU, and reads footers in actors"
    )


def test_an_input_of_one_encoder_call_is_encoded_in_a_task_on_cpus_only(tmp_path, ray_session, monkeypatch):
    """An actor pool starts a process that imports Ray Data and torch before its model loads: for one call,
    a task in a worker the job already runs does the same work (a 10-item job: 22-28 s -> 18-20 s, BENCHMARKS.md).
    A reused worker keeps the first CUDA device it saw, so GPU encoders always get their actors."""
    inventory = text_inventory(tmp_path, 3)
    for batch, device, task in ((3, "cpu", True), (2, "cpu", False), (3, "cuda", False)):
        target = embed.Target("text", "minilm-l6", "digest", batch, np.empty(0, dtype="S32"))
        assert embed.one_call(inventory, target, gpu=device == "cuda") is task
    monkeypatch.setattr(embed, "actor_resources", lambda actors, gpu: {"num_cpus": 1 / actors, "num_gpus": 0})
    target = embed.Target("text", "minilm-l6", "digest", 3, np.empty(0, dtype="S32"))
    ds = embed.dataset(
        inventory, target, Options(device="cpu"), embed.StageSizes(4, 4, actors=2), str(tmp_path / "store"), "job1"
    )
    step = plan_steps(ds)["MapBatches(embed_in_task)"]
    cpus = int(ray.cluster_resources()["CPU"])
    assert step.ray_remote_args["num_cpus"] == 1 and step.fn_kwargs["threads"] == cpus, (
        "what one actor of a pool of one would have"
    )


def test_the_read_and_the_modality_filter_run_as_one_task(tmp_path, ray_session):
    """A read split into more blocks than files is never fused with the next step (Ray Data 2.60), and every
    step of its own runs in worker processes of its own: seconds of CPU each to start."""
    inventory = text_inventory(tmp_path, 5)
    target = embed.Target("text", "minilm-l6", "digest", 4, np.empty(0, dtype="S32"))
    ds = embed.dataset(
        inventory, target, Options(device="cpu"), embed.StageSizes(4, 4, actors=1), str(tmp_path / "store"), "job1"
    )
    assert ray_private.fused_step_names(ds)[1:] == [
        "ReadParquet->MapBatches(of_modality)",
        "StreamingRepartition[num_rows_per_block=4,strict=True]",
        "MapBatches(load_rows)->MapBatches(skip_done)->MapBatches(preprocess)",
        "MapBatches(EmbedBatch)",
        "MapBatches(write_shard)",
    ]


def test_cpu_encoders_get_idle_priority_preprocessing_and_whole_encoder_batches(tmp_path, ray_session, monkeypatch):
    """Beside an encoder on the same CPUs, preprocessing runs at idle priority (`stages.idle_thread`); beside a
    GPU encoder it is the bottleneck and runs as usual. Blocks hold at least one encoder batch."""
    inventory = text_inventory(tmp_path, 1)
    monkeypatch.setattr(
        embed, "actor_resources", lambda actors, gpu: {"num_cpus": 1, "num_gpus": int(gpu)}
    )  # no GPU here
    for device, encode_batch, yielding, block in (
        ("cpu", 256, True, 256),
        ("cpu", 16, True, 64),
        ("cuda", 16, False, 64),
    ):
        target = embed.Target("text", "minilm-l6", "digest", encode_batch, np.empty(0, dtype="S32"))
        ds = embed.dataset(
            inventory, target, Options(device=device), embed.StageSizes(64, 100, actors=1), str(tmp_path / "s"), "job1"
        )
        steps = {name.split("[")[0]: op for name, op in plan_steps(ds).items()}
        assert steps["MapBatches(preprocess)"].fn_kwargs["yield_cpu"] is yielding, device
        assert steps["StreamingRepartition"].target_num_rows_per_block == block
        assert steps["MapBatches(preprocess)"].batch_size == block


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
