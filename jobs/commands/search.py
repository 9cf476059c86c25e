"""`mmembed query`, `mmembed classify` and `mmembed index`: reading a store by similarity."""

from __future__ import annotations

import argparse
import sys

from .. import output
from ..options import JSON, Parser, Subparsers, at_least, command, modality, param, params, where


def query_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "query",
        query,
        "nearest neighbours of a text, image or audio file",
        'mmembed query ./store --text "a red circle" --modality image -k 5',
        description="Encode the query with the searched partition's model and return the top-k items by cosine similarity.",
        parents=(JSON,),
    )
    p.add_argument("root", metavar="ROOT")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", metavar="T", help="query text")
    what.add_argument("--image", metavar="FILE", help="query image file")
    what.add_argument("--audio", metavar="FILE", help="query audio file")
    modality(p, "what to search (default: the query's own modality)")
    p.add_argument(
        "--model", metavar="NAME", help="which model's partition (default: the only one that can encode the query)"
    )
    p.add_argument("-k", type=at_least(1), default=10, metavar="K", help="how many results (default 10)")
    where(p, 'SQL predicate on the table\'s columns, e.g. "id LIKE \'shapes/%%\'" or "lang = $lang"')
    param(p)
    p.add_argument(
        "--exact", action="store_true", help="ignore an HNSW index (mmembed index): exact brute-force search"
    )
    p.add_argument(
        "--ef-search", type=at_least(1), metavar="N", help="HNSW candidates per query: recall vs latency (default 64)"
    )
    return p


def query(args: argparse.Namespace) -> int:
    from .. import api

    query_modality, value = next(
        (m, v) for m, v in (("text", args.text), ("image", args.image), ("audio", args.audio)) if v is not None
    )
    modality = args.modality or query_modality
    store = api.open_store(args.root)
    model = api.pick_model(store, modality, query_modality, args.model)
    if not args.exact and args.where is None:
        _note_index(args.root, api.index_state(store, modality, model), modality, model)
    _, rows = api.search(
        args.root,
        query_modality,
        value,
        modality,
        model,
        k=args.k,
        where=args.where,
        params=params(args.param),
        exact=args.exact,
        ef_search=args.ef_search,
    )
    if args.json:
        output.emit_json(rows.to_pylist())
    else:
        output.table(rows.to_pylist(), ["score", "id", "modality", "model", "uri"])
    return 0


def _note_index(root: str, state: str, modality: str, model: str) -> None:
    if state == "fresh":
        print(f"searching the HNSW index of {modality}/{model} (approximate; --exact to scan)", file=sys.stderr)
    elif state == "stale":
        print(
            f"the HNSW index of {modality}/{model} predates its latest commit: searching exactly "
            f"(rebuild with `mmembed index {root}`)",
            file=sys.stderr,
        )


def classify_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "classify",
        classify,
        "zero-shot classification of a store's items against text labels",
        'mmembed classify ./store --labels "a red circle,a blue square,a green star" --out labels.parquet',
        description="Label every item of one modality with the best of the given texts, by the model's text tower and "
        "the model's own zero-shot score (CLIP, CLAP: a softmax over the labels; SigLIP: a sigmoid per label); prints "
        "label, probability and cosine per item, or writes them to Parquet with --out. Label counts go to stderr.",
        parents=(JSON,),
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument(
        "--labels",
        required=True,
        metavar="L1,L2,...",
        help='comma-separated label texts, e.g. "a red circle,a blue square"',
    )
    modality(p, "what to classify (default image)", default="image")
    p.add_argument("--model", metavar="NAME", help="which model's partition (default: the only one with a text tower)")
    where(p, "SQL predicate on the table's columns: classify only those rows")
    param(p)
    p.add_argument("--out", metavar="F", help="write id, uri, label, cosine, probability to this Parquet file")
    return p


def classify(args: argparse.Namespace) -> int:
    from ..api import classify as classify_items
    from ..config import ConfigError

    labels = list(dict.fromkeys(label.strip() for label in args.labels.split(",") if label.strip()))
    if len(labels) < 2:
        raise ConfigError(f"--labels needs at least two comma-separated labels, got {labels}")
    result, counts = classify_items(args.root, labels, args.modality, args.model, args.where, params(args.param))
    if args.out:
        output.write_parquet(result, args.out)
        print(f"wrote {result.num_rows} rows to {args.out}", file=sys.stderr)
    print(", ".join(f"{label}: {n}" for label, n in counts.items()), file=sys.stderr)
    if args.json:
        output.emit_json(result.to_pylist())
    elif not args.out:
        output.table(result.to_pylist(), ["label", "probability", "cosine", "id"])
    return 0


def index_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "index",
        build_indexes,
        "build HNSW indexes (DuckDB vss) that query uses while fresh",
        "mmembed index ./store --modality image --m 32",
        description="Build an HNSW index (DuckDB's vss extension, metric cosine) for each embedding partition that "
        "has no fresh one, in ROOT/_index/. `mmembed query` uses a partition's index, approximately, while no later job "
        "has committed to the partition, and searches exactly otherwise (and with --where or --exact). Building costs "
        "minutes per 100k rows on 2 cores; see README.",
        parents=(JSON,),
    )
    p.add_argument("root", metavar="ROOT", help="a local store")
    modality(p, "only this modality's partitions")
    p.add_argument("--model", metavar="NAME", help="only this model's partitions")
    p.add_argument("--force", action="store_true", help="rebuild fresh indexes too (e.g. with new options)")
    p.add_argument("--m", type=at_least(2), metavar="N", help="HNSW graph degree M (default 16)")
    p.add_argument(
        "--ef-construction", type=at_least(1), metavar="N", help="candidates per insertion while building (default 128)"
    )
    return p


def build_indexes(args: argparse.Namespace) -> int:
    from storage.search import build_index

    options = {k: v for k, v in (("M", args.m), ("ef_construction", args.ef_construction)) if v is not None}
    rows = build_index(args.root, args.modality, args.model, force=args.force, options=options)
    output.emit_json(rows) if args.json else output.table(rows)
    return 0
