"""The private Ray APIs behind pipelines/ray_private.py, by name: an upgrade that removes or changes one fails here,
not as a pipeline that stalls or runs slower somewhere else. With them, the tests that read our pipelines' plans
through `ray_private.logical_steps` / `fused_step_names` (Ray Data's logical plan and optimiser are private)."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy
from ray.util.annotations import RayDeprecationWarning

from encoders.options import Options
from pipelines import embed, ray_private


def test_ray_init_takes_a_system_config_with_the_idle_worker_key():
    assert 'kwargs.pop("_system_config"' in inspect.getsource(ray.init)
    assert ray_private.IDLE_WORKER_KEY == "idle_worker_killing_time_threshold_ms"


def test_data_context_has_the_v1_parquet_reader_switch():
    ctx = dataclasses.replace(DataContext.get_current())
    ray_private.use_parquet_reader_v1(ctx)
    assert ctx.use_datasource_v2 is False


def test_a_last_step_is_made_light_through_the_logical_plan(ray_session):
    ds = ray.data.range(8, override_num_blocks=2).repartition(target_num_rows_per_block=4, strict=True)
    step = ds._logical_plan.dag
    assert isinstance(step.ray_remote_args, dict) and dataclasses.is_dataclass(step)
    assert "compute" in {f.name for f in dataclasses.fields(step)}, "the operator's compute field moved"
    ray_private.last_step_light(ds, 3)
    assert step.ray_remote_args["num_cpus"] == 0
    assert isinstance(step.compute, TaskPoolStrategy) and step.compute.size == 3
    assert sorted(ds.take_all(), key=lambda r: r["id"]) == [{"id": i} for i in range(8)]


def test_the_plans_can_be_read(ray_session):
    ds = ray.data.range(4).map_batches(lambda b: b, batch_format="numpy").map_batches(lambda b: b)
    assert [op.name for op in ray_private.logical_steps(ds)][-1] == "ReadRange"
    assert ray_private.fused_step_names(ds) == ["Input", "ReadRange->MapBatches(<lambda>)->MapBatches(<lambda>)"]


def _noop():
    pass


class Identity:
    def __call__(self, batch):
        return batch


def test_restart_limits_pass_as_deprecated_remote_args_and_replace_rays_for_ever(ray_session):
    """Ray Data restarts a dead actor and retries a dead task for ever (-1) unless map_batches is given limits,
    which Ray 2.60 takes only as `**ray_remote_args` (deprecated, to go in 2.64: then this fails)."""
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator
    from ray.data._internal.remote_fn import cached_remote_fn

    ctx = DataContext.get_current()
    assert ActorPoolMapOperator._apply_default_remote_args({}, ctx)["max_restarts"] == -1
    assert cached_remote_fn(_noop)._default_options["max_retries"] == -1
    with pytest.warns(RayDeprecationWarning, match="`ray_remote_args` is deprecated"):
        ray.data.range(2).map_batches(lambda b: b, max_retries=1)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)  # the wrapper keeps Ray's deprecation notice quiet
        pool = ray_private.map_batches_restarting(ray.data.range(8), Identity, 2, compute=ActorPoolStrategy(size=1))
        tasks = ray_private.map_batches_restarting(ray.data.range(8), lambda b: b, 3)
    actor_args = ray_private.logical_steps(pool)[0].ray_remote_args
    assert (actor_args["max_restarts"], actor_args["max_task_retries"]) == (2, 2)
    kept = ActorPoolMapOperator._apply_default_remote_args(actor_args, ctx)
    assert (kept["max_restarts"], kept["max_task_retries"]) == (2, 2), "Ray Data's defaults fill in only what is unset"
    task_args = ray_private.logical_steps(tasks)[0].ray_remote_args
    assert task_args["max_retries"] == 3 and cached_remote_fn(_noop, **task_args)._default_options["max_retries"] == 3
    assert pool.count() == tasks.count() == 8


def test_the_recorded_cluster_is_the_file_ray_init_reads(tmp_path, monkeypatch):
    """`ray.init()` without an address joins the address `ray start` wrote to <ray temp dir>/ray_current_cluster
    (`ray._common.utils.get_ray_address_file`)."""
    from ray._common.utils import get_ray_address_file
    from ray._private import services

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_private.recorded_cluster() is None
    assert get_ray_address_file(None) == str(tmp_path / "ray" / "ray_current_cluster")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
    assert ray_private.recorded_cluster() == (str(tmp_path / "ray" / "ray_current_cluster"), "127.0.0.1:1")
    assert services.get_ray_address_from_environment(None, None) == "127.0.0.1:1", "Ray reads the same file"


TOKEN_MODE = """
import os, sys
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from pipelines import ray_private
print(ray_private.use_token_if_available(), os.environ.get("RAY_AUTH_MODE"), is_token_auth_enabled())
"""


@pytest.mark.parametrize(
    ("token", "expected"),
    [("env", "True token True"), ("file", "True token True"), ("home", "True token True"), (None, "False None False")],
)
def test_token_authentication_turns_on_with_a_token_at_hand(tmp_path, token, expected):
    """Ray's own switch (`maybe_enable_token_auth_if_token_available`, which `ray.init()` applies only to a cluster it
    finds by itself) with each place Ray documents for the token. A fresh process: the mode sticks in RayConfig."""
    from ray._private.authentication import authentication_token_setup as setup

    assert "warn_if_disabled" in inspect.signature(setup.maybe_enable_token_auth_if_token_available).parameters
    assert setup.AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(home)}
    if token == "env":
        env["RAY_AUTH_TOKEN"] = "a" * 32
    elif token == "file":
        (tmp_path / "token").write_text("b" * 32)
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "token")
    elif token == "home":
        (home / ".ray" / "auth_token").write_text("c" * 32)
    out = subprocess.run([sys.executable, "-c", TOKEN_MODE], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == expected, out.stderr
    assert "Token authentication is enabled" not in out.stderr, "Ray's notice is not shown"


# -- our pipelines' plans, read through the private readers -------------------------------------------------


def plan_steps(ds) -> dict:
    """The logical plan's steps by name, last first."""
    return {op.name: op for op in ray_private.logical_steps(ds)}


