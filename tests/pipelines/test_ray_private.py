"""The private Ray APIs behind pipelines/ray_private.py, by name: an upgrade that removes or changes one fails here,
not as a pipeline that stalls or runs slower somewhere else."""

from __future__ import annotations

import dataclasses
import inspect

import ray
from ray.data import DataContext, TaskPoolStrategy

from pipelines import ray_private


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
