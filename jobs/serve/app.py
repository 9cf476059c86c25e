"""The server: `create_app(root)` builds the Starlette app over one store; `serve` runs it with uvicorn, and
`background` runs it on a free loopback port in a thread (for tests and the bench).

Starlette rather than FastAPI: the API is five routes whose inputs the library already checks (each bad input is
an `MmembedError` with one clear line), so FastAPI's pydantic models and OpenAPI schema would add a dependency
and a second set of rules without adding a check; Starlette is the ASGI toolkit FastAPI itself is built on.

Errors are JSON, `{"error": message, "status": code}`: an `MmembedError` (the caller's fault) is 400, or 404 for
an unknown key or route; anything else is 500 with a generic message, and its traceback goes to the log only.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request

from encoders.errors import MmembedError

from .. import api
from .routes import INTERNAL, JSONOut, error, routes
from .thumbnails import Thumbnails

log = logging.getLogger("mmembed.serve")  # the routes' logger too


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    body_bytes: int = 32 * 1024 * 1024  # a request body (an uploaded image or clip); larger ones get 413
    k: int = 200  # results per search
    text_chars: int = 2_000  # a query text
    where_chars: int = 2_000  # a where predicate
    thumb_cache_bytes: int = 64 * 1024 * 1024  # thumbnails kept in memory


class TooLarge(MmembedError):
    """A request body is over the server's limit."""


async def _user_error(request: Request, exc: Exception) -> JSONOut:
    status = 413 if isinstance(exc, TooLarge) else 404 if isinstance(exc, api.ItemNotFound) else 400
    return error(status, str(exc))


async def _http_error(request: Request, exc: Exception) -> JSONOut:
    return error(exc.status_code, exc.detail)


async def _server_error(request: Request, exc: Exception) -> JSONOut:
    """The last resort, outside any endpoint (`routes.guarded` answers within them); Starlette re-raises the
    exception to uvicorn after this answer, which logs it."""
    return error(500, INTERNAL)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused, by its Content-Length before it is read, or
    as it streams in (TooLarge, raised where the endpoint reads it)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return await error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise TooLarge(f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(root: str, limits: Limits = Limits(), warm: bool = True) -> Starlette:
    """The app over the store at `root` (QueryError if there is none). With `warm`, startup loads every model the
    store holds, so the first query does not wait for one."""
    store = api.open_store(root)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        if warm:
            _warm(store)
        yield

    app = Starlette(
        routes=routes(),
        exception_handlers={MmembedError: _user_error, HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.root, app.state.limits = store.root, limits
    app.state.thumbnails = Thumbnails(limits.thumb_cache_bytes)
    app.add_middleware(BodyLimit, limit=limits.body_bytes)
    return app


def _warm(store) -> None:
    for model in sorted({m for _, m in store.partitions("embeddings")}):
        start = time.perf_counter()
        try:
            api.encoder(model)
        except MmembedError as e:  # the store's partition stays searchable by stored items; text queries get 400
            log.warning("cannot load model %s: %s", model, e)
            continue
        log.info("loaded %s in %.1f s", model, time.perf_counter() - start)


class ServeError(MmembedError):
    """The server cannot listen: its host is unknown or its port taken."""


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host`:`port` (0: a free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (socket.gaierror, OSError) as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(root: str, host: str = "127.0.0.1", port: int = 8088, limits: Limits = Limits()) -> None:
    """Serve the store at `root` until interrupted; logs (requests, loaded models, failures) go to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    app = create_app(root, limits)
    sock = listen(host, port)
    print(f"mmembed: serving {app.state.root} at {url(sock)} (Ctrl-C stops)", file=sys.stderr)
    with sock:
        uvicorn.Server(uvicorn.Config(app, log_level="info", server_header=False)).run(sockets=[sock])


@contextmanager
def background(app: Starlette, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Run `app` on a free port of `host` in a thread; yields its base URL (ending in /), stops it on exit."""
    sock = listen(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, server_header=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="mmembed-serve")
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server stopped while starting (see its log)")
            time.sleep(0.02)
        yield url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
