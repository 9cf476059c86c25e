"""The whole bench run: every section of a `Plan`, then the reports."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from encoders import registry
from pipelines.embed import start as start_ray
from pipelines.embed import stop as stop_ray

from .. import config
from .baselines import bench_clip
from .measure import (
    measure_clap,
    measure_fixed_cost,
    measure_index,
    measure_int8_recall,
    measure_memory,
    measure_modality,
    measure_retrieval,
    measure_sweep,
    warm_up,
)
from .peak import gemm_peak
from .plan import BARE_DTYPES, MODALITIES, WORKER_NICENESS, Plan, log, make_plan
from .report import machine, summarize, write_reports
from .serve import measure_serve
from .transcribe import measure_transcription


def measure(plan: Plan, out: Path) -> dict:
    """Run every measurement of `plan`, with datasets and stores under `out`; -> the result document."""
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "version": 1,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": plan.quick,
        "machine": machine(),
        "plan": dataclasses.asdict(plan),
        "modalities": {},
    }
    result["plan"].pop("clip")
    started = time.perf_counter()
    if "image" in plan.modalities and not plan.image_model:
        log("building the benchmark CLIP (once per model home)")
        bench_clip(plan.clip_name, plan.clip)
    # Ray starts its workers at niceness 15: beside any other load they would lose the CPU to the
    # baselines, which run in this (niceness 0) process. Equal footing, in this Ray and the subprocess jobs.
    os.environ.setdefault(WORKER_NICENESS, "0")
    result["machine"]["ray_worker_niceness"] = os.environ[WORKER_NICENESS]
    own_ray = start_ray()
    partial = out / "bench.partial.json"  # each section as it completes: a run cut short still leaves its numbers

    def keep(section: dict, key: str, value) -> None:
        section[key] = value
        partial.write_text(json.dumps(result, indent=1) + "\n")

    keep(result, "warmup_s", warm_up(plan, out))
    log("the machine's GEMM peak: fp32, bf16, int8")
    keep(result, "peak", gemm_peak(plan.peak_shapes, BARE_DTYPES))
    for modality in plan.modalities:
        keep(result["modalities"], modality, measure_modality(modality, plan, out, result["peak"]))
    if plan.whole_run:
        log("int8: the demo's queries against float32")
        keep(result, "int8_recall", measure_int8_recall())
    if "audio" in plan.modalities:
        log("CLAP: audio clips/s against transformers' ClapModel (LAION's unfused audio tower, random weights)")
        keep(result, "clap", measure_clap(plan, out))
        log("transcription: ours against faster-whisper on 5 s and 60 s clips")
        keep(result, "transcribe", measure_transcription(plan.transcribe_clips, 1 if plan.quick else 3))
    if "image" in plan.modalities and plan.sweep:  # --quick skips it
        keep(result, "sweep", measure_sweep(plan, out))
    if own_ray:  # the rest needs no Ray here, and its idle workers would poll beside the subprocess jobs' own Ray
        stop_ray()
    if plan.whole_run:
        keep(result, "retrieval", [measure_retrieval(rows, plan, out) for rows in plan.query_rows])
        keep(result, "index", measure_index(plan.index_rows, plan, out))
        keep(result, "fixed_cost", measure_fixed_cost(plan, out))
        keep(result, "memory", measure_memory(plan, out))
        keep(result, "serve", measure_serve(plan, out, plan.serve_rows))
    partial.unlink()
    result["total_s"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summarize(result)
    return result


# -- command line ---------------------------------------------------------------------------


def run(
    modalities: list[str] | None,
    n: int | None,
    quick: bool,
    out: Path,
    json_path: Path | None,
    image_model: str | None = None,
) -> int:
    """`mmembed bench`: measure, write the reports under `out` (and the JSON at `json_path`), print the markdown."""
    if n is not None and n < 1:
        raise config.ConfigError("--n must be at least 1")
    if image_model is not None:
        registry.resolve(image_model)  # an unknown model stops here, before any work
    plan = make_plan(n, quick, tuple(m for m in MODALITIES if m in (modalities or MODALITIES)), image_model)
    result = measure(plan, out)
    paths = write_reports(result, out, json_path)
    print(paths["markdown"].read_text())
    log(f"wrote {', '.join(str(p) for p in paths.values())}" + (f" and {json_path}" if json_path else ""))
    return 0
