"""The routes: the JSON API and the two pages. Each endpoint parses and checks its request, then calls jobs.api in
a worker thread (the library is synchronous: encoders, DuckDB, numpy).

    POST /search         JSON {text | item, modality, model, k, where}, or multipart with a `file` and the same fields
    GET  /items/{key}    a stored item's metadata
    GET  /media/{key}    a stored item's bytes: the file its row's uri names (a text item: its text), nothing else
    GET  /thumbs/{key}   an image item's thumbnail (?size=, 32-512 px)
    GET  /stats          embedding counts per modality and model, error counts and the newest errors
    GET  /  and /errors  the search page and the errors page; /static/ their CSS and JS
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from encoders.errors import MmembedError
from encoders.options import MODALITIES
from pipelines.sources import modality_of
from storage.query import QueryError

from .. import api, output

log = logging.getLogger("mmembed.serve")
STATIC = Path(__file__).parent / "static"
INTERNAL = "internal server error (the server's log has the details)"
FIELDS = ("text", "item", "modality", "model", "k", "where")
MEDIA_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'"}


class BadRequest(QueryError):
    """A search request is malformed: a missing or unknown field, a value of the wrong type, or over a limit."""


def routes() -> list:
    return [
        Route("/", _page("index.html")),
        Route("/errors", _page("errors.html")),
        Route("/search", guarded(search), methods=["POST"]),
        Route("/items/{key}", guarded(item)),
        Route("/media/{key}", guarded(media)),
        Route("/thumbs/{key}", guarded(thumb)),
        Route("/stats", guarded(stats)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


def guarded(endpoint):
    """`endpoint`, with anything but the caller's errors (MmembedError, HTTPException: the app's handlers answer
    those) logged with its traceback and answered as a plain 500, on a connection that stays usable."""

    @functools.wraps(endpoint)
    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except (MmembedError, HTTPException):
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return error(500, INTERNAL)

    return run


def _page(name: str):
    async def page(request: Request) -> FileResponse:
        return FileResponse(STATIC / name, media_type="text/html; charset=utf-8")

    return page


class JSONOut(JSONResponse):
    """JSON with the library's values (timestamps, dates) written as text."""

    def render(self, content) -> bytes:
        return output.to_json(content).encode()


def error(status: int, message: str) -> JSONOut:
    return JSONOut({"error": message, "status": status}, status_code=status)


def _json(content, status: int = 200) -> Response:
    return JSONOut(content, status_code=status)


async def search(request: Request) -> Response:
    limits = request.app.state.limits
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    upload = None
    if kind == "multipart/form-data":
        async with request.form(max_files=1, max_fields=len(FIELDS) + 1, max_part_size=limits.body_bytes) as form:
            fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
            files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
            if files:
                upload = (files[0].filename or "", files[0].content_type or "", await files[0].read())
    elif kind == "application/json":
        try:
            fields = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not JSON: {e}") from None
        if not isinstance(fields, dict):
            raise BadRequest("the request body must be a JSON object")
    else:
        raise BadRequest("send JSON (application/json) or a file (multipart/form-data)")
    query = _query(fields, upload, limits)
    root = request.app.state.root
    if "item" in query:
        model, rows = await run_in_threadpool(
            api.search_like, root, query.pop("item"), query["modality"], query["model"], query["k"], query["where"]
        )
    else:
        model, rows = await run_in_threadpool(api.search, root, **query, details=True)
    results = rows.to_pylist()
    return _json({"model": model, "modality": rows["modality"][0].as_py() if results else None, "results": results})


def _query(fields: dict, upload: tuple[str, str, bytes] | None, limits) -> dict:
    """The checked search arguments: api.search's (query_modality, value, ...) or api.search_like's (item, ...)."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; a search takes {', '.join(FIELDS)} (and a file)")
    given = [n for n in ("text", "item") if fields.get(n) not in (None, "")] + (["file"] if upload else [])
    if len(given) != 1:
        raise BadRequest(f"give exactly one of text, item or a file, not {' and '.join(given) or 'none'}")
    for name in ("text", "item", "modality", "model", "where"):
        if fields.get(name) is not None and not isinstance(fields[name], str):
            raise BadRequest(f"{name} must be a string")
    modality = fields.get("modality") or None
    if modality is not None and modality not in MODALITIES:
        raise BadRequest(f"modality must be one of {', '.join(MODALITIES)}, not {modality[:40]!r}")
    query = {"modality": modality, "model": fields.get("model") or None, "k": _k(fields.get("k"), limits)}
    query["where"] = fields.get("where") or None
    if query["where"] and len(query["where"]) > limits.where_chars:
        raise BadRequest(f"where is over {limits.where_chars} characters")
    if given == ["item"]:
        return {"item": fields["item"], **query}
    if given == ["text"]:
        query_modality, value = "text", fields["text"]
    else:
        query_modality, value = _upload(*upload)
    if query_modality == "text" and len(value) > limits.text_chars:
        raise BadRequest(f"the query text is over {limits.text_chars} characters")
    return {"query_modality": query_modality, "value": value, **query}


def _k(value, limits) -> int:
    if value in (None, ""):
        return 10
    try:
        k = int(value) if isinstance(value, str) else value
    except ValueError:
        k = None
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limits.k:
        raise BadRequest(f"k must be a whole number from 1 to {limits.k}, not {str(value)[:20]!r}")
    return k


def _upload(name: str, content_type: str, data: bytes) -> tuple[str, str | bytes]:
    """An uploaded file -> (its modality, by extension or else content type; its bytes, or its text)."""
    modality = modality_of(name) or next((m for m in MODALITIES if content_type.startswith(f"{m}/")), None)
    if modality is None:
        raise BadRequest(f"cannot tell the modality of the upload {name[:60]!r} ({content_type or 'no type'})")
    if modality != "text":
        return modality, data
    try:
        return modality, data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"the text upload {name[:60]!r} is not UTF-8") from None


async def item(request: Request) -> Response:
    return _json(await run_in_threadpool(api.item, request.app.state.root, request.path_params["key"]))


async def media(request: Request) -> Response:
    found = await run_in_threadpool(api.media, request.app.state.root, request.path_params["key"])
    if found.path is not None:
        return FileResponse(found.path, media_type=found.media_type, headers=MEDIA_HEADERS)
    return Response(found.data, media_type=found.media_type, headers=MEDIA_HEADERS)


async def thumb(request: Request) -> Response:
    size = request.query_params.get("size", "256")
    if not size.isdigit() or not 32 <= int(size) <= 512:
        raise BadRequest(f"size must be a whole number of pixels from 32 to 512, not {size[:20]!r}")
    thumbnails = request.app.state.thumbnails
    data = await run_in_threadpool(thumbnails.get, request.app.state.root, request.path_params["key"], int(size))
    return Response(data, media_type=thumbnails.MEDIA_TYPE, headers={"Cache-Control": "max-age=3600"})


async def stats(request: Request) -> Response:
    return _json(await run_in_threadpool(api.stats, request.app.state.root))
