"""HTTP metrics of the API server: `http_requests_total{handler, method, status}` and
`http_request_duration_seconds{handler, method}`, the names and labels vLLM's server exposes (its
dashboards plot the 5xx ratio and per-route latency from them).

A pure ASGI middleware, so a streamed response is timed to its last byte and nothing buffers it.
`handler` is the route's path when it is one of the app's routes and "none" otherwise, so a
scanner probing random paths cannot grow the label set; `status` is the class ("2xx", "4xx", ...).
The metrics live in the registry of the app's `PrometheusMetrics` (`app.state.metrics`); until
one is attached, requests pass untimed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# prometheus-fastapi-instrumentator's default latency buckets, which vLLM's server uses.
HTTP_DURATION_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)


class HttpMetrics:
    """The two HTTP metrics, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests, by route, method and status class.",
            labelnames=["handler", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Seconds from a request's arrival to its response's last byte, by route and method.",
            labelnames=["handler", "method"],
            buckets=HTTP_DURATION_BUCKETS,
            registry=registry,
        )


def route_paths(routes: Iterable[Any]) -> frozenset[str]:
    """The paths of an app's routes, those of included routers too (mounted without prefix)."""
    paths: set[str] = set()
    todo = list(routes)
    while todo:
        route = todo.pop()
        path = getattr(route, "path", None)
        if isinstance(path, str):
            paths.add(path)
        nested = getattr(getattr(route, "original_router", None), "routes", None)
        if nested is None:
            nested = getattr(route, "routes", None)
        if nested:
            todo.extend(nested)
    return frozenset(paths)


class HttpMetricsMiddleware:
    """Counts and times every HTTP request the app answers (see the module docstring)."""

    def __init__(self, app: ASGIApp, routes: Callable[[], frozenset[str]]) -> None:
        self.app = app
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = getattr(scope.get("app"), "state", None)
        metrics = getattr(getattr(state, "metrics", None), "http", None)
        if metrics is None:
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client sees if the app fails before it answers

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            path = scope.get("path", "")
            handler = path if path in self._routes() else "none"
            method = scope.get("method", "GET")
            metrics.requests.labels(handler, method, f"{status // 100}xx").inc()
            metrics.duration.labels(handler, method).observe(time.perf_counter() - start)
