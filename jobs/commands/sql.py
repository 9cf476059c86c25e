"""`mmembed sql` and `mmembed jobs`: the store's views and its job records."""

from __future__ import annotations

import argparse

from .. import output
from ..options import JSON, Parser, Subparsers, command, param, params


def sql_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "sql",
        sql,
        "read-only SQL over the store's views",
        "mmembed sql ./store \"SELECT id, array_cosine_similarity(embedding, embed_text('shapes-clip', "
        "'a red circle')) AS score FROM images WHERE model = 'shapes-clip' ORDER BY score DESC LIMIT 5\"",
        description="Run a read-only query over the views embeddings, images, audio, texts, errors and jobs. "
        "embed_text(model, text), embed_image(model, path) and embed_audio(model, path) encode a query; $NAME "
        "placeholders take their values from --param NAME=VALUE. The statement reads the store's views only: no "
        "file, URL or extension outside them.",
        parents=(JSON,),
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("statement", metavar="SQL")
    param(p)
    return p


def sql(args: argparse.Namespace) -> int:
    from ..api import sql as run_sql

    rows = run_sql(args.root, args.statement, params(args.param)).to_pylist()
    output.emit_json(rows) if args.json else output.table(rows)
    return 0


def jobs_parser(sub: Subparsers) -> Parser:
    p = command(sub, "jobs", jobs, "list the job records of a store", "mmembed jobs ./store", parents=(JSON,))
    p.add_argument("root", metavar="ROOT")
    return p


def jobs(args: argparse.Namespace) -> int:
    from ..api import open_store

    records = open_store(args.root).jobs()
    if args.json:
        output.emit_json(records)
        return 0
    rows = []
    for r in records:
        counts = r.get("counts", {}).values()
        rows.append(
            {
                "job_id": r["job_id"],
                "kind": r.get("kind"),
                "status": r["status"],
                "started_at": r["started_at"],
                "embedded": sum(c.get("embedded", 0) for c in counts),
                "errored": sum(c.get("errored", 0) for c in counts),
                "wall_s": r.get("stages_s", {}).get("wall"),
            }
        )
    output.table(rows)
    return 0
