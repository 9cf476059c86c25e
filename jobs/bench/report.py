"""The result document's summary (ratios and targets) and its reports: markdown tables and a PNG plot."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .plan import device_name, ratio


def machine() -> dict:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    device = device_name()
    return {
        "cpu": cpu,
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

    def rate(modality, kind, dtype="float32"):
        if modality not in m:
            return None
        part = m[modality][kind]
        return part["items_per_s"] if kind == "baseline" else part[dtype]["items_per_s"]

    retrieval = result.get("retrieval") or []
    largest = retrieval[-1] if retrieval else None
    memory, fixed = result.get("memory"), result.get("fixed_cost")
    rss = memory["ratio"] if memory else None
    result["ratios"] = {
        "image_fp32_vs_hf": ratio(rate("image", "pipeline"), rate("image", "baseline")),
        "image_fp32_vs_bare": ratio(rate("image", "pipeline"), rate("image", "bare")),
        "image_bf16_vs_hf_fp32": ratio(rate("image", "pipeline", "bfloat16"), rate("image", "baseline")),
        "image_bf16_vs_bare_bf16": ratio(rate("image", "pipeline", "bfloat16"), rate("image", "bare", "bfloat16")),
        "audio_trimmed_vs_hf": ratio(rate("audio", "pipeline"), rate("audio", "baseline")),
        "audio_fp32_vs_bare": ratio(rate("audio", "pipeline"), rate("audio", "bare")),
        "text_fp32_vs_st": ratio(rate("text", "pipeline"), rate("text", "baseline")),
        "text_bf16_vs_st": ratio(rate("text", "pipeline", "bfloat16"), rate("text", "baseline")),
        "text_fp32_vs_bare": ratio(rate("text", "pipeline"), rate("text", "bare")),
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
    cos = m.get("image", {}).get("cosine_min", {}).get("bfloat16_vs_float32")
    r, lat = result["ratios"], result["latency_ms"]
    checks = [
        ("image fp32 pipeline / bare forward", r["image_fp32_vs_bare"], ">=", 0.85),
        ("image fp32 pipeline / HF", r["image_fp32_vs_hf"], ">=", 1.2),
        ("image bf16 pipeline / HF fp32", r["image_bf16_vs_hf_fp32"], ">=", 2.5),
        ("image bf16 cosine to fp32 (min)", cos, ">=", 0.999),
        ("audio trimmed pipeline / HF (30 s)", r["audio_trimmed_vs_hf"], ">=", 6.0),
        ("text fp32 pipeline / sentence-transformers", r["text_fp32_vs_st"], ">=", 1.0),
        ("text bf16 pipeline / sentence-transformers", r["text_bf16_vs_st"], ">=", 2.0),
        ("query top-10 p50 (ms) over the largest store", lat["query_1m_p50"], "<=", 100.0),
        ("query: naive DuckDB / search", r["query_1m_vs_naive"], ">=", 10.0),
        ("peak memory large / small image job", rss, "<=", 1.3),
        ("10-item job end to end (s)", lat["job_10_items_s"], "<=", 15.0),
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


def markdown(result: dict) -> str:
    """The result as markdown tables: throughput, stages, sweep, retrieval, memory and fixed cost, targets."""
    mach = result["machine"]
    lines = [
        f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} ({mach['torch_threads']} threads), device {mach['device']}"
        f"{' ' + mach['gpu'] if mach['gpu'] else ''}; load average (1, 5, 15 min) at start {mach['load_avg_at_start']}, "
        f"at end {mach.get('load_avg_at_end')}. "
        f"{'Quick run. ' if result['quick'] else ''}Total {result['total_s']} s.",
        "",
    ]
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
        rows = [
            [
                mod,
                r["preprocess_costs"]["decode_ms"],
                r["preprocess_costs"]["preprocess_ms"],
                *(f"{c:.5f}" for c in r["cosine_min"].values()),
                *[""] * (3 - len(r["cosine_min"])),
            ]
            for mod, r in m.items()
        ]
        lines += [
            "",
            "Per item on one thread (ms), and the lowest cosine per pair (audio: the baseline against our padded mode, "
            "and against CTranslate2's own encoder with the same weights):",
            "",
        ]
        lines += _table(
            [
                "modality",
                "decode",
                "decode + preprocess",
                "cosine bf16 vs fp32",
                "cosine vs baseline",
                "baseline vs CTranslate2",
            ],
            rows,
        )
        lines.append("")
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


def plot(result: dict, path: Path) -> Path:
    """A PNG: per modality, items/s of each way of embedding relative to the reference baseline; then the sweep."""
    bars = [
        ("pipeline fp32", (31, 119, 180)),
        ("pipeline bf16", (255, 127, 14)),
        ("bare fp32", (44, 160, 44)),
        ("bare bf16", (214, 39, 40)),
    ]
    m = result["modalities"]
    sweep = [p for p in result.get("sweep") or [] if "items_per_s" in p]
    width, panel = 900, 320
    canvas = Image.new("RGB", (width, panel * (1 + bool(sweep)) + 60), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    draw.text((10, 8), "items/s relative to the reference baseline (= 1, dashed)", fill="black", font=font)
    values = {
        mod: [
            r["pipeline"]["float32"]["items_per_s"],
            r["pipeline"]["bfloat16"]["items_per_s"],
            r["bare"]["float32"]["items_per_s"],
            r["bare"]["bfloat16"]["items_per_s"],
        ]
        for mod, r in m.items()
    }
    rel = {mod: [v / m[mod]["baseline"]["items_per_s"] for v in vs] for mod, vs in values.items()}
    top = max([1.0, *(v for vs in rel.values() for v in vs)]) * 1.1
    x0, y0, y1 = 60, 40, panel
    scale = (y1 - y0 - 30) / top
    draw.line((x0, y1, width - 20, y1), fill="black")
    group = (width - x0 - 40) / max(len(rel), 1)
    for g, (mod, vs) in enumerate(rel.items()):
        gx = x0 + g * group + 20
        for b, v in enumerate(vs):
            bx = gx + b * (group - 40) / len(vs)
            draw.rectangle((bx, y1 - v * scale, bx + (group - 40) / len(vs) - 6, y1), fill=bars[b][1])
            draw.text((bx, y1 - v * scale - 16), f"{v:.2f}", fill="black", font=font)
        draw.text((gx, y1 + 4), mod, fill="black", font=font)
    for x in range(x0, width - 20, 12):
        draw.line((x, y1 - scale, x + 6, y1 - scale), fill="gray")
    for b, (name, colour) in enumerate(bars):
        draw.rectangle((width - 170, 30 + 18 * b, width - 158, 42 + 18 * b), fill=colour)
        draw.text((width - 152, 28 + 18 * b), name, fill="black", font=font)
    if sweep:
        y0, y1 = panel + 70, 2 * panel + 30
        draw.text((10, y0 - 20), "image pipeline fp32 items/s by actors x batch x threads", fill="black", font=font)
        top = max(p["items_per_s"] for p in sweep) * 1.15
        scale = (y1 - y0 - 20) / top
        step = (width - x0 - 40) / len(sweep)
        draw.line((x0, y1, width - 20, y1), fill="black")
        for i, p in enumerate(sweep):
            bx = x0 + i * step + 10
            draw.rectangle((bx, y1 - p["items_per_s"] * scale, bx + step - 30, y1), fill=bars[0][1])
            draw.text((bx, y1 - p["items_per_s"] * scale - 16), f"{p['items_per_s']:.1f}", fill="black", font=font)
            draw.text((bx, y1 + 4), f"{p['actors']}a b{p['batch']} t{p['threads'] or 'auto'}", fill="black", font=font)
    canvas.save(path)
    return path


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
