"""`mmembed serve`: the retrieval API and the search page over a store."""

from __future__ import annotations

import argparse

from ..options import Parser, Subparsers, command


def serve_parser(sub: Subparsers) -> Parser:
    p = command(
        sub,
        "serve",
        serve,
        "a retrieval API and a search page over a store (read-only)",
        "mmembed serve ./store --port 8088      then open http://127.0.0.1:8088/",
        description="Serve a JSON retrieval API (POST /search, GET /items/KEY, /media/KEY, /stats) and a search "
        "page at / over the store: search by text, by an uploaded image or clip, or by a stored item; images, audio "
        "and texts are shown as a grid. Models load once at startup. Never writes to the store. Binds 127.0.0.1 "
        "unless --host says otherwise: anyone who can reach the port can read every item the store names.",
    )
    p.add_argument("root", metavar="ROOT", help="the store to serve")
    p.add_argument(
        "--host", default="127.0.0.1", metavar="H", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8088, metavar="P", help="port (default 8088)")
    return p


def serve(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..serve.app import serve as run

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be from 1 to 65535, not {args.port}")
    run(args.root, args.host, args.port)
    return 0
