"""FastAPI routes of the OpenAI-compatible API, and the handlers that keep errors OpenAI-shaped.

Handlers take only the raw `Request`: they parse the JSON body themselves, so a malformed body or
a field of the wrong type gets OpenAI's error shape with a 400 (never FastAPI's default 422), and
find their serving objects on `app.state` (set by the app factory). The request and response
models are still declared on each route (`_documented`, `install_openapi`), so `/openapi.json`
describes every body and `/docs` shows the fields.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pagoda.entrypoints.openai.protocol import (
    REFUSED_FIELDS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagoda.entrypoints.openai.serving_engine import error_body

logger = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=BaseModel)

# Names pydantic puts in an error's location for union members and wrapped validators; they say
# which alternative failed, not where in the body the problem is.
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"})


# The error types the serving classes use; other statuses get their HTTP phrase.
_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}


def _error(message: str, status_code: int = 400, param: str | None = None) -> JSONResponse:
    err_type = _ERROR_TYPES.get(status_code) or _status_phrase(status_code)
    body = error_body(message, err_type, status_code, param)
    return JSONResponse(body.model_dump(), status_code=status_code)


def _status_phrase(status_code: int) -> str:
    try:
        return HTTPStatus(status_code).phrase
    except ValueError:
        return "Error"


def _location(loc: tuple[int | str, ...]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in _UNION_TAGS or "[" in item or item.startswith("function-"):
            continue
        else:
            parts.append(f".{item}" if parts else item)
    return "".join(parts) or None


def validation_error_response(errors: list[Any]) -> JSONResponse:
    """A 400 naming the first validation error and its field (`param`)."""
    if not errors:
        return _error("Invalid request")
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    # FastAPI's own errors start with where the value came from ("body", "query").
    if loc and loc[0] in ("body", "query", "path", "header"):
        loc = loc[1:]
    param = _location(loc)
    message = str(first.get("msg", "Invalid request"))
    if first.get("type") == "value_error":
        # Our validators' messages already name the field.
        message = message.removeprefix("Value error, ")
    elif param is not None:
        message = f"{param}: {message}"
    return _error(message, 400, param)


async def _parse(raw_request: Request, model: type[RequestT]) -> RequestT | Response:
    try:
        body = await raw_request.json()
    except ClientDisconnect:  # hung up before sending the whole body: nobody to answer
        return Response(status_code=499)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return _error(f"Invalid JSON body: {exc}")
    except RecursionError:  # nested deeper than the parser's stack
        return _error(f"Invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels")
    problem = _body_problem(body, MAX_JSON_DEPTH)
    if problem is not None:
        return _error(f"Invalid JSON body: {problem}")
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        return validation_error_response(exc.errors(include_url=False))
    if request.model_extra:
        for name, value in request.model_extra.items():
            if name in REFUSED_FIELDS and value not in (None, False, _HARMLESS.get(name)):
                return _error(f"{name}: {REFUSED_FIELDS[name]}", 400, name)
        logger.warning(
            "The following fields were present in the request but ignored: %s",
            sorted(request.model_extra),
        )
    return request


# The deepest JSON body accepted: far beyond any real request (a tool schema nests a dozen
# levels), well before Python's recursion limit in the parser and the validators.
MAX_JSON_DEPTH = 64


def _body_problem(value: Any, limit: int) -> str | None:
    """What makes parsed JSON unacceptable, or None: nesting of lists and objects more than
    `limit` deep, or a string (value or key) with a lone UTF-16 surrogate (JSON's `\\ud800`
    escape parses to one; it is not text, and the tokenizer cannot encode it)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return "a string holds a lone UTF-16 surrogate, which is not valid text"
            continue
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return f"nested deeper than {limit} levels"
        stack.extend((child, depth + 1) for child in children)
    return None


# Values of refused fields that ask for nothing (their defaults): accepted.
_HARMLESS: dict[str, Any] = {"length_penalty": 1.0, "best_of": 1, "early_stopping": False}


async def _serve(
    raw_request: Request,
    model: type[RequestT],
    state_attr: str,
    call: Callable[[Any, RequestT, Request], Awaitable[Response]],
) -> Response:
    parsed = await _parse(raw_request, model)
    if isinstance(parsed, Response):
        return parsed
    serving = getattr(raw_request.app.state, state_attr, None)
    if serving is None:
        return _error(f"this server does not serve {raw_request.url.path}", 404)
    try:
        return await call(serving, parsed, raw_request)
    except Exception as exc:
        logger.exception("Unhandled error in %s", raw_request.url.path)
        return _error(str(exc) or type(exc).__name__, 500)


# The statuses a route answers with an OpenAI error body, and when.
_ERROR_STATUSES = {
    400: "Invalid request: malformed JSON, a field of the wrong type or out of range, a refused "
    "field, or a prompt longer than the context",
    401: "Missing or wrong API key (when the server has one)",
    404: "Unknown model",
    413: "Request body larger than --max-request-body-bytes",
    429: "Overloaded (--max-queued-requests / --max-queued-prompt-tokens); see Retry-After",
    431: "Request headers beyond --max-request-headers / --max-request-header-bytes",
    500: "Engine failure",
    503: "Shutting down; see Retry-After",
}

# Request models of the routes: put in the OpenAPI components by `install_openapi`.
_REQUEST_MODELS: list[type[BaseModel]] = [
    CompletionRequest,
    ChatCompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
]

# The stream chunk models, named in the streaming routes' descriptions.
_STREAM_MODELS: list[type[BaseModel]] = [CompletionStreamResponse, ChatCompletionStreamResponse]


