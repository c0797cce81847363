"""The OpenAI-compatible HTTP server: app factory, auth, health, metrics, and the uvicorn loop.

`run_server(args)` builds the `AsyncLLM` (one continuous batch for every request), the FastAPI app
with the OpenAI routes (`router.py`) and the operational ones (`/health`, `/ping`, `/version`,
`/metrics`), then serves until SIGINT/SIGTERM, when uvicorn stops accepting connections, lets
in-flight responses end, and the engine thread is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import hmac
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

import pagoda
from pagoda.engine.async_llm import AsyncLLM
from pagoda.entrypoints.launch import StartedEngineCore, start_engine_core
from pagoda.tokenizer import load_chat_template

logger = logging.getLogger(__name__)

_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Routes that touch the model need the key; operational probes stay open.
_PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize", "/stats")
# With an API key the API's documentation needs it too (it lists every route and field).
_DOCS_PREFIXES = ("/docs", "/redoc", "/openapi.json")


def _unauthorized() -> JSONResponse:
    body = {
        "error": {
            "message": "Unauthorized",
            "type": "AuthenticationError",
            "param": None,
            "code": 401,
        }
    }
    return JSONResponse(body, status_code=401)


def _key_digests(api_keys: list[str]) -> list[bytes]:
    return [hashlib.sha256(key.encode()).digest() for key in api_keys]


def build_app(args: argparse.Namespace) -> FastAPI:
    """The FastAPI app, without an engine: `init_app_state` attaches one."""
    # --disable-fastapi-docs (vLLM's flag): no /docs, /redoc or /openapi.json at all.
    no_docs = bool(getattr(args, "disable_fastapi_docs", False))
    app = FastAPI(
        root_path=getattr(args, "root_path", None) or "",
        lifespan=_lifespan,
        docs_url=None if no_docs else "/docs",
        redoc_url=None if no_docs else "/redoc",
        openapi_url=None if no_docs else "/openapi.json",
    )
    from pagoda.entrypoints.openai.router import (
        build_router,
        install_error_handlers,
        install_openapi,
    )

    app.include_router(build_router())
    install_error_handlers(app)
    install_openapi(app)
    _add_operational_routes(app)
    if not getattr(args, "disable_ui", False):
        from pagoda.entrypoints.ui import install_ui

        install_ui(app)

    from pagoda.entrypoints.openai.edge_limits import RefuseWhileDraining

    # After SIGTERM / SIGINT: in-flight requests finish, new ones are turned away.
    app.add_middleware(RefuseWhileDraining, prefixes=_PROTECTED_PREFIXES)

    api_key = getattr(args, "api_key", None)
    api_keys = api_key if isinstance(api_key, list) else ([api_key] if api_key else [])
    if api_keys:
        digests = _key_digests(api_keys)

        @app.middleware("http")
        async def authenticate(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            path = request.url.path
            root_path = request.scope.get("root_path") or ""
            if root_path and path.startswith(root_path):
                path = path[len(root_path) :]
            guarded = path.startswith(_PROTECTED_PREFIXES) or path.startswith(_DOCS_PREFIXES)
            if request.method == "OPTIONS" or not guarded:
                return await call_next(request)
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = hashlib.sha256(token.strip().encode()).digest()
            # Compare every digest in constant time so timing reveals nothing about the keys.
            valid = scheme.lower() == "bearer" and any(
                [hmac.compare_digest(given, digest) for digest in digests]
            )
            if not valid:
                return _unauthorized()
            return await call_next(request)

    from pagoda.entrypoints.openai.edge_limits import (
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_MAX_HEADER_BYTES,
        DEFAULT_MAX_HEADERS,
        AdmissionGate,
        EdgeLimits,
    )

    max_body = getattr(args, "max_request_body_bytes", None) or DEFAULT_MAX_BODY_BYTES
    # Overload refusals before any parsing (inside the edge limits, outside authentication).
    app.add_middleware(AdmissionGate, max_body_bytes=max_body)

    # Outside authentication (added after it): limits hold before any key is checked.
    app.add_middleware(
        EdgeLimits,
        max_header_bytes=getattr(args, "max_request_header_bytes", None)
        or DEFAULT_MAX_HEADER_BYTES,
        max_headers=getattr(args, "max_request_headers", None) or DEFAULT_MAX_HEADERS,
        max_body_bytes=max_body,
    )
    from pagoda.metrics.http import HttpMetricsMiddleware, route_paths

    known: frozenset[str] = frozenset()

    def routes() -> frozenset[str]:
        nonlocal known
        if not known:
            known = route_paths(app.routes)
        return known

    # Outermost but for CORS: every answer is counted, the edge limits' 413 / 431 included.
    app.add_middleware(HttpMetricsMiddleware, routes=routes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=_json_list(getattr(args, "allowed_origins", None)),
        allow_credentials=bool(getattr(args, "allow_credentials", False)),
        allow_methods=_json_list(getattr(args, "allowed_methods", None)),
        allow_headers=_json_list(getattr(args, "allowed_headers", None)),
    )
    return app


def _json_list(value: Any) -> list[str]:
    if value is None:
        return ["*"]
    if isinstance(value, str):
        parsed = json.loads(value)
        return parsed if isinstance(parsed, list) else [str(parsed)]
    return list(value)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine: AsyncLLM | None = getattr(app.state, "engine", None)
    if engine is not None:
        await engine.start()
    yield
    if engine is not None:
        logger.info("Shutting down the engine")
        engine.shutdown()


def _add_operational_routes(app: FastAPI) -> None:
    health_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "The engine serves"},
        503: {"description": "The engine failed or the server is shutting down"},
    }

    @app.get("/health", responses=health_responses, response_class=Response)
    async def health(raw_request: Request) -> Response:
        engine: AsyncLLM | None = getattr(raw_request.app.state, "engine", None)
        if (
            engine is None
            or not engine.is_alive()
            or getattr(raw_request.app.state, "draining", False)
        ):
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/ping", responses=health_responses, response_class=Response, operation_id="ping_get")
    async def ping(raw_request: Request) -> Response:
        return await health(raw_request)

    @app.post(
        "/ping", responses=health_responses, response_class=Response, operation_id="ping_post"
    )
    async def ping_post(raw_request: Request) -> Response:
        return await health(raw_request)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": pagoda.__version__})

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus exposition (text format 0.0.4, or OpenMetrics when "
                "the Accept header asks for it)",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            404: {"description": "Metrics are not recorded"},
        },
    )
    async def metrics(raw_request: Request) -> Response:
        prometheus = getattr(raw_request.app.state, "metrics", None)
        if prometheus is None:
            return Response(status_code=404)
        body, content_type = prometheus.render(raw_request.headers.get("accept"))
        return Response(content=body, media_type=content_type)


def init_app_state(app: FastAPI, engine: AsyncLLM, args: argparse.Namespace) -> None:
    """Attach the engine and the serving objects the routes use."""
    from pagoda.entrypoints.openai.request_logger import RequestLogger
    from pagoda.entrypoints.openai.serving_chat import OpenAIServingChat
    from pagoda.entrypoints.openai.serving_completion import OpenAIServingCompletion
    from pagoda.entrypoints.openai.serving_models import OpenAIServingModels
    from pagoda.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

    served = served_model_names(args, engine)
    chat_template = load_chat_template(getattr(args, "chat_template", None))
    # vLLM's default: requests (with their prompts, cut at --max-log-len) are logged only with
    # --enable-log-requests; --disable-log-requests is accepted and changes nothing.
    log_requests = bool(getattr(args, "enable_log_requests", False)) and not bool(
        getattr(args, "disable_log_requests", False)
    )
    request_logger = RequestLogger(getattr(args, "max_log_len", None)) if log_requests else None
    app.state.engine = engine
    app.state.served_model_names = served
    app.state.metrics = engine.enable_metrics(
        served[0], vllm_names=getattr(args, "vllm_metric_names", True)
    )
    if not getattr(args, "disable_ui", False):
        engine.enable_live_stats(served[0])
        host = getattr(args, "host", None)
        if host not in ("127.0.0.1", "localhost", "::1") and not getattr(args, "api_key", None):
            logger.warning(
                "The live engine page (/) and /stats are open to anyone who can reach %s: "
                "set --api-key to keep them (and the API) behind a key, or --disable-ui",
                host or "0.0.0.0",
            )
    engine.max_queued_requests = getattr(args, "max_queued_requests", None)
    engine.max_queued_prompt_tokens = getattr(args, "max_queued_prompt_tokens", None)
    app.state.openai_serving_models = OpenAIServingModels(engine, served)
    as_ids = bool(getattr(args, "return_tokens_as_token_ids", False))
    app.state.openai_serving_completion = OpenAIServingCompletion(
        engine, served, request_logger=request_logger
    )
    app.state.openai_serving_chat = OpenAIServingChat(
        engine,
        served,
        chat_template,
        bool(getattr(args, "trust_request_chat_template", False)),
        request_logger=request_logger,
        enable_auto_tools=bool(getattr(args, "enable_auto_tool_choice", False)),
        tool_parser=getattr(args, "tool_call_parser", None),
        reasoning_parser=getattr(args, "reasoning_parser", None),
    )
    app.state.openai_serving_tokenization = OpenAIServingTokenization(
        engine,
        served,
        chat_template,
        trust_request_chat_template=bool(getattr(args, "trust_request_chat_template", False)),
    )
    app.state.openai_serving_completion.return_tokens_as_token_ids = as_ids
    app.state.openai_serving_chat.return_tokens_as_token_ids = as_ids


def served_model_names(args: argparse.Namespace, engine: AsyncLLM) -> list[str]:
    names = getattr(args, "served_model_name", None)
    if names:
        return list(names)
    return [engine.model_config.model]


def run_server(args: argparse.Namespace, started: StartedEngineCore | None = None) -> int:
    """Load the model (in an engine-core process unless PAGODA_ENABLE_MULTIPROCESSING=0), then
    serve HTTP until SIGINT/SIGTERM (exit status 0) or until the engine core fails (1).
    `started`: the engine core `pagoda serve` already forked
    (`pagoda.entrypoints.launch.start_engine_core`); without it, it is started here."""
    start = time.perf_counter()
    if started is None:
        started = start_engine_core(args)
    try:
        engine = AsyncLLM(
            started.config,
            log_stats=started.log_stats,
            core_process=started.core_process,
        )
    except BaseException:
        if started.core_process is not None:
            started.core_process.shutdown()
        raise
    app = build_app(args)
    init_app_state(app, engine, args)
    # Start-up leaves hundreds of thousands of objects that live as long as the server (modules,
    # tokenizer, configs): frozen, the collector stops rescanning them between engine steps (its
    # full collections took 4% of a decode step's profile).
    gc.collect()
    gc.freeze()
    host = args.host
    scheme = "https" if getattr(args, "ssl_certfile", None) else "http"
    logger.info(
        "Starting Pagoda API server on %s://%s:%d (model %s, ready in %.2f s)",
        scheme,
        host or "0.0.0.0",
        args.port,
        app.state.served_model_names[0],
        time.perf_counter() - start,
    )
    grace = float(getattr(args, "graceful_shutdown_timeout", None) or 50.0)
    config = uvicorn.Config(
        app,
        host=host,
        port=args.port,
        log_level=getattr(args, "uvicorn_log_level", None) or "info",
        access_log=not getattr(args, "disable_uvicorn_access_log", False),
        ssl_keyfile=getattr(args, "ssl_keyfile", None),
        ssl_certfile=getattr(args, "ssl_certfile", None),
        timeout_keep_alive=5,
        # NOTE: for h11, uvicorn's parser where httptools is not installed. h11 answers a bare
        # 400 ("Invalid HTTP request received") when a request's head arrives in pieces that
        # together exceed this buffer (16 KiB by default), before the edge limits can answer
        # 431 with an OpenAI body: whether a 64 KiB header got the 431 or the 400 depended on
        # how the kernel split it. 1 MiB (at least 4x the header limit) lets every head up to
        # it reach EdgeLimits.
        h11_max_incomplete_event_size=max(
            1 << 20, 4 * (getattr(args, "max_request_header_bytes", None) or 32 * 1024)
        ),
        # uvicorn's own limit only backs ours up: at the grace period the open requests are
        # ended with a final error (see _GracefulServer), so nothing is ever cut mid-body.
        timeout_graceful_shutdown=int(grace) + 5,
    )
    server = _GracefulServer(config, app, engine, grace)
    engine.on_dead.append(server.engine_failed)
    try:
        server.run()
    finally:
        engine.shutdown()
    if server.failure is not None:
        logger.error("Exiting: the engine core failed (%s)", server.failure)
        return 1
    return 0


class _GracefulServer(uvicorn.Server):
    """uvicorn's server, but SIGINT/SIGTERM end with exit code 0 after the graceful shutdown.

    NOTE: uvicorn re-raises the captured signal once it has shut down, so the process would die
    of SIGTERM (exit -15) even though everything was closed properly; orchestrators and tests
    read that as a crash.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, engine: Any, grace: float) -> None:
        super().__init__(config)
        self._app = app
        self._engine = engine
        self._grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failure: BaseException | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def engine_failed(self, exc: BaseException) -> None:
        """The engine core died: /health is 503 already; give the requests in flight two
        seconds to get their 500, then exit with status 1 (as vLLM does) so an orchestrator restarts
        the server instead of routing to a dead one."""
        if self.failure is None:
            self.failure = exc
            logger.error("Engine core failed: %s; the server stops", exc)
            if self._loop is not None:
                self._loop.call_later(2.0, setattr, self, "should_exit", True)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """The first signal starts the drain: /health and new requests answer 503, requests in
        flight get `grace` seconds to finish, then each ends with a final error (a stream with
        an error event and [DONE], others with a 503). A second signal exits at once."""
        if not self.should_exit and self._loop is not None:
            self._app.state.draining = True
            logger.info(
                "Draining: %d requests in flight get up to %.0f s to finish",
                len(getattr(self._engine, "_queues", {})),
                self._grace,
            )
            self._loop.call_soon_threadsafe(
                self._loop.call_later, self._grace, self._engine.stop_all
            )
        elif self.should_exit:
            # uvicorn forces only on a second SIGINT; Pagoda on either (an orchestrator's
            # second SIGTERM, or SIGINT after SIGTERM). Streams still get their final event if
            # the loop runs once more; the process does not wait for them.
            logger.info("Second signal: exiting now")
            self.force_exit = True
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._engine.stop_all)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _EXIT_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
