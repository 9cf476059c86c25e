"""The measurements: the pipeline per modality and dtype, the sweep, retrieval and the HNSW index, and the jobs run
as a user runs them (a subprocess `mmembed embed` with a fresh Ray) for peak memory and the fixed cost."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from encoders import registry
from encoders.options import Options
from encoders.registry import load_encoder
from pipelines.errors import ResourceError
from storage.store import Store, duckdb_connection

from .. import config
from ..run import run_job
from .baselines import bare, baseline, ctranslate2_whisper, min_cosine, preprocess_costs
from .data import read_items, write_dataset
from .memory import PeakMemory
from .plan import (
    BARE_DTYPES,
    CHECK_BATCH,
    DTYPES,
    INDEX_CLUSTERS,
    MODELS,
    RETRIEVAL_DIM,
    RSS_MODEL,
    TOP_K,
    WARMUP_ITEMS,
    BenchError,
    Plan,
    device_name,
    log,
    model_for,
    percentiles,
    ratio,
    sig,
    timed,
)
from .vectors import around, write_vector_store


def pipeline(
    dataset: Path,
    root: Path,
    modality: str,
    model: str,
    dtype: str,
    actors: int = 1,
    batch: int | None = None,
    threads: int = 0,
) -> dict:
    """One `run_job` job into a fresh store: items/s end to end, the job's stage seconds, peak memory."""
    shutil.rmtree(root, ignore_errors=True)
    overrides = {
        "input": str(dataset),
        "root": str(root),
        "models": {modality: [model]},
        "dtype": dtype,
        "actors": actors,
        "threads_per_actor": threads,
        "device": "auto",
    }
    if batch:
        overrides["batch_size"] = {modality: batch}
    with PeakMemory() as memory:
        record = run_job(config.load(None, overrides), log=io.StringIO())
    counts = record["counts"][f"{modality}/{model}"]
    if counts["errored"]:
        raise BenchError(
            f"{counts['errored']} {modality} item(s) failed in the pipeline; see the errors table in {root}"
        )
    stages = record["stages_s"]
    return {
        "items": counts["embedded"],
        "items_per_s": sig(counts["embedded"] / stages["wall"]),
        "stages_s": stages,
        "encode_items_per_s": sig(counts["embedded"] / stages["encode_s"]) if stages.get("encode_s") else None,
        "peak_rss_mb": memory.peak_mb,
        "largest_at_peak": memory.largest(),
    }


def stored_embeddings(root: Path) -> np.ndarray:
    """Every committed embedding of a one-model store, in id order."""
    store = Store(str(root))
    files = [f for part in store.partitions("embeddings").values() for f in part]
    table = store.dataset(files).to_table(columns=["id", "embedding"]).sort_by("id")
    return table["embedding"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)


def measure_modality(modality: str, plan: Plan, work: Path, peak: dict) -> dict:
    """Pipeline (fp32, bf16), baseline, bare forward (fp32, bf16, int8; each against the machine's `peak` of its
    dtype) and parity figures for one modality."""
    model = model_for(modality, plan)
    n = plan.n[modality]
    dataset = write_dataset(work / "data" / f"{modality}-{n}", {modality: n})
    items = read_items(dataset)
    batch = getattr(config.load().batch_size, modality)
    out: dict = {"model": model, "items": n, "encode_batch": batch, "pipeline": {}, "bare": {}}
    embeddings = {}
    for dtype in DTYPES:
        log(f"{modality}: pipeline {dtype} over {n} items")
        root = work / "stores" / f"{modality}-{dtype}"
        out["pipeline"][dtype] = pipeline(dataset, root, modality, model, dtype)
        embeddings[dtype] = stored_embeddings(root)
    log(f"{modality}: reference baseline")
    sample = items[: plan.baseline_items[modality]]
    what, rate, reference = baseline(modality, sample, batch, plan)
    out["baseline"] = {"what": what, "dtype": "float32", "items": len(sample), "items_per_s": sig(rate)}
    bare_embeddings = {}
    for dtype in BARE_DTYPES:
        if peak[dtype]["gflops"] is None or (dtype == "int8" and device_name() != "cpu"):
            out["bare"][dtype] = {"items_per_s": None, "note": peak[dtype]["note"] or "int8 runs on the CPU only"}
            continue
        log(f"{modality}: bare encoder {dtype}")
        result = bare(model, modality, items, dtype, batch, plan.bare_reps)
        bare_embeddings[dtype] = result.pop("embeddings")
        out["bare"][dtype] = result | {"share_of_peak": sig(result["gflops"] / peak[dtype]["gflops"])}
    fp32 = out["pipeline"]["float32"]
    out["startup_s"] = sig(fp32["stages_s"]["wall"] - fp32["stages_s"]["encode_s"])  # all but the encoder's own time
    out["steady_vs_bare"] = ratio(fp32["encode_items_per_s"], out["bare"]["float32"]["items_per_s"])
    out["preprocess_costs"] = preprocess_costs(model, modality, items[:32])
    out["cosine_min"] = {"bfloat16_vs_float32": min_cosine(embeddings["bfloat16"], embeddings["float32"])}
    if "int8" in bare_embeddings:
        out["cosine_min"]["int8_vs_float32"] = min_cosine(bare_embeddings["int8"], bare_embeddings["float32"])
    if modality == "audio":  # the baseline pads to 30 s: held to our padded mode, which computes the same function
        padded = load_encoder(model, Options(device=device_name(), audio_mode="padded")).encode("audio", items[:4])
        out["cosine_min"]["baseline_vs_ours_padded"] = min_cosine(padded, reference[:4])
        ct2 = ctranslate2_whisper(registry.PACKAGED[model](), items[:4])  # the baseline's weights, held to CTranslate2
        out["cosine_min"]["baseline_vs_ctranslate2"] = min_cosine(reference[:4], ct2)
    else:
        out["cosine_min"]["float32_vs_baseline"] = min_cosine(embeddings["float32"][: len(reference)], reference)
    return out