def _documented(
    request_model: type[BaseModel] | None,
    response_model: type[BaseModel],
    stream_model: type[BaseModel] | None = None,
    errors: Iterable[int] = (400, 401, 404, 413, 429, 431, 500, 503),
) -> dict[str, Any]:
    """Route keywords that document the body the handler parses itself and what it returns."""
    ok: dict[str, Any] = {"model": response_model, "description": "Successful response"}
    if stream_model is not None:
        ok["description"] = (
            f"`stream: false`: a {response_model.__name__}. `stream: true`: server-sent events, "
            f"each `data: <{stream_model.__name__} JSON>`, ending with `data: [DONE]`"
        )
        event = sse_event_schema(f"a {stream_model.__name__} as JSON, or [DONE] last")
        ok["content"] = {"text/event-stream": {"schema": event}}
    responses: dict[int | str, dict[str, Any]] = {200: ok}
    for status in errors:
        responses[status] = {"model": ErrorResponse, "description": _ERROR_STATUSES[status]}
    extra: dict[str, Any] = {}
    if request_model is not None:
        ref = {"$ref": f"#/components/schemas/{request_model.__name__}"}
        extra["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    return {"response_model": None, "responses": responses, "openapi_extra": extra}


def sse_event_schema(data_description: str) -> dict[str, Any]:
    """The schema of one server-sent event as an SSE parser hands it over (its fields); its
    `data` is described by `data_description`."""
    return {
        "type": "object",
        "properties": {
            "data": {"type": "string", "description": data_description},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
        },
        "required": ["data"],
    }


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` carry the request models' schemas, which the routes reference but
    FastAPI does not see (the handlers parse bodies themselves)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title="Pagoda OpenAI-compatible API",
            version=_version(),
            description="OpenAI's completions, chat completions and models routes with vLLM's "
            "extra fields, plus tokenization, health and Prometheus metrics.",
            routes=app.routes,
        )
        _, defs = models_json_schema(
            [(model, "validation") for model in _REQUEST_MODELS]
            + [(model, "serialization") for model in _STREAM_MODELS],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            # A response part FastAPI already put there (same model) keeps FastAPI's rendering.
            components.setdefault(name, definition)
        serving_models = getattr(app.state, "openai_serving_models", None)
        if serving_models is not None:
            _document_model_names(components, serving_models.served_model_names)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_model_names(components: dict[str, Any], names: list[str]) -> None:
    """Request bodies' `model` documented as one of the names this server serves (any other
    gets a 404)."""
    for model in _REQUEST_MODELS:
        properties = components.get(model.__name__, {}).get("properties", {})
        if "model" not in properties:
            continue
        field = properties["model"]
        choices: dict[str, Any] = {"type": "string", "enum": list(names)}
        nullable = any(option.get("type") == "null" for option in field.get("anyOf", []))
        properties["model"] = {
            "anyOf": [choices, {"type": "null"}] if nullable else [choices],
            "title": field.get("title", "Model"),
            "description": "A served model name (GET /v1/models); null or absent: the first.",
        }


def _version() -> str:
    import pagoda

    return pagoda.__version__


def build_router() -> APIRouter:
    """The OpenAI-compatible routes; serving objects come from `app.state`."""
    router = APIRouter()

    @router.get("/v1/models", **_documented(None, ModelList, errors=(401, 404)))
    async def show_available_models(raw_request: Request) -> Response:
        serving = getattr(raw_request.app.state, "openai_serving_models", None)
        if serving is None:
            return _error("this server does not list models", 404)
        models = await serving.show_available_models()
        return JSONResponse(models.model_dump())

    @router.post(
        "/v1/completions",
        **_documented(CompletionRequest, CompletionResponse, CompletionStreamResponse),
    )
    async def create_completion(raw_request: Request) -> Response:
        return await _serve(
            raw_request,
            CompletionRequest,
            "openai_serving_completion",
            lambda serving, request, raw: serving.create_completion(request, raw),
        )

    @router.post(
        "/v1/chat/completions",
        **_documented(ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse),
    )
    async def create_chat_completion(raw_request: Request) -> Response:
        return await _serve(
            raw_request,
            ChatCompletionRequest,
            "openai_serving_chat",
            lambda serving, request, raw: serving.create_chat_completion(request, raw),
        )

    tokenizer_errors = (400, 401, 404, 413, 431, 500, 503)

    @router.post(
        "/tokenize", **_documented(TokenizeRequest, TokenizeResponse, errors=tokenizer_errors)
    )
    async def tokenize(raw_request: Request) -> Response:
        return await _serve(
            raw_request,
            TokenizeRequest,
            "openai_serving_tokenization",
            lambda serving, request, raw: serving.create_tokenize(request, raw),
        )

    @router.post(
        "/detokenize", **_documented(DetokenizeRequest, DetokenizeResponse, errors=tokenizer_errors)
    )
    async def detokenize(raw_request: Request) -> Response:
        return await _serve(
            raw_request,
            DetokenizeRequest,
            "openai_serving_tokenization",
            lambda serving, request, raw: serving.create_detokenize(request, raw),
        )

    return router


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app returns OpenAI-shaped: HTTPExceptions keep their status,
    request validation errors become 400s, and anything uncaught becomes a 500."""

    async def http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        response = _error(str(exc.detail), exc.status_code)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def request_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_error_response(list(exc.errors()))

    async def unhandled(request: Request, exc: Exception) -> Response:
        logger.exception("Unhandled error in %s", request.url.path, exc_info=exc)
        return _error(str(exc) or type(exc).__name__, 500)

    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(Exception, unhandled)