def plan(inventory, tmp_path, target: embed.Target, sizes: embed.StageSizes, device: str = "cpu"):
    return embed.dataset(inventory, target, Options(device=device), sizes, str(tmp_path / "store"), "job1")


def text_target(encode_batch: int) -> embed.Target:
    return embed.Target("text", "minilm-l6", "digest", encode_batch, np.empty(0, dtype="S32"))


@pytest.mark.parametrize(("items", "encoder"), [(5, "MapBatches(EmbedBatch)"), (4, "MapBatches(embed_in_task)")])
def test_only_decoding_and_encoding_reserve_cpu(tmp_path, ray_session, text_inventory, items, encoder):
    """Ray Data pauses a task whose output waits for room downstream, and the task keeps what it
    reserved: a read or repartition task holding the CPU the decoding needed stopped a 20k-image
    job on 2 CPUs for good. So the light steps reserve no CPU, and a bounded number run at once."""
    steps = plan_steps(plan(text_inventory(items), tmp_path, text_target(4), embed.StageSizes(4, 4, actors=1)))
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


@pytest.mark.parametrize(
    ("items", "encoder", "limits"),
    [
        (5, "MapBatches(EmbedBatch)", {"max_restarts": embed.RESTARTS, "max_task_retries": embed.RESTARTS}),
        (4, "MapBatches(embed_in_task)", {"max_retries": embed.RESTARTS}),
    ],
)
def test_a_dead_encoder_is_restarted_a_bounded_number_of_times(
    tmp_path, ray_session, text_inventory, items, encoder, limits
):
    steps = plan_steps(plan(text_inventory(items), tmp_path, text_target(4), embed.StageSizes(4, 4, actors=1)))
    assert limits.items() <= steps[encoder].ray_remote_args.items()


def test_one_call_task_gets_what_one_actor_of_a_pool_of_one_would_have(
    tmp_path, ray_session, text_inventory, monkeypatch
):
    monkeypatch.setattr(embed, "actor_resources", lambda actors, gpu: {"num_cpus": 1 / actors, "num_gpus": 0})
    ds = plan(text_inventory(3), tmp_path, text_target(3), embed.StageSizes(4, 4, actors=2))
    step = plan_steps(ds)["MapBatches(embed_in_task)"]
    assert step.ray_remote_args["num_cpus"] == 1 and step.fn_kwargs["threads"] == int(ray.cluster_resources()["CPU"])


def test_the_read_and_the_modality_filter_run_as_one_task(tmp_path, ray_session, text_inventory):
    """A read split into more blocks than files is never fused with the next step (Ray Data 2.60), and every
    step of its own runs in worker processes of its own: seconds of CPU each to start."""
    ds = plan(text_inventory(5), tmp_path, text_target(4), embed.StageSizes(4, 4, actors=1))
    assert ray_private.fused_step_names(ds)[1:] == [
        "ReadParquet->MapBatches(of_modality)",
        "StreamingRepartition[num_rows_per_block=4,strict=True]",
        "MapBatches(load_rows)->MapBatches(skip_done)->MapBatches(preprocess)",
        "MapBatches(EmbedBatch)",
        "MapBatches(write_shard)",
    ]


def test_cpu_encoders_get_idle_priority_preprocessing_and_whole_encoder_batches(
    tmp_path, ray_session, text_inventory, monkeypatch
):
    """Beside an encoder on the same CPUs, preprocessing runs at idle priority (`stages.idle_thread`); beside a
    GPU encoder it is the bottleneck and runs as usual. Blocks hold at least one encoder batch."""
    inventory = text_inventory(1)
    monkeypatch.setattr(embed, "actor_resources", lambda actors, gpu: {"num_cpus": 1, "num_gpus": int(gpu)})  # no GPU
    for device, encode_batch, yielding, block in (
        ("cpu", 256, True, 256),
        ("cpu", 16, True, 64),
        ("cuda", 16, False, 64),
    ):
        ds = plan(inventory, tmp_path, text_target(encode_batch), embed.StageSizes(64, 100, actors=1), device)
        steps = {name.split("[")[0]: op for name, op in plan_steps(ds).items()}
        assert steps["MapBatches(preprocess)"].fn_kwargs["yield_cpu"] is yielding, device
        assert steps["StreamingRepartition"].target_num_rows_per_block == block
        assert steps["MapBatches(preprocess)"].batch_size == block