def warm_up(plan: Plan, work: Path) -> float:
    """Convert the packaged models and run one small job, so that the timed jobs meet a warm Ray, as a user's second job does."""
    for modality in plan.modalities:
        registry.resolve(model_for(modality, plan))
    modality = plan.modalities[-1]  # text when it is measured: the cheapest
    log(f"warm-up: a {WARMUP_ITEMS}-item {modality} job")
    dataset = write_dataset(work / "data" / f"{modality}-{WARMUP_ITEMS}", {modality: WARMUP_ITEMS})
    return pipeline(dataset, work / "stores" / "warmup", modality, model_for(modality, plan), "float32")["stages_s"][
        "wall"
    ]


def measure_sweep(plan: Plan, work: Path) -> list[dict]:
    """Image pipeline fp32 items/s over actors x encoder batch x torch threads per actor (0 = the default: the node's CPUs
    shared by the actors)."""
    dataset = write_dataset(work / "data" / f"image-{plan.sweep_images}", {"image": plan.sweep_images})
    points = []
    for actors, batch, threads in plan.sweep:
        log(f"sweep: {actors} actor(s), batch {batch}, threads {threads or 'auto'}")
        try:
            result = pipeline(
                dataset, work / "stores" / "sweep", "image", model_for("image", plan), "float32", actors, batch, threads
            )
        except ResourceError as e:
            points.append({"actors": actors, "batch": batch, "threads": threads, "skipped": str(e)})
            continue
        points.append(
            {
                "actors": actors,
                "batch": batch,
                "threads": threads,
                "items_per_s": result["items_per_s"],
                "encode_items_per_s": result["encode_items_per_s"],
                "peak_rss_mb": result["peak_rss_mb"],
            }
        )
    return points


def brute_force(files: list[str], queries: np.ndarray) -> tuple[list[float], list[str]]:
    """numpy top-k over the vectors read into memory: seconds per query, and the first query's ids."""
    table = pq.read_table(files, columns=["id", "embedding"])
    matrix = table["embedding"].combine_chunks().flatten().to_numpy().reshape(-1, RETRIEVAL_DIM)

    def top(q: np.ndarray) -> pa.Array:
        scores = matrix @ (q / np.linalg.norm(q))
        best = np.argpartition(-scores, TOP_K)[:TOP_K]
        return table["id"].take(best[np.argsort(-scores[best])])

    return [timed(lambda q=q: top(q))[0] for q in queries], top(queries[0]).to_pylist()


