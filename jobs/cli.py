"""The `mmembed` command: a thin layer over the library. Each command builds the library
object it needs and turns the library's own errors into one line on stderr, here only."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  mmembed embed ./media ./store                 embed a directory into a store
  mmembed query ./store --text "a red circle" --modality image -k 5
  mmembed sql ./store "SELECT modality, model, count(*) FROM embeddings GROUP BY ALL"
  mmembed encode minilm-l6 --text "hello world" --json
  mmembed demo                                  the bundled sample set, end to end

Progress and logs go to stderr; --json prints one JSON document on stdout."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `mmembed: error: ...` and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _example(text: str) -> dict:
    return {"epilog": "example:\n  " + text, "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> Parser:
    parser = Parser(
        prog="mmembed",
        description="Batch multimodal embedding: Ray Data pipelines into Parquet embedding tables, retrieval in DuckDB SQL.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)
    json_flag = Parser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    runtime = Parser(add_help=False)
    runtime.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="encoder compute dtype")
    runtime.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="encoder device (default: cuda when present)"
    )

    p = sub.add_parser(
        "embed",
        parents=[json_flag, runtime],
        help="embed a directory or Parquet dataset into a store",
        description="Embed every image, audio and text item of INPUT into the store at ROOT.",
        **_example("mmembed embed ./media ./store --model image=clip-b32 --model text=minilm-l6,clip-b32"),
    )
    p.add_argument(
        "input",
        metavar="INPUT",
        nargs="?",
        help="a directory (files routed by extension) or a raw-media Parquet file/directory",
    )
    p.add_argument(
        "root", metavar="ROOT", nargs="?", help="the store: a local directory or a pyarrow.fs URI (s3://...)"
    )
    p.add_argument("--config", metavar="F", help="YAML job config (see configs/default.yaml)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="MODALITY=NAME[,NAME]",
        help="models for a modality (repeatable)",
    )
    p.add_argument("--address", metavar="ADDR", help="run on an existing Ray cluster (HOST:PORT, ray://..., or auto)")
    p.add_argument(
        "--allow-local-root",
        action="store_true",
        help="allow a local ROOT on a multi-node cluster (a shared filesystem)",
    )
    p.add_argument("--actors", type=int, metavar="N", help="encoder actors per model")
    p.add_argument("--batch-size", type=int, metavar="N", help="encoder batch size (all modalities)")
    p.add_argument(
        "--whisper-mode", choices=("trimmed", "padded"), help="Whisper features: the clip's frames, or 30 s windows"
    )
    p.add_argument(
        "--passthrough",
        action="append",
        default=[],
        metavar="COLUMN",
        help="input column to copy into the tables (repeatable)",
    )
    p.add_argument("--commit-every", type=int, metavar="N", help="rows per commit")
    p.add_argument("--wait-lock", action="store_true", help="wait for another job on ROOT to finish instead of exiting")
    p.set_defaults(run="embed")

    p = sub.add_parser(
        "backfill",
        parents=[json_flag, runtime],
        help="embed every recorded input with a (new) model",
        description="Embed with MODEL every input the store has recorded (re-reading the original directories "
        "and Parquet datasets) that MODEL has not embedded yet. Inputs that disappeared are reported, not fatal.",
        **_example("mmembed backfill ./store --model clip-b32 --modality image"),
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--model", required=True, metavar="NAME", help="the model to backfill with")
    p.add_argument(
        "--modality",
        choices=("image", "audio", "text"),
        help="only this modality (default: every one the model embeds)",
    )
    p.add_argument(
        "--config", metavar="F", help="YAML job config for batch sizes, actors, ... (its input/root/models are ignored)"
    )
    p.add_argument("--address", metavar="ADDR", help="run on an existing Ray cluster")
    p.add_argument("--wait-lock", action="store_true", help="wait for another job on ROOT to finish instead of exiting")
    p.set_defaults(run="backfill")

    p = sub.add_parser(
        "schedule",
        help="run configured jobs on their cron schedules",
        description='Run each job config (input, root and `schedule: "<cron>"`, in UTC) when it is due, one at a '
        "time, never two overlapping instances; missed runs are caught up once. The job's name is its file's stem "
        "unless the config sets `name`.",
        **_example("mmembed schedule configs/hourly.yaml --once      # from cron or a systemd timer"),
    )
    p.add_argument("configs", nargs="+", metavar="CONFIG")
    p.add_argument("--once", action="store_true", help="run whatever is due now, then exit")
    p.set_defaults(run="schedule")

    p = sub.add_parser(
        "submit",
        help="submit a job config to a Ray cluster through the Ray Jobs API",
        description="Submit `mmembed embed --config CONFIG` to the cluster's job server with a runtime env "
        "carrying the config; prints the submission id. mmembed must be installed on the cluster.",
        **_example("mmembed submit job.yaml --cluster http://HEAD:8265 --wait"),
    )
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("--cluster", required=True, metavar="URL", help="the Ray dashboard address, http://HEAD:8265")
    p.add_argument("--wait", action="store_true", help="follow the job's logs and exit with its status")
    p.set_defaults(run="submit")

    p = sub.add_parser(
        "query",
        parents=[json_flag],
        help="nearest neighbours of a text, image or audio file",
        description="Encode the query with the searched partition's model and return the top-k items by cosine similarity.",
        **_example('mmembed query ./store --text "a red circle" --modality image -k 5'),
    )
    p.add_argument("root", metavar="ROOT")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", metavar="T", help="query text")
    what.add_argument("--image", metavar="FILE", help="query image file")
    what.add_argument("--audio", metavar="FILE", help="query audio file")
    p.add_argument(
        "--modality", choices=("image", "audio", "text"), help="what to search (default: the query's own modality)"
    )
    p.add_argument(
        "--model", metavar="NAME", help="which model's partition (default: the only one that can encode the query)"
    )
    p.add_argument("-k", type=int, default=10, metavar="K", help="how many results (default 10)")
    p.add_argument(
        "--where", metavar="PREDICATE", help="SQL predicate on the table's columns, e.g. \"id LIKE 'shapes/%%'\""
    )
    p.add_argument(
        "--exact", action="store_true", help="ignore an HNSW index (mmembed index): exact brute-force search"
    )
    p.add_argument(
        "--ef-search", type=int, metavar="N", help="HNSW candidates per query: recall vs latency (default 64)"
    )
    p.set_defaults(run="query")

    p = sub.add_parser(
        "index",
        parents=[json_flag],
        help="build HNSW indexes (DuckDB vss) that query uses while fresh",
        description="Build an HNSW index (DuckDB's vss extension, metric cosine) for each embedding partition "
        "that has no fresh one, in ROOT/_index/. `mmembed query` uses a partition's index, approximately, "
        "while no later job has committed to the partition, and searches exactly otherwise (and with "
        "--where or --exact). Building costs minutes per 100k rows on 2 cores; see README.",
        **_example("mmembed index ./store --modality image --m 32"),
    )
    p.add_argument("root", metavar="ROOT", help="a local store")
    p.add_argument("--modality", choices=("image", "audio", "text"), help="only this modality's partitions")
    p.add_argument("--model", metavar="NAME", help="only this model's partitions")
    p.add_argument("--force", action="store_true", help="rebuild fresh indexes too (e.g. with new options)")
    p.add_argument("--m", type=int, metavar="N", help="HNSW graph degree M (default 16)")
    p.add_argument(
        "--ef-construction", type=int, metavar="N", help="candidates per insertion while building (default 128)"
    )
    p.set_defaults(run="build_indexes")

    p = sub.add_parser(
        "classify",
        parents=[json_flag],
        help="zero-shot classification of a store's items against text labels",
        description="Label every item of one modality with the best of the given texts, by the model's "
        "text tower and CLIP's zero-shot softmax; prints label and probability per item, or writes them "
        "to Parquet with --out. Label counts go to stderr.",
        **_example('mmembed classify ./store --labels "a red circle,a blue square,a green star" --out labels.parquet'),
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument(
        "--labels",
        required=True,
        metavar="L1,L2,...",
        help='comma-separated label texts, e.g. "a red circle,a blue square"',
    )
    p.add_argument(
        "--modality", choices=("image", "audio", "text"), default="image", help="what to classify (default image)"
    )
    p.add_argument("--model", metavar="NAME", help="which model's partition (default: the only one with a text tower)")
    p.add_argument(
        "--where", metavar="PREDICATE", help="SQL predicate on the table's columns: classify only those rows"
    )
    p.add_argument("--out", metavar="F", help="write id, uri, label, probability to this Parquet file")
    p.set_defaults(run="classify")

    p = sub.add_parser(
        "sql",
        parents=[json_flag],
        help="read-only SQL over the store's views",
        description="Run a read-only query over the views embeddings, images, audio, texts, errors and jobs. "
        "embed_text(model, text), embed_image(model, path) and embed_audio(model, path) encode a query.",
        **_example(
            "mmembed sql ./store \"SELECT id, array_cosine_similarity(embedding, embed_text('shapes-clip', "
            "'a red circle')) AS score FROM images WHERE model = 'shapes-clip' ORDER BY score DESC LIMIT 5\""
        ),
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("statement", metavar="SQL")
    p.set_defaults(run="sql")

    p = sub.add_parser(
        "jobs", parents=[json_flag], help="list the job records of a store", **_example("mmembed jobs ./store")
    )
    p.add_argument("root", metavar="ROOT")
    p.set_defaults(run="jobs")

    p = sub.add_parser(
        "encode",
        parents=[json_flag, runtime],
        help="encode files or texts with one model (no Ray, no store)",
        description="Encode FILEs (modality from the extension) and --text strings directly with MODEL.",
        **_example("mmembed encode whisper-tiny.en speech.wav --mode padded --json"),
    )
    p.add_argument("model", metavar="MODEL", help="a model name (see 'mmembed models list') or a store file")
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument("--text", action="append", default=[], metavar="T", help="a text to encode (repeatable)")
    p.add_argument(
        "--mode", choices=("trimmed", "padded"), default="trimmed", help="Whisper features (default trimmed)"
    )
    p.set_defaults(run="encode")

    p = sub.add_parser(
        "bench",
        help="throughput benchmark: the pipeline vs the reference loop vs the bare forward",
        description="Generate a synthetic raw-media dataset and measure, in one run, the mmembed pipeline, the "
        "Hugging Face / sentence-transformers baseline and the bare encoder forward, plus retrieval latency; "
        "writes JSON, a markdown table and a PNG plot (needs pip install 'mmembed[dev]').",
        **_example("mmembed bench --quick --json bench.json"),
    )
    p.add_argument(
        "--modality",
        action="append",
        choices=("image", "audio", "text"),
        metavar="M",
        help="measure only this modality (repeatable; default all three, plus retrieval, memory and the 10-item job)",
    )
    p.add_argument(
        "--n",
        type=int,
        metavar="N",
        help="images and audio clips per run, 10x as many texts (default 1000; --quick 32)",
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes (100k-row retrieval, 16/64-image memory jobs): a few minutes"
    )
    p.add_argument("--json", type=Path, metavar="F", help="also write the JSON result to F")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-out"),
        metavar="DIR",
        help="datasets, stores and reports (bench.json, bench.md, bench.png); default ./bench-out",
    )
    p.set_defaults(run="bench")

    p = sub.add_parser(
        "demo",
        help="the embedded default, end to end, on the bundled sample set",
        description="Embed the bundled sample media with the bundled models through the Ray pipeline, "
        "print text->image, image->image, audio->audio, text->text and SQL results, and draw a contact sheet.",
        **_example("mmembed demo --out demo-out"),
    )
    p.add_argument(
        "--out", default="demo-out", metavar="DIR", help="where the store and contact sheet go (default ./demo-out)"
    )
    p.set_defaults(run="demo")

    models = sub.add_parser(
        "models",
        help="list, convert and validate models",
        description="Models: bundled ones and checkpoints converted into $MMEMBED_HOME (default ~/.cache/mmembed).",
        **_example("mmembed models convert path/to/clip-vit-base-patch32 clip-b32"),
    )
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", parser_class=Parser, required=True)
    p = msub.add_parser(
        "list", parents=[json_flag], help="bundled and converted models", **_example("mmembed models list")
    )
    p.set_defaults(run="models_list")
    p = msub.add_parser(
        "convert",
        parents=[json_flag],
        help="convert a checkpoint directory into a model store",
        description="Convert a Hugging Face CLIP, Whisper or BERT checkpoint directory, or a CTranslate2 "
        "Whisper model.bin directory (detected automatically), into the model home as NAME.",
        **_example("mmembed models convert path/to/clip-vit-base-patch32 clip-b32"),
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run="models_convert")
    p = msub.add_parser(
        "validate",
        parents=[json_flag],
        help="parity check against the reference implementation",
        description="Compare our encoder with the reference (transformers, sentence-transformers or "
        "ctranslate2; install them with pip install 'mmembed[dev]') and print the cosine figures.",
        **_example("mmembed models validate minilm-l6"),
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run="models_validate")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import commands  # imported after parsing: torch, Ray and DuckDB load only for a command that runs

    try:
        return getattr(commands, args.run)(args) or 0
    except commands.USER_ERRORS as e:
        print(f"mmembed: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mmembed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
