"""The `mmembed` command: the table of commands, and the one place where a user's error becomes one line.

Each command's flags, help and handler sit together in its module under jobs/commands/; a parsed command runs
the handler its parser set. The library's errors (`MmembedError`) print as `mmembed: error: ...` with exit
status 1; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from encoders.errors import MmembedError

from .commands import demo, embed, encode, models, schedule, search, serve, sql
from .options import Parser

EPILOG = """examples:
  mmembed embed ./media ./store                 embed a directory into a store
  mmembed query ./store --text "a red circle" --modality image -k 5
  mmembed sql ./store "SELECT modality, model, count(*) FROM embeddings GROUP BY ALL"
  mmembed serve ./store                         a search page at http://127.0.0.1:8088/
  mmembed encode minilm-l6 --text "hello world" --json
  mmembed demo                                  the bundled sample set, end to end

Progress and logs go to stderr; --json prints one JSON document on stdout."""

# In the order `mmembed --help` lists them.
COMMANDS = (
    embed.embed_parser,
    embed.backfill_parser,
    schedule.schedule_parser,
    schedule.submit_parser,
    search.query_parser,
    search.index_parser,
    search.classify_parser,
    sql.sql_parser,
    sql.jobs_parser,
    serve.serve_parser,
    encode.encode_parser,
    encode.transcribe_parser,
    demo.bench_parser,
    demo.demo_parser,
    models.models_parser,
)


def build_parser() -> Parser:
    parser = Parser(
        prog="mmembed",
        description="Batch multimodal embedding: Ray Data pipelines into Parquet embedding tables, retrieval in DuckDB SQL.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser, required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except MmembedError as e:
        print(f"mmembed: error: {one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mmembed: interrupted", file=sys.stderr)
        return 130


def one_line(message: str) -> str:
    """A message on one line, whatever a library below put in it (the lines of an Arrow or DuckDB error)."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
