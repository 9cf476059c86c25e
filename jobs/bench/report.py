"""The result document's summary (ratios and targets) and its reports: markdown tables and a PNG plot."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from .peak import cpu_info
from .plan import device_name, ratio
from .plot import plot


def machine() -> dict:
    """What the figures were measured on: CPU model and instruction sets, cores, threads, device, versions, load."""
    import torch

    cpu = cpu_info()
    device = device_name()
    return {
        "cpu": cpu["model"] or platform.processor(),
        "cpu_family_model": cpu["family_model"],
        "instruction_sets": cpu["instruction_sets"],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def summarize(result: dict) -> None:
    """Add the `ratios`, `latency_ms`, `peak_rss_ratio_20k_vs_2k` and `targets` sections to `result`."""
    m = result["modalities"]

    def get(modality: str, *path):
        value = m.get(modality)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def rate(modality, kind, dtype="float32"):
        return get(modality, kind, "items_per_s") if kind == "baseline" else get(modality, kind, dtype, "items_per_s")

    retrieval = result.get("retrieval") or []
    largest = retrieval[-1] if retrieval else None
    memory, fixed = result.get("memory"), result.get("fixed_cost")
    rss = memory["ratio"] if memory else None
    result["ratios"] = {
        "image_fp32_vs_hf": ratio(rate("image", "pipeline"), rate("image", "baseline")),
        "image_bf16_vs_hf_fp32": ratio(rate("image", "pipeline", "bfloat16"), rate("image", "baseline")),
        "audio_trimmed_vs_hf": ratio(rate("audio", "pipeline"), rate("audio", "baseline")),
        "text_fp32_vs_st": ratio(rate("text", "pipeline"), rate("text", "baseline")),
        "text_bf16_vs_st": ratio(rate("text", "pipeline", "bfloat16"), rate("text", "baseline")),
        **{f"{mod}_fp32_vs_bare": ratio(rate(mod, "pipeline"), rate(mod, "bare")) for mod in m},
        **{f"{mod}_steady_vs_bare": get(mod, "steady_vs_bare") for mod in m},
        **{f"{mod}_int8_vs_fp32_bare": ratio(rate(mod, "bare", "int8"), rate(mod, "bare")) for mod in m},
        "query_1m_vs_naive": ratio(largest["naive_duckdb_ms"]["p50"], largest["search_ms"]["p50"]) if largest else None,
        "peak_rss_ratio_20k_vs_2k": rss,
    }
    result["latency_ms"] = {
        "query_1m_p50": largest["search_ms"]["p50"] if largest else None,
        "query_1m_rows": largest["rows"] if largest else None,  # 100k in --quick
        "job_10_items_s": fixed["seconds"] if fixed else None,  # seconds, despite the section's name
        "query_hnsw_p50": result["index"]["hnsw_ms"]["p50"] if result.get("index") else None,
    }
    result["peak_rss_ratio_20k_vs_2k"] = rss
    result["peak_rss_images"] = list(result["plan"]["rss_images"]) if memory else None  # (200, 2000)-style in --quick
    r, vnni = result["ratios"], result["peak"]["int8"]["gflops"] is not None
    bf16 = result["peak"]["bfloat16"]["gflops"] is not None
    checks = [
        ("bare ViT-B/32 fp32 / fp32 peak", get("image", "bare", "float32", "share_of_peak"), ">=", 0.85),
        (
            "bare ViT-B/32 bf16 / bf16 peak",
            get("image", "bare", "bfloat16", "share_of_peak") if bf16 else None,
            ">=",
            0.75,
        ),
        ("bare MiniLM fp32 / fp32 peak", get("text", "bare", "float32", "share_of_peak"), ">=", 0.70),
        ("image pipeline fp32 / bare", r.get("image_fp32_vs_bare"), ">=", 0.85),
        ("audio pipeline fp32 / bare", r.get("audio_fp32_vs_bare"), ">=", 0.85),
        ("text pipeline fp32 / bare", r.get("text_fp32_vs_bare"), ">=", 0.80),
        *((f"{mod} pipeline steady state / bare", r.get(f"{mod}_steady_vs_bare"), ">=", 0.95) for mod in m),
        ("image fp32 pipeline / HF", r["image_fp32_vs_hf"], ">=", 1.2),
        ("text fp32 pipeline / sentence-transformers", r["text_fp32_vs_st"], ">=", 1.2),
        ("audio trimmed pipeline / HF (30 s)", r["audio_trimmed_vs_hf"], ">=", 8.0),
        ("image bf16 cosine to fp32 (min)", get("image", "cosine_min", "bfloat16_vs_float32"), ">=", 0.999),
        *((f"{mod} int8 cosine to fp32 (min)", get(mod, "cosine_min", "int8_vs_float32"), ">=", 0.995) for mod in m),
        *((f"{mod} bare int8 / fp32", r.get(f"{mod}_int8_vs_fp32_bare") if vnni else None, ">=", 2.0) for mod in m),
        (
            "demo queries: int8 recall@10 against fp32",
            (result.get("int8_recall") or {}).get("recall_at_10"),
            ">=",
            0.98,
        ),
        ("query: naive DuckDB / search", r["query_1m_vs_naive"], ">=", 10.0),
        ("peak memory large / small image job", rss, "<=", 1.3),
        *(
            (f"transcribe {length}: ours fp32 / faster-whisper fp32", x["fp32_vs_faster_whisper"], ">=", 1.0)
            for length, x in (result.get("transcribe") or {}).items()
        ),
        (
            "serve: text search p50 at the client (ms)",
            (result.get("serve") or {}).get("client_ms", {}).get("p50"),
            "<=",
            50.0,
        ),
    ]
    result["targets"] = [
        {
            "target": name,
            "value": value,
            "goal": f"{op} {goal}",
            "met": None if value is None else (value >= goal if op == ">=" else value <= goal),
        }
        for name, value, op, goal in checks
    ]


# -- reports --------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows),
    ]


def _peak_lines(result: dict) -> list[str]:
    """The encoders against the machine's GEMM peak, and the pipeline's losses against the bare forward."""
    peak, m = result["peak"], result["modalities"]
    lines = ["### Against the machine's own limit", ""]
    lines += [
        "GEMM peak (GFLOP/s, best over the shapes and paths of `jobs/bench/peak.py`): "
        + ", ".join(
            f"{d} {p['gflops'] if p['gflops'] is not None else 'not measured (' + p['note'] + ')'}"
            for d, p in peak.items()
        ),
        "",
    ]
    rows = []
    for mod, r in m.items():
        for dtype, b in r["bare"].items():
            rows.append([mod, dtype, b.get("items_per_s"), b.get("gflops"), b.get("share_of_peak"), b.get("note", "")])
    lines += _table(["modality", "dtype", "bare items/s", "bare GFLOP/s", "share of peak", "note"], rows)
    rows = [
        [
            mod,
            r["startup_s"],
            r["pipeline"]["float32"]["encode_items_per_s"],
            r["steady_vs_bare"],
            ratio(r["pipeline"]["float32"]["items_per_s"], r["bare"]["float32"]["items_per_s"]),
        ]
        for mod, r in m.items()
    ]
    lines += [
        "",
        "The fp32 pipeline against the bare forward: start-up is the job's wall time less the encoder's own; "
        "the steady state is the encoder's speed inside the pipeline.",
        "",
    ]
    lines += _table(
        ["modality", "start-up s", "encoder items/s in the pipeline", "steady / bare", "end to end / bare"], rows
    )
    if result.get("clap"):
        x = result["clap"]
        lines += [
            "",
            f"CLAP audio ({x['clips']} clips, batch {x['batch_size']}, {x['dtype']}): ours {x['clips_per_s_ours']} clips/s, "
            f"transformers' ClapModel {x['clips_per_s_reference']}: {x['speedup']}x; lowest cosine {x['min_cosine']}.",
            "",
        ]
    for length, x in (result.get("transcribe") or {}).items():
        lines += [
            "",
            f"Transcription, {x['clips']} clips of {length} ({x['audio_s']} s of speech), {x['threads']} threads:",
            "",
        ]
        lines += _table(
            ["system", "clips/s", "best s", "CPU s", "word error rate"],
            [[name, s["clips_per_s"], s["best_s"], s["best_cpu_s"], s["wer"]] for name, s in x["systems"].items()],
        )
        lines += ["", f"ours fp32 / faster-whisper fp32: {x['fp32_vs_faster_whisper']}", ""]
    if result.get("serve"):
        x = result["serve"]
        lines += [
            "",
            f"Search page API: a text search over {x['rows']} x {x['dim']} vectors, {x['queries']} queries, model "
            f"warm: p50 {x['client_ms']['p50']} ms at the client (library {x['library_ms']['p50']}, encoding "
            f"{x['encode_ms']['p50']}, search {x['search_ms']['p50']}).",
            "",
        ]
    if result.get("int8_recall"):
        x = result["int8_recall"]
        lines += [
            "",
            f"int8: the demo's {x['queries']} queries find {x['recall_at_10']} of their float32 top 10 (lowest {x['min']}).",
            "",
        ]
    return lines + [""]


def markdown(result: dict) -> str:
    """The result as markdown tables: throughput, stages, sweep, retrieval, memory and fixed cost, targets."""
    mach = result["machine"]
    lines = [
        f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} threads), device {mach['device']}"
        f"{' ' + mach['gpu'] if mach['gpu'] else ''}; load average (1, 5, 15 min) at start {mach['load_avg_at_start']}, "
        f"at end {mach.get('load_avg_at_end')}. "
        f"Instruction sets: {', '.join(mach.get('instruction_sets') or ['?'])} (CPU family/model {mach.get('cpu_family_model')}). "
        f"Started {result['started_at']}. Total {result['total_s']} s.",
        "",
    ]
    if result["quick"]:
        lines += ["**Quick run: a smoke test of every section at small sizes. Its ratios are not measurements.**", ""]
    m = result["modalities"]
    if m:
        lines += ["### Pipeline throughput (items/s)", ""]
        rows = [
            [
                mod,
                r["model"],
                r["items"],
                r["pipeline"]["float32"]["items_per_s"],
                r["pipeline"]["bfloat16"]["items_per_s"],
                r["baseline"]["items_per_s"],
                r["bare"]["float32"]["items_per_s"],
                r["bare"]["bfloat16"]["items_per_s"],
                ratio(r["pipeline"]["float32"]["items_per_s"], r["baseline"]["items_per_s"]),
                ratio(r["pipeline"]["bfloat16"]["items_per_s"], r["baseline"]["items_per_s"]),
                ratio(r["pipeline"]["float32"]["items_per_s"], r["bare"]["float32"]["items_per_s"]),
            ]
            for mod, r in m.items()
        ]
        lines += _table(
            [
                "modality",
                "model",
                "N",
                "pipeline fp32",
                "pipeline bf16",
                "baseline fp32",
                "bare fp32",
                "bare bf16",
                "fp32 / baseline",
                "bf16 / baseline",
                "fp32 / bare",
            ],
            rows,
        )
        lines += ["", "Baselines: " + "; ".join(f"{mod}: {r['baseline']['what']}" for mod, r in m.items()) + ".", ""]
        lines += ["### Pipeline stages (seconds; preprocess/encode/write are summed task time)", ""]
        rows = [
            [
                mod,
                dtype,
                p["stages_s"].get("wall"),
                p["stages_s"].get("list"),
                p["stages_s"].get("preprocess_s"),
                p["stages_s"].get("encode_s"),
                p["stages_s"].get("write_s"),
                p["encode_items_per_s"],
                p["peak_rss_mb"],
            ]
            for mod, r in m.items()
            for dtype, p in r["pipeline"].items()
        ]
        lines += _table(
            ["modality", "dtype", "wall", "list", "preprocess", "encode", "write", "encode items/s", "peak memory MB"],
            rows,
        )
        pairs = list(dict.fromkeys(k for r in m.values() for k in r["cosine_min"]))
        rows = [
            [
                mod,
                r["preprocess_costs"]["decode_ms"],
                r["preprocess_costs"]["preprocess_ms"],
                *(f"{r['cosine_min'][k]:.5f}" if k in r["cosine_min"] else None for k in pairs),
            ]
            for mod, r in m.items()
        ]
        lines += [
            "",
            "Per item on one thread (ms), and the lowest cosine per pair (audio: the baseline against our padded mode, "
            "and against CTranslate2's own encoder with the same weights):",
            "",
        ]
        lines += _table(["modality", "decode", "decode + preprocess", *(f"cosine {k}" for k in pairs)], rows)
        lines.append("")
        lines += _peak_lines(result)
    if result.get("sweep"):
        lines += [
            "### Image pipeline sweep (fp32): actors x batch x threads per actor (0 = auto: the node's CPUs shared by the actors)",
            "",
        ]
        lines += _table(
            ["actors", "batch", "threads", "items/s", "encode items/s", "peak memory MB", "note"],
            [
                [
                    p["actors"],
                    p["batch"],
                    p["threads"],
                    p.get("items_per_s"),
                    p.get("encode_items_per_s"),
                    p.get("peak_rss_mb"),
                    p.get("skipped", ""),
                ]
                for p in result["sweep"]
            ],
        )
        lines.append("")
    if result.get("retrieval"):
        lines += ["### Retrieval: top-10 over random 512-d unit vectors (ms)", ""]
        lines += _table(
            [
                "rows",
                "search p50",
                "search p95",
                "numpy p50",
                "naive DuckDB p50",
                "naive / search",
                "search first call (s)",
                "done_keys 20k, half new (s)",
                "done_keys all rows (s)",
            ],
            [
                [
                    r["rows"],
                    r["search_ms"]["p50"],
                    r["search_ms"]["p95"],
                    r["numpy_ms"]["p50"],
                    r["naive_duckdb_ms"]["p50"],
                    ratio(r["naive_duckdb_ms"]["p50"], r["search_ms"]["p50"]),
                    r["search_first_call_s"],
                    r["done_keys_s"]["half_new"],
                    r["done_keys_s"]["all_rows"],
                ]
                for r in result["retrieval"]
            ],
        )
        lines.append("")
    if result.get("index"):
        x = result["index"]
        lines += [
            f"### HNSW index (`mmembed index`) vs exact search: top-10 over {x['rows']} 512-d vectors in {x['clusters']} clusters",
            "",
        ]
        lines += _table(
            [
                "build (s)",
                "index MB",
                "HNSW p50 (ms)",
                "HNSW p95",
                "exact p50",
                "exact p95",
                "recall@10",
                "first call (s)",
            ],
            [
                [
                    x["build_s"],
                    x["index_mb"],
                    x["hnsw_ms"]["p50"],
                    x["hnsw_ms"]["p95"],
                    x["exact_ms"]["p50"],
                    x["exact_ms"]["p95"],
                    x["recall_at_10"],
                    x["first_call_s"],
                ]
            ],
        )
        lines.append("")
    if result.get("memory"):
        mem, fixed = result["memory"], result["fixed_cost"]
        lines += ["### Memory and fixed cost (subprocess `mmembed embed`, fresh Ray)", ""]
        rows = [[f"{j['images']} images", j["seconds"], j["job_wall_s"], j["peak_rss_mb"]] for j in mem["jobs"]]
        rows.append(
            [
                f"{fixed['items']} items (4 image, 3 audio, 3 text)",
                fixed["seconds"],
                fixed["job_wall_s"],
                fixed["peak_rss_mb"],
            ]
        )
        lines += _table(["job", "seconds end to end", "job wall (s)", "peak memory MB"], rows)
        lines += [
            "",
            f"Image jobs with {mem['model']} in {mem['dtype']}. Peak memory ratio large / small: {mem['ratio']}. Method: {mem['method']}.",
            "",
        ]
    lines += ["### Targets", ""]
    lines += _table(
        ["target", "value", "goal", "met"], [[t["target"], t["value"], t["goal"], t["met"]] for t in result["targets"]]
    )
    return "\n".join(lines) + "\n"


def write_reports(result: dict, out: Path, json_path: Path | None) -> dict[str, Path]:
    """bench.json, bench.md and bench.png under `out` (and the JSON at `json_path` too)."""
    text = json.dumps(result, indent=1)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    paths["json"].write_text(text + "\n")
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["plot"])
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
    return paths
