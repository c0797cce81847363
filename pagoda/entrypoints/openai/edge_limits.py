"""Hard limits at the HTTP edge, before any route runs: header size and count, body size.

A pure ASGI middleware (it sees the request before FastAPI parses anything): more headers than
`max_headers`, or more than `max_header_bytes` of them together, is a 431; a `Content-Length`
above `max_body_bytes` is a 413, and so is a body that streams past the limit without one (the
route then sees the request end there, and the client gets the 413). Both carry OpenAI's error
body. A refused request's body is read (up to the limit) before the answer, and the connection is
not closed on purpose: a socket closed with unread bytes is reset by the kernel, and the client
may lose the answer. The defaults (`pagoda serve --max-request-header-bytes / --max-request-headers /
--max-request-body-bytes`) are far above what a client sends: a 1M-token prompt is ~5 MB.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


async def _send_error(
    send: Send, status: int, message: str, kind: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(
                    (name.lower().encode(), value.encode())
                    for name, value in (headers or {}).items()
                ),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class EdgeLimits:
    """Wraps an ASGI app with the limits above (HTTP requests only)."""

    def __init__(
        self,
        app: ASGIApp,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        size = sum(len(name) + len(value) for name, value in headers)
        if len(headers) > self.max_headers or size > self.max_header_bytes:
            await self._drain(receive)
            await _send_error(
                send,
                431,
                f"Request headers too large: {len(headers)} headers, {size} bytes (at most "
                f"{self.max_headers} headers and {self.max_header_bytes} bytes)",
                "RequestHeaderFieldsTooLarge",
            )
            return
        for name, value in headers:
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_body_bytes:
                    await _send_error(send, 413, self._too_large(declared), "PayloadTooLarge")
                    return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the 413 below answers instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if exceeded and not started:
            await _send_error(send, 413, self._too_large(received), "PayloadTooLarge")

    async def _drain(self, receive: Receive) -> None:
        await drain_body(receive, self.max_body_bytes)

    def _too_large(self, size: int) -> str:
        return f"Request body too large: {size} bytes (at most {self.max_body_bytes})"


# The routes that queue work in the engine: the ones admission control guards.
_GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
# The scope-state key of the place an admitted request holds between the gate and the serving
# layer's own check (`release_admission_hold`).
ADMISSION_HOLD = "pagoda.admission_hold"
# The longest an admitted request lets the requests arriving with it go first: in an overload
# burst (the gate refusing), and otherwise (docs/performance.md item 24).
BURST_YIELD_S = 0.25
ARRIVAL_YIELD_S = 0.02


def release_admission_hold(scope: Scope) -> None:
    """End the place the gate held for this request (the serving layer calls it right before
    its own admission check, in the event-loop turn that registers the request)."""
    held = scope.get("state", {}).get(ADMISSION_HOLD)
    if held is not None:
        held.release()


class AdmissionGate:
    """Refuses generation requests with a 429 (and `Retry-After`) before their body is parsed
    while the engine's queue is full (`AsyncLLM.admission_delay`), so that shedding load costs
    no JSON parsing, validation or tokenization: under overload the event loop has little CPU to
    spare. The serving layer checks again with the request's prompt tokens (the token bound);
    this gate only catches what it can decide without the body. A request it lets through holds
    its place until the serving layer checks it (`ADMISSION_HOLD`), and lets the refusals that
    arrive with it in a burst be answered first. It runs before the
    API-key check, so under overload a request without a key gets the 429 rather than a 401."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._arrivals = 0
        self._refusals = 0
        self._quiet: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def _let_refusals_go_first(self) -> None:
        """Wait until generation requests stop reaching the gate: for at most `BURST_YIELD_S`
        once the gate refuses some (an overload burst), else at most `ARRIVAL_YIELD_S`. In a
        burst each admitted request's parsing, tokenization and hand-off (~1 ms here) would
        otherwise run before the refusals queued behind it, which cost a fraction of that
        each, and an admitted request then waits in the engine's queue far longer anyway. One
        watcher task per burst yields turn by turn; the admitted requests wait on its future
        (each spinning on its own would cost the loop a wake-up per request per turn)."""
        if self._quiet is None or self._quiet.done():
            loop = asyncio.get_running_loop()
            self._quiet = loop.create_future()
            self._watcher = loop.create_task(self._watch(self._quiet))
        await asyncio.shield(self._quiet)

    async def _watch(self, quiet: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        refusals = self._refusals
        seen: tuple[int, int] | None = None
        try:
            while seen != (self._arrivals, self._refusals):
                limit = BURST_YIELD_S if self._refusals != refusals else ARRIVAL_YIELD_S
                if loop.time() - start >= limit:
                    break
                seen = (self._arrivals, self._refusals)
                await asyncio.sleep(0)
        finally:
            if not quiet.done():
                quiet.set_result(None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            path = scope.get("path", "")
            root = scope.get("root_path") or ""
            if root and path.startswith(root):
                path = path[len(root) :]
            if path in _GENERATION_PATHS:
                self._arrivals += 1
                state = getattr(scope.get("app"), "state", None)
                hold_of = getattr(getattr(state, "engine", None), "hold_admission", None)
                held = hold_of() if hold_of is not None else None
                if isinstance(held, tuple):
                    self._refusals += 1
                    await self._refuse(state, held, receive, send)
                    return
                if held is not None:
                    scope.setdefault("state", {})[ADMISSION_HOLD] = held
                    try:
                        await self._let_refusals_go_first()
                        await self.app(scope, receive, send)
                    finally:
                        held.release()
                    return
        await self.app(scope, receive, send)

    async def _refuse(
        self, state: Any, refusal: tuple[float, str], receive: Receive, send: Send
    ) -> None:
        message, headers = overload_refusal(getattr(state, "metrics", None), refusal)
        await drain_body(receive, self.max_body_bytes)
        await _send_error(send, 429, message, "RateLimitError", headers)


class RefuseWhileDraining:
    """After SIGTERM / SIGINT (`app.state.draining`), requests under `prefixes` get a 503 with
    `Retry-After` and `Connection: close`; the others (probes, metrics) go on. Plain ASGI
    rather than Starlette's `BaseHTTPMiddleware`, which would cost every request a task group
    and a pair of memory streams."""

    def __init__(
        self,
        app: ASGIApp,
        prefixes: tuple[str, ...],
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        self.prefixes = prefixes
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope.get("app"), "state", None)
        if (
            scope["type"] == "http"
            and getattr(state, "draining", False)
            and scope.get("path", "").startswith(self.prefixes)
        ):
            await drain_body(receive, self.max_body_bytes)
            await _send_error(
                send,
                503,
                "The server is shutting down.",
                "ServiceUnavailableError",
                {"Retry-After": "5", "Connection": "close"},
            )
            return
        await self.app(scope, receive, send)


def overload_refusal(metrics: Any, refusal: tuple[float, str]) -> tuple[str, dict[str, str]]:
    """The 429's message and headers for an `AsyncLLM.admission_delay` refusal `(seconds,
    bound)`, counted in `metrics` (a PrometheusMetrics, or None): the gate above and the
    serving layer's token check answer alike."""
    delay, bound = refusal
    if metrics is not None:
        metrics.requests_rejected.labels(metrics.model_name, "overload").inc()
    what = "requests" if bound == "requests" else "prompt tokens waiting for prefill"
    message = f"The server is overloaded: its queue of {what} is full. Retry after {delay:.0f} s."
    return message, {"Retry-After": str(max(1, round(delay)))}


async def drain_body(receive: Receive, limit: int) -> None:
    """Read a request's body (up to `limit` bytes) before answering without it: a server that
    closes a socket with unread bytes makes the kernel reset the connection, and the client may
    lose the answer."""
    received = 0
    while received <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body"):
            return
