"""`mmembed bench` end to end at toy sizes (a tiny CLIP, a handful of items, small vector stores):
every section runs, the JSON has the keys the issue names, the ratios are real numbers, the
baselines compute what our encoders compute. No timing is asserted: the machine is shared."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import ray
import soundfile as sf
from PIL import Image

from encoders import audio
from jobs.bench import data, main, memory, plan, report
from pipelines.embed import FREE_CPUS, MIN_ACTOR_CPUS

TINY_CLIP = {
    "projection_dim": 16,
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    },
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 16,
    },
}
# a CLAP audio tower of the real structure, tiny (two Swin stages), with its feature extractor's settings
TINY_CLAP = {
    "audio": dict(spec_size=192, num_mel_bins=32, patch_size=6, patch_stride=[4, 4], window_size=5,
                  patch_embeds_hidden_size=6, depths=[2, 2], num_attention_heads=[2, 3], hidden_size=12),
    "features": dict(feature_size=32, frequency_min=50, frequency_max=14_000, truncation="rand_trunc"),
}  # fmt: skip
PLAN = plan.Plan(
    n={"image": 4, "audio": 2, "text": 6},
    clip=TINY_CLIP,
    clip_name="bench-clip-tiny",
    sweep=((1, 2, 1), (64, 2, 1)),
    sweep_images=4,
    query_rows=(300, 1000),
    index_rows=500,
    queries=3,
    naive_queries=2,
    rss_images=(2, 4),
    bare_reps=1,
    peak_shapes=((64, 32, 32), (64, 32, 128)),
    serve_rows=500,
    transcribe_clips=(2, 0),
    clap=TINY_CLAP,
    quick=True,
)
RATIOS = (
    "image_fp32_vs_hf",
    "image_fp32_vs_bare",
    "image_bf16_vs_hf_fp32",
    "audio_trimmed_vs_hf",
    "text_fp32_vs_st",
    "text_bf16_vs_st",
    "query_1m_vs_naive",
    "peak_rss_ratio_20k_vs_2k",
)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("bench")
    result = main.measure(PLAN, out)
    return out, result, report.write_reports(result, out, out / "copy" / "result.json")


def test_json_has_the_issue_keys_with_positive_finite_values(result):
    _, doc, _ = result
    assert set(RATIOS) <= set(doc["ratios"])
    for key in RATIOS:
        assert positive(doc["ratios"][key]), (key, doc["ratios"][key])
    assert positive(doc["latency_ms"]["query_1m_p50"]) and positive(doc["latency_ms"]["job_10_items_s"])
    assert doc["latency_ms"]["query_1m_rows"] == 1000, "the largest store stands in for 1M rows, and says so"
    assert doc["peak_rss_ratio_20k_vs_2k"] == doc["ratios"]["peak_rss_ratio_20k_vs_2k"]
    assert doc["peak_rss_images"] == [2, 4]
    assert [t["met"] in (True, False) for t in doc["targets"]] == [True] * len(doc["targets"]), "every target evaluated"


def test_every_modality_is_measured_three_ways(result):
    _, doc, _ = result
    for modality, n in PLAN.n.items():
        m = doc["modalities"][modality]
        assert m["items"] == n
        for dtype in plan.DTYPES:
            run = m["pipeline"][dtype]
            assert run["items"] == n and positive(run["items_per_s"]) and positive(run["peak_rss_mb"])
            assert {"list", "preprocess_s", "encode_s", "write_s", "wall"} <= set(run["stages_s"])
        for dtype in plan.BARE_DTYPES:
            bare = m["bare"][dtype]
            assert positive(bare["items_per_s"]) and positive(bare["gflops"]) and positive(bare["share_of_peak"]), bare
            assert bare["gflops"] == pytest.approx(bare["items_per_s"] * bare["flops_per_item"] / 1e9, rel=1e-3)
        assert positive(m["baseline"]["items_per_s"]) and positive(m["startup_s"]) and positive(m["steady_vs_bare"])
        assert m["cosine_min"]["int8_vs_float32"] >= 0.995
    assert [(p["actors"], p["batch"], p["threads"]) for p in doc["sweep"]] == list(PLAN.sweep)
    for p in doc["sweep"]:
        # a pool too large to leave CPU for the tasks that feed it is refused, and the point says why
        spare = ray.cluster_resources()["CPU"] - FREE_CPUS
        too_many = spare > 0 and p["actors"] * MIN_ACTOR_CPUS > spare
        assert ("skipped" in p) == too_many and (not too_many or "too many" in p["skipped"]), p
        assert "skipped" in p or positive(p["items_per_s"])


def test_the_peak_is_the_best_gemm_of_each_dtype(result):
    _, doc, _ = result
    for dtype in plan.BARE_DTYPES:
        peak = doc["peak"][dtype]
        assert {tuple(p["shape"]) for p in peak["points"]} == set(PLAN.peak_shapes)
        assert peak["gflops"] == max(p["gflops"] for p in peak["points"]) > 0
    paths = {p["path"] for p in doc["peak"]["float32"]["points"]}
    assert paths == {"torch.matmul (MKL)", "oneDNN linear"}
    assert doc["machine"]["instruction_sets"] and "avx2" in doc["machine"]["instruction_sets"]
    assert doc["int8_recall"]["queries"] == 7 and doc["int8_recall"]["recall_at_10"] >= 0.98


def test_flops_are_counted_from_the_dims():
    """ViT-B/32 at 224 px: 4.4 G multiply-adds an image (OpenCLIP's model table lists 4.41 "GFLOPs", counting a
    multiply-add as one), 8.8 GFLOPs as the bench counts them."""
    from types import SimpleNamespace

    from encoders.clip import CLIPDims
    from jobs.bench.peak import flops_per_item

    dims = CLIPDims(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                    vision_mlp=3072, context_length=77, vocab_size=49408, text_width=512, text_layers=12, text_heads=8,
                    text_mlp=2048, eos_token_id=49407)  # fmt: skip
    flops = flops_per_item(SimpleNamespace(kind="clip", dims=dims), "image", None)
    assert 8.7e9 < flops < 8.9e9  # 4.4 G multiply-adds


def test_baselines_compute_what_our_encoders_compute(result):
    _, doc, _ = result
    m = doc["modalities"]
    assert m["image"]["cosine_min"]["float32_vs_baseline"] >= 0.9999, "CLIPModel from the same checkpoint as our store"
    assert m["text"]["cosine_min"]["float32_vs_baseline"] >= 0.9999, "sentence-transformers on the same MiniLM"
    assert m["audio"]["cosine_min"]["baseline_vs_ctranslate2"] >= 0.9999, (
        "transformers' encoder with tiny.en's weights, mapped from model.bin by a table of its own, computes what "
        "CTranslate2's encoder computes"
    )
    assert m["audio"]["cosine_min"]["baseline_vs_ours_padded"] >= 0.9999, "and so does ours, in padded mode"
    for modality in m:
        assert m[modality]["cosine_min"]["bfloat16_vs_float32"] >= 0.999, (modality, "the bf16 target")


def test_transcription_is_measured_against_faster_whisper(result):
    _, doc, _ = result
    x = doc["transcribe"]["5s"]
    systems = {"ours float32", "ours bfloat16", "faster-whisper float32", "faster-whisper int8"}
    assert x["clips"] == 2 and set(x["systems"]) == systems
    assert all(positive(s["clips_per_s"]) and 0 <= s["wer"] <= 1 for s in x["systems"].values())
    assert x["systems"]["ours float32"]["wer"] == x["systems"]["faster-whisper float32"]["wer"], "the same tokens"
    assert "60s" not in doc["transcribe"]


def test_clap_and_the_search_page_are_measured(result):
    _, doc, _ = result
    clap = doc["clap"]
    assert (
        clap["clips"] == PLAN.n["audio"]
        and positive(clap["clips_per_s_ours"])
        and positive(clap["clips_per_s_reference"])
    )
    assert clap["min_cosine"] >= 0.9999, "the same CLAP in both loops"
    serve = doc["serve"]
    assert serve["rows"] == 500 and 0 < serve["client_ms"]["p50"] <= serve["client_ms"]["p95"]


def test_retrieval_memory_and_fixed_cost(result):
    _, doc, _ = result
    assert [r["rows"] for r in doc["retrieval"]] == [300, 1000]
    for r in doc["retrieval"]:
        for method in ("search_ms", "numpy_ms", "naive_duckdb_ms"):
            assert 0 < r[method]["p50"] <= r[method]["p95"]
    x = doc["index"]
    assert x["rows"] == 500 and x["build_s"] > 0 and x["index_mb"] > 0 and x["recall_at_10"] >= 0.9, x
    assert 0 < x["hnsw_ms"]["p50"] <= x["hnsw_ms"]["p95"] and 0 < x["exact_ms"]["p50"] <= x["exact_ms"]["p95"]
    assert doc["latency_ms"]["query_hnsw_p50"] == x["hnsw_ms"]["p50"]
    assert [j["images"] for j in doc["memory"]["jobs"]] == [2, 4]
    assert all(j["peak_rss_mb"] > 100 for j in doc["memory"]["jobs"]), (
        "a Ray job's process tree holds far more than 100 MB"
    )
    assert doc["fixed_cost"]["seconds"] >= doc["fixed_cost"]["job_wall_s"] > 0


def test_reports(result):
    out, doc, paths = result
    assert (
        json.loads(paths["json"].read_text())
        == json.loads(json.dumps(doc))
        == json.loads((out / "copy" / "result.json").read_text())
    )
    text = paths["markdown"].read_text()
    for heading in (
        "Pipeline throughput",
        "Pipeline stages",
        "sweep",
        "Retrieval",
        "HNSW index",
        "Memory and fixed cost",
        "Against the machine's own limit",
        "Quick run: a smoke test",
        "Targets",
    ):
        assert heading in text
    assert text.count("\n| ") >= 3 + 2 + 2 + 2 + 2 + 11
    with Image.open(paths["plot"]) as png:
        assert png.format == "PNG" and png.width == 900


def test_synthetic_media():
    images = list(data.generate("image", 6, seed=1))
    assert images == list(data.generate("image", 6, seed=1)), "the same seed gives the same dataset"
    assert len({raw for _, raw in images}) == 6
    for id_, raw in images:
        with Image.open(io.BytesIO(raw)) as img:
            assert id_.endswith(".jpg") and img.format == "JPEG" and img.size in plan.IMAGE_SIZES
            assert np.asarray(img).std() > 10, "varied content, not a flat colour"
    for id_, raw in data.generate("audio", 3):
        samples, rate = sf.read(io.BytesIO(raw))
        assert (
            id_.endswith(".flac")
            and rate == audio.SAMPLE_RATE
            and len(samples) == 5 * audio.SAMPLE_RATE
            and samples.ndim == 1
        )
        assert 0.1 < np.abs(samples).max() <= 1
    for _, text in data.generate("text", 20):
        assert 10 <= len(text.split()) <= 20


def test_write_dataset_is_raw_media_parquet(tmp_path):
    from pipelines.sources import open_input

    dataset = data.write_dataset(tmp_path / "mixed", {"image": 2, "audio": 1, "text": 3})
    inventory = open_input(str(dataset), str(tmp_path / "staging"))
    assert dict(inventory.counts) == {"image": 2, "audio": 1, "text": 3}
    items = data.read_items(dataset)
    assert sum(isinstance(i, str) for i in items) == 3 and sum(isinstance(i, bytes) for i in items) == 3
    assert data.write_dataset(tmp_path / "mixed", {"image": 5}) == dataset and len(data.read_items(dataset)) == 6, (
        "kept, not rebuilt"
    )


def test_peak_memory_counts_child_processes_and_shared_memory_once():
    private = "import numpy, time; a = numpy.ones(40_000_000); time.sleep(1.5)"  # 320 MB
    # 200 MB of shared memory (as in Ray's object store), mapped by this child and a grandchild
    shared = f"""
