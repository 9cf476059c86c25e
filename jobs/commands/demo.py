"""`mmembed demo` and `mmembed bench`: the embedded default end to end, and the throughput benchmark."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import MODALITIES, Parser, Subparsers, at_least, command


def demo_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "demo",
        demo,
        "the embedded default, end to end, on the bundled sample set",
        "mmembed demo --out demo-out",
        description="Embed the bundled sample media with the bundled models through the Ray pipeline, print "
        "text->image, image->image, audio->audio, text->text and SQL results, and draw a contact sheet.",
    )
    p.add_argument(
        "--out", default="demo-out", metavar="DIR", help="where the store and contact sheet go (default ./demo-out)"
    )
    return p


def demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(Path(args.out))
    return 0


def bench_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "bench",
        bench,
        "throughput benchmark: the pipeline vs the reference loop vs the bare forward",
        "mmembed bench --quick --json bench.json",
        description="Generate a synthetic raw-media dataset and measure, in one run, the mmembed pipeline, the "
        "Hugging Face / sentence-transformers baseline and the bare encoder forward, plus retrieval latency; writes "
        "JSON, a markdown table and a PNG plot (needs pip install 'mmembed[dev]').",
    )
    p.add_argument(
        "--modality",
        action="append",
        choices=MODALITIES,
        metavar="M",
        help="measure only this modality (repeatable; default all three, plus retrieval, memory and the 10-item job)",
    )
    p.add_argument(
        "--n",
        type=at_least(1),
        metavar="N",
        help="images and audio clips per run, 10x as many texts (default 1000; --quick 32)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes (100k-row retrieval, 16/64-image memory jobs): a few minutes"
    )
    p.add_argument(
        "--model",
        metavar="NAME",
        help="measure images with this converted CLIP, SigLIP or OpenCLIP model, "
        "against its own library's loop (default: a random ViT-B/32 CLIP)",
    )
    p.add_argument("--json", type=Path, metavar="F", help="also write the JSON result to F")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out"),
        metavar="DIR",
        help="datasets, stores and reports (bench.json, bench.md, bench.png); default ./bench-out",
    )
    return p


def bench(args: argparse.Namespace) -> int:
    from ..bench.main import run

    return run(args.modality, args.n, args.quick, args.out, args.json, args.model)