def measure_retrieval(rows: int, plan: Plan, work: Path) -> dict:
    """Top-10 latency over `rows` x 512 vectors: storage.search.search, numpy brute force, naive DuckDB; the incremental check."""
    from storage.search import search

    rng = np.random.default_rng(rows)
    root = work / "stores" / f"vectors-{rows}"
    log(f"retrieval: writing {rows} x {RETRIEVAL_DIM} vectors")
    model = write_vector_store(root, rows, rng)
    store = Store(str(root))
    files = [store.uri(f) for f in store.partitions("embeddings")[("image", model)]]
    queries = rng.standard_normal((plan.queries, RETRIEVAL_DIM), dtype=np.float32)
    log(f"retrieval: {rows} rows, search / numpy / naive DuckDB")
    cold, first = timed(lambda: search(str(root), queries[0], "image", model, k=TOP_K))
    search_s = [timed(lambda q=q: search(str(root), q, "image", model, k=TOP_K))[0] for q in queries]

    numpy_s, numpy_first = brute_force(files, queries)
    if numpy_first != first["id"].to_pylist():
        raise BenchError("search and numpy brute force disagree on the top-10")
    con = duckdb_connection()
    sql = (
        f"SELECT id, array_cosine_similarity(embedding::FLOAT[{RETRIEVAL_DIM}], ?::FLOAT[{RETRIEVAL_DIM}]) AS score "
        "FROM read_parquet(?) ORDER BY score DESC LIMIT 10"
    )
    naive_s = [
        timed(lambda q=q: con.execute(sql, [q.tolist(), files]).fetchall())[0] for q in queries[: plan.naive_queries]
    ]
    hashes = pq.read_table(files, columns=["content_hash"])["content_hash"]
    half = min(CHECK_BATCH // 2, rows)
    fresh = pa.array([f"{i:064x}" for i in range(half)])
    done_some = timed(lambda: store.done_keys(model, pa.concat_arrays([hashes.slice(0, half).combine_chunks(), fresh])))
    done_all = timed(lambda: store.done_keys(model, hashes))
    if int(done_all[1].sum()) != rows or int(done_some[1].sum()) != half:
        raise BenchError("Store.done_keys did not find the committed rows")
    return {
        "rows": rows,
        "dim": RETRIEVAL_DIM,
        "k": TOP_K,
        "search_first_call_s": round(cold, 3),
        "search_ms": percentiles(search_s),
        "numpy_ms": percentiles(numpy_s),
        "naive_duckdb_ms": percentiles(naive_s),
        "done_keys_s": {"batch": 2 * half, "half_new": round(done_some[0], 3), "all_rows": round(done_all[0], 3)},
    }


def measure_index(rows: int, plan: Plan, work: Path) -> dict:
    """The HNSW index (`mmembed index`) against exact search over `rows` clustered 512-d vectors:
    build time and size, top-10 latency both ways, recall@10 of the index."""
    from storage.index import index_path
    from storage.search import build_index, search

    rng = np.random.default_rng(rows + 1)
    centres = rng.standard_normal((INDEX_CLUSTERS, RETRIEVAL_DIM), dtype=np.float32)
    root = work / "stores" / f"clustered-{rows}"
    log(f"index: writing {rows} clustered vectors, building the HNSW index")
    model = write_vector_store(root, rows, rng, centres=centres)
    build_s, _ = timed(lambda: build_index(str(root)))
    queries = around(centres, plan.queries, rng)
    cold, _ = timed(lambda: search(str(root), queries[0], "image", model, k=TOP_K))
    hnsw_s, exact_s, found = [], [], 0
    for q in queries:
        seconds, got = timed(lambda q=q: search(str(root), q, "image", model, k=TOP_K))
        hnsw_s.append(seconds)
        seconds, want = timed(lambda q=q: search(str(root), q, "image", model, k=TOP_K, use_index=False))
        exact_s.append(seconds)
        found += len(set(got["id"].to_pylist()) & set(want["id"].to_pylist()))
    return {
        "rows": rows,
        "dim": RETRIEVAL_DIM,
        "k": TOP_K,
        "clusters": INDEX_CLUSTERS,
        "build_s": round(build_s, 2),
        "index_mb": round(index_path(Store(str(root)), "image", model).stat().st_size / 1e6, 1),
        "first_call_s": round(cold, 3),
        "hnsw_ms": percentiles(hnsw_s),
        "exact_ms": percentiles(exact_s),
        "recall_at_10": round(found / (TOP_K * len(queries)), 4),
    }


# -- jobs in a subprocess -------------------------------------------------------------------


def cli_job(dataset: Path, root: Path, models: dict[str, str], dtype: str = "float32") -> dict:
    """`mmembed embed DATASET ROOT` in a fresh process (a fresh Ray): seconds end to end, the job record, peak memory."""
    shutil.rmtree(root, ignore_errors=True)
    command = [sys.executable, "-m", "jobs.cli", "embed", str(dataset), str(root), "--json", f"--dtype={dtype}"]
    command += [f"--model={m}={name}" for m, name in models.items()]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as memory:
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise BenchError(
            f"{' '.join(command[1:4])} ... failed ({proc.returncode}): {stderr.strip().splitlines()[-1:] or ''}"
        )
    record = json.loads(stdout)
    return {
        "seconds": round(seconds, 2),
        "job_wall_s": record["stages_s"]["wall"],
        "stages_s": record["stages_s"],
        "peak_rss_mb": memory.peak_mb,
        "largest_at_peak": memory.largest(),
    }


def measure_memory(plan: Plan, work: Path) -> dict:
    out = {"method": PeakMemory.METHOD, "model": RSS_MODEL, "dtype": "float32", "jobs": []}
    for n in plan.rss_images:
        log(f"memory: a {n}-image {RSS_MODEL} job in a subprocess")
        dataset = write_dataset(work / "data" / f"image-{n}", {"image": n})
        out["jobs"].append({"images": n, **cli_job(dataset, work / "stores" / f"rss-{n}", {"image": RSS_MODEL})})
    small, large = out["jobs"]
    out["ratio"] = ratio(large["peak_rss_mb"], small["peak_rss_mb"])
    return out


def measure_fixed_cost(plan: Plan, work: Path) -> dict:
    """A 10-item job (4 images, 3 clips, 3 texts), `mmembed embed` end to end in a subprocess, Ray start included."""
    log("fixed cost: a 10-item job in a subprocess")
    dataset = write_dataset(work / "data" / "mixed-10", {"image": 4, "audio": 3, "text": 3})
    models = {"image": plan.clip_name, "audio": MODELS["audio"], "text": MODELS["text"]}
    return {"items": 10, "models": models, **cli_job(dataset, work / "stores" / "mixed-10", models)}


def measure_int8_recall() -> dict:
    """The demo's queries over the bundled sample set, every item and query encoded in int8 and in float32 (no Ray,
    no store): the mean share of each query's float32 top 10 that its int8 top 10 finds."""
    from ..demo import TEXT_TO_IMAGE
    from ..samples import SAMPLE_DIR

    corpora = {  # model, modality: the items, then (query modality, query) pairs
        ("shapes-clip", "image"): (sorted((SAMPLE_DIR / "shapes").glob("*.png")), [("text", q) for q in TEXT_TO_IMAGE]
                                   + [("image", SAMPLE_DIR / "shapes" / "red_circle_0.png")]),
        ("whisper-tiny.en", "audio"): (sorted((SAMPLE_DIR / "speech").glob("*.flac")),
                                       [("audio", SAMPLE_DIR / "speech" / "rocket_us.flac")]),
        ("minilm-l6", "text"): (sorted((SAMPLE_DIR / "texts").glob("*.txt")), [("text", "a cat with orange fur")]),
    }  # fmt: skip
    recalls = []
    for (model, modality), (files, queries) in corpora.items():
        raws = [f.read_text() if modality == "text" else f.read_bytes() for f in files]
        tops = {}
        for dtype in ("float32", "int8"):
            encoder = load_encoder(model, Options(device="cpu", dtype=dtype))
            items = encoder.encode(modality, raws)
            queried = [encoder.encode(kind, [q.read_bytes() if isinstance(q, Path) else q])[0] for kind, q in queries]
            tops[dtype] = [set(np.argsort(-(items @ q))[:TOP_K]) for q in queried]
        recalls += [len(a & b) / TOP_K for a, b in zip(tops["float32"], tops["int8"])]
    return {"queries": len(recalls), "recall_at_10": sig(float(np.mean(recalls))), "min": sig(min(recalls))}


def measure_clap(plan: Plan, work: Path) -> dict:
    """CLAP audio clips/s, ours against transformers' ClapModel (the bench's clips, LAION's unfused audio tower with
    random weights: `jobs.bench.clap.bench_audio`)."""
    from .clap import BENCH_TEXT, bench_audio, write_reference

    n = plan.baseline_items["audio"]
    clips = read_items(write_dataset(work / "data" / f"audio-{plan.n['audio']}", {"audio": plan.n["audio"]}), limit=n)
    src = None
    if plan.clap:
        src = write_reference(work / "models" / "clap", plan.clap["audio"], BENCH_TEXT, plan.clap["features"])
    result = bench_audio(clips, src, device=device_name())
    return {k: sig(v) if isinstance(v, float) else v for k, v in result.items()}