import mmap, os, subprocess, sys
path = "/dev/shm/mmembed-test-{os.getpid()}"
with open(path, "wb+") as f:
    f.truncate(200_000_000)
    m = mmap.mmap(f.fileno(), 0)
    m[::4096] = b"x" * len(range(0, len(m), 4096))  # every page, without a private copy
    reader = "import mmap, time; f = open(%r, 'rb'); m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); m[::4096]; time.sleep(1.5)"
    subprocess.run([sys.executable, "-c", reader % path], check=True)
os.unlink(path)
"""
    with memory.PeakMemory(interval=0.05) as before:
        pass
    with memory.PeakMemory(interval=0.05) as during:
        subprocess.run([sys.executable, "-c", private], check=True)
    assert during.peak - before.peak > 250 * 2**20
    with memory.PeakMemory(interval=0.05) as during:
        subprocess.run([sys.executable, "-c", shared], check=True)
    assert 190e6 < during.peak - before.peak < 300e6, "counted once, not once per process that maps it"


def test_arguments():
    from jobs.cli import build_parser

    args = build_parser().parse_args(
        ["bench", "--modality", "image", "--modality", "text", "--n", "5", "--quick", "--json", "r.json", "--out", "o"]
    )
    made = plan.make_plan(args.n, args.quick, tuple(args.modality))
    assert made.n == {"image": 5, "audio": 5, "text": 50} and made.modalities == ("image", "text")
    assert not made.whole_run, "retrieval, memory and the 10-item job run only when every modality does"
    assert (
        plan.make_plan(None, True).query_rows[-1] == 100_000 and plan.make_plan(None, False).query_rows[-1] == 1_000_000
    )
