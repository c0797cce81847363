"""The live engine page and its data: `/` (the page), `/ui/*` (its files), `/stats`, `/stats/stream`.

The page is static HTML, CSS and JavaScript shipped in the package (`static/`; nothing comes
from a CDN or the network at run time). It reads the engine's state from `/stats/stream` (one
JSON document per interval as server-sent events; `/stats` answers one at once) and chats through
the server's own `/v1/chat/completions` and `/v1/completions`, so with `--api-key` it asks for
the key once and sends it with every call: the page's files hold no data and are open, every
route that answers with the engine's state or the model's output is behind the key.
`--disable-ui` removes all four.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from pagoda.entrypoints.openai.protocol import ErrorResponse
from pagoda.entrypoints.openai.router import sse_event_schema
from pagoda.entrypoints.openai.serving_engine import error_body, sse_event

logger = logging.getLogger(__name__)

# The stream's interval bounds, seconds: fast enough for a smooth chart, slow enough that a page
# left open costs nothing measurable.
MIN_INTERVAL_S = 0.1
MAX_INTERVAL_S = 10.0
DEFAULT_INTERVAL_S = 1.0
# Paths that answer with the engine's state: behind --api-key (api_server's protected prefixes).
STATS_PREFIX = "/stats"


def static_dir() -> str:
    """Where the page's files are (inside the installed package)."""
    return str(resources.files("pagoda.entrypoints.ui") / "static")


def install_ui(app: FastAPI) -> None:
    """Add the page, its files and the stats routes to `app` (see the module docstring)."""
    directory = static_dir()
    app.mount("/ui", StaticFiles(directory=directory), name="ui")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(f"{directory}/index.html", media_type="text/html")

    @app.get(
        STATS_PREFIX,
        responses={503: {"model": ErrorResponse, "description": "The engine keeps no live stats"}},
    )
    async def stats(raw_request: Request) -> Response:
        """The engine's state now: requests, steps, throughput, KV blocks, prefix cache,
        memory (docs/ui.md lists the fields)."""
        document = _document(raw_request)
        if document is None:
            return _unavailable()
        return JSONResponse(document)

    @app.get(
        f"{STATS_PREFIX}/stream",
        response_class=Response,
        responses={
            200: {
                "description": "Server-sent events: `data: <the /stats document>` per interval",
                "content": {
                    "text/event-stream": {"schema": sse_event_schema("the /stats document")}
                },
            },
            400: {"model": ErrorResponse, "description": "interval out of range"},
            503: {"model": ErrorResponse, "description": "The engine keeps no live stats"},
        },
    )
    async def stats_stream(raw_request: Request, interval: str | None = None) -> Response:
        """`/stats` as server-sent events every `interval` seconds (default 1, 0.1 to 10),
        until the client goes or the server drains."""
        try:
            seconds = _interval(interval)
        except ValueError as exc:
            body = error_body(str(exc), param="interval")
            return JSONResponse(body.model_dump(), status_code=400)
        if _document(raw_request) is None:
            return _unavailable()
        return StreamingResponse(
            _events(raw_request, seconds),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _interval(text: str | None) -> float:
    if text is None:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"interval must be a number of seconds, got {text!r}") from None
    if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
        raise ValueError(
            f"interval must be in [{MIN_INTERVAL_S}, {MAX_INTERVAL_S}] seconds, got {text}"
        )
    return seconds


def _document(raw_request: Request) -> dict[str, Any] | None:
    engine = getattr(raw_request.app.state, "engine", None)
    live = getattr(engine, "live_stats", None)
    return None if live is None else live.document()


def _unavailable() -> JSONResponse:
    body = error_body("this server keeps no live stats", "ServiceUnavailableError", 503)
    return JSONResponse(body.model_dump(), status_code=503)


async def _events(raw_request: Request, seconds: float) -> AsyncIterator[str]:
    state = raw_request.app.state
    while not getattr(state, "draining", False):
        document = _document(raw_request)
        if document is None:
            return
        yield sse_event(json.dumps(document, separators=(",", ":")))
        try:
            await asyncio.wait_for(_disconnected(raw_request), timeout=seconds)
            return
        except TimeoutError:
            continue


async def _disconnected(raw_request: Request) -> None:
    while not await raw_request.is_disconnected():
        await asyncio.sleep(0.05)
