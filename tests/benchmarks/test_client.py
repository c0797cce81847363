"""One streamed request, against a mocked server: what is timed, counted, and recorded as failed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx

from pagoda.benchmarks.client import RequestInput, build_payload, send_request
from pagoda.benchmarks.results import RequestOutcome
from pagoda.benchmarks.serve import count_missing_output_tokens
from tests.tiny_llama import make_tokenizer

URL = "http://bench.test/v1/completions"


def request(backend: str = "openai", **kwargs: Any) -> RequestInput:
    fields: dict[str, Any] = {
        "backend": backend,
        "api_url": URL,
        "model": "m",
        "prompt": "Hello there",
        "prompt_len": 2,
        "output_len": 4,
        "request_id": "bench-1",
        **kwargs,
    }
    return RequestInput(**fields)


def sse(*events: dict[str, Any] | str) -> bytes:
    lines = [e if isinstance(e, str) else json.dumps(e) for e in events]
    return "".join(f"data: {line}\n\n" for line in lines).encode()


def text_chunk(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


def send(handler: Callable[[httpx.Request], httpx.Response], req: RequestInput) -> RequestOutcome:
    async def go() -> RequestOutcome:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, req)

    return asyncio.run(go())


def test_completion_payload_streams_with_usage_and_ignore_eos() -> None:
    payload = build_payload(request(ignore_eos=True, sampling={"temperature": 0.0}))
    assert payload == {
        "model": "m",
        "prompt": "Hello there",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }


def test_chat_payload_sends_one_user_message() -> None:
    payload = build_payload(request("openai-chat"))
    assert payload["messages"] == [{"role": "user", "content": "Hello there"}]
    assert payload["max_completion_tokens"] == 4
    assert "prompt" not in payload and "ignore_eos" not in payload


def test_text_chunks_give_ttft_and_gaps_and_usage_gives_the_token_count() -> None:
    seen: list[httpx.Request] = []

    def handler(http_request: httpx.Request) -> httpx.Response:
        seen.append(http_request)
        body = sse(
            text_chunk("a"),
            text_chunk(""),  # an empty chunk is neither a token arrival nor a gap
            text_chunk("b"),
            text_chunk("c"),
            {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 4}},
            "[DONE]",
        )
        return httpx.Response(200, content=body)

    outcome = send(handler, request())
    assert outcome.success and outcome.error == ""
    assert outcome.generated_text == "abc"
    assert len(outcome.itl) == 2
    assert outcome.output_tokens == 4
    assert 0 < outcome.ttft <= outcome.latency
    assert seen[0].headers["x-request-id"] == "bench-1"


def test_chat_deltas_are_read_and_missing_usage_is_counted_with_the_tokenizer() -> None:
    def handler(http_request: httpx.Request) -> httpx.Response:
        body = sse(
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {"choices": [{"index": 0, "delta": {"content": "Hello"}}]},
            {"choices": [{"index": 0, "delta": {"content": " world"}}]},
            "[DONE]",
        )
        return httpx.Response(200, content=body)

    outcome = send(handler, request("openai-chat"))
    assert outcome.success and outcome.generated_text == "Hello world"
    assert outcome.output_tokens == 0
    tokenizer = make_tokenizer()
    count_missing_output_tokens([outcome], tokenizer)
    assert outcome.output_tokens == len(tokenizer.encode("Hello world", add_special_tokens=False))


def test_http_error_is_recorded_with_the_openai_message() -> None:
    def handler(http_request: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "The model `m` does not exist.", "code": 404}}
        return httpx.Response(404, json=body)

    outcome = send(handler, request())
    assert not outcome.success
    assert outcome.error == "HTTP 404: The model `m` does not exist."


def test_error_event_mid_stream_fails_the_request() -> None:
    def handler(http_request: httpx.Request) -> httpx.Response:
        body = sse(text_chunk("a"), {"error": {"message": "engine died"}}, "[DONE]")
        return httpx.Response(200, content=body)

    outcome = send(handler, request())
    assert not outcome.success and "engine died" in outcome.error


def test_stream_cut_before_done_fails_the_request() -> None:
    def handler(http_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(text_chunk("a")))

    outcome = send(handler, request())
    assert not outcome.success and outcome.error == "the stream ended before [DONE]"


def test_connection_error_fails_the_request_instead_of_raising() -> None:
    def handler(http_request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=http_request)

    outcome = send(handler, request())
    assert not outcome.success and outcome.error.startswith("ConnectError")
