"""The GPU check (`python -m jobs.bench.gpu`) in its CPU mode, where neither Ray, DuckDB nor an audio decoder is
importable, as on the device machine: every section runs and our encoders match transformers' on the same weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
ABSENT = ("soundfile", "soxr", "ray", "duckdb", "librosa")  # not on the device machine's image


def test_the_gpu_check_runs_without_ray_duckdb_or_an_audio_decoder(tmp_path):
    out = tmp_path / "gpu.json"
    code = (f"import sys, runpy\nfor n in {ABSENT!r}: sys.modules[n] = None\n"
            f"sys.argv = ['gpu', '--out', {str(out)!r}]\nrunpy.run_module('jobs.bench.gpu', run_name='__main__')")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["bf16_gemm_gflops"] > 0
    assert [r["model"] for r in result["encoders"]] == ["ViT (tiny)", "MiniLM", "Whisper tiny"]
    for row in result["encoders"]:
        for dtype in ("float32", "bfloat16"):
            assert row[f"ours_{dtype}_items_per_s"] > 0 and row[f"reference_{dtype}_items_per_s"] > 0, row
            assert row[f"ours_{dtype}_share_of_bf16_peak"] > 0
        assert row["cosine_ours_vs_reference_cpu_fp32"] >= 0.9999, row
        assert row["cosine_float32_vs_cpu_fp32"] >= 0.9999 and row["cosine_bfloat16_vs_cpu_fp32"] >= 0.999, row
    assert result["jpeg"]["cpu_jpeg_per_s"] > 0 and result["jpeg"]["gpu_jpeg_per_s"] is None
