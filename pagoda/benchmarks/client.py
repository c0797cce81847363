"""The HTTP side of `pagoda bench serve`: one streamed OpenAI request, timed chunk by chunk.

A request is POSTed with `stream: true` and `stream_options.include_usage`, and its server-sent
events are read as they arrive. The first event carrying text sets the time to first token; every
later event carrying text adds one inter-token gap; the usage event (when the server sends one)
gives the exact output token count. Any failure (connection refused, an HTTP error status, an
`error` event mid-stream, a stream cut before `[DONE]`) is recorded on the outcome, never raised,
so one bad request cannot stop a benchmark.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from pagoda.benchmarks.cli import BACKENDS
from pagoda.benchmarks.results import RequestOutcome

# vLLM's client allows six hours per request: a long benchmark must not time out its own requests.
REQUEST_TIMEOUT_S = 6 * 60 * 60
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class RequestInput:
    """One request to send: the prompt, its token count and the sampling settings."""

    backend: str
    api_url: str
    model: str
    prompt: str
    prompt_len: int
    output_len: int
    request_id: str
    ignore_eos: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def build_payload(request: RequestInput) -> dict[str, Any]:
    """The JSON body for `request`'s backend (`openai`: completions, `openai-chat`: chat)."""
    payload: dict[str, Any] = {"model": request.model}
    if request.backend == "openai":
        payload["prompt"] = request.prompt
        payload["max_tokens"] = request.output_len
    elif request.backend == "openai-chat":
        payload["messages"] = [{"role": "user", "content": request.prompt}]
        payload["max_completion_tokens"] = request.output_len
    else:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {request.backend!r}")
    payload["stream"] = True
    payload["stream_options"] = {"include_usage": True}
    if request.ignore_eos:
        payload["ignore_eos"] = True
    payload.update(request.sampling)
    return payload


def _completion_text(choice: dict[str, Any]) -> str:
    return str(choice.get("text") or "")


def _chat_text(choice: dict[str, Any]) -> str:
    delta = choice.get("delta") or {}
    return str(delta.get("content") or delta.get("reasoning_content") or "")


_TEXT_OF: dict[str, Callable[[dict[str, Any]], str]] = {
    "openai": _completion_text,
    "openai-chat": _chat_text,
}


async def send_request(client: httpx.AsyncClient, request: RequestInput) -> RequestOutcome:
    """Send one streamed request and time it; failures are recorded in the outcome."""
    outcome = RequestOutcome(prompt_len=request.prompt_len)
    text_of = _TEXT_OF[request.backend]
    payload = build_payload(request)
    headers = {"x-request-id": request.request_id, **request.headers}
    parts: list[str] = []
    outcome.start_time = start = time.perf_counter()
    last_text_time = 0.0
    try:
        async with client.stream("POST", request.api_url, json=payload, headers=headers) as reply:
            if reply.status_code != 200:
                body = (await reply.aread()).decode(errors="replace")
                outcome.error = f"HTTP {reply.status_code}: {_error_message(body)}"
                return outcome
            done = False
            async for line in reply.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments, `event:` lines
                data = line[len("data:") :].strip()
                now = time.perf_counter()
                if data == "[DONE]":
                    outcome.latency = now - start
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    outcome.error = f"error event: {_error_message(data)}"
                    return outcome
                choices = event.get("choices")
                text = text_of(choices[0]) if choices else ""
                if text:
                    if not parts:
                        outcome.ttft = now - start
                    else:
                        outcome.itl.append(now - last_text_time)
                    last_text_time = now
                    parts.append(text)
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    outcome.output_tokens = int(usage["completion_tokens"])
            if not done:
                outcome.error = "the stream ended before [DONE]"
                return outcome
    except Exception as exc:
        # Connection errors, a malformed event, a server killed mid-stream: all count as failed.
        outcome.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        return outcome
    outcome.generated_text = "".join(parts)
    if not parts:
        # NOTE: a request that produced no visible text still produced its first token when the
        # stream ended; counting that time keeps TTFT meaningful instead of 0.
        outcome.ttft = outcome.latency
    outcome.success = True
    return outcome


def _error_message(body: str) -> str:
    """The `message` of an OpenAI error body, else the body itself, shortened."""
    try:
        error = json.loads(body).get("error")
    except (json.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:_MAX_ERROR_CHARS]
    if isinstance(error, str):
        return error[:_MAX_ERROR_CHARS]
    return body.strip()[:_MAX_ERROR_CHARS]
