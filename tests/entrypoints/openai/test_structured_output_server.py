"""Structured output through a live `pagoda serve` and the official `openai` client: OpenAI's
`response_format` (and `chat.completions.parse` with a pydantic model), vLLM's
`structured_outputs` and `guided_*` fields, streaming, the 400s of invalid constraints, and the
fields Pagoda refuses rather than ignores."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server import RemoteServer

pytestmark = pytest.mark.slow

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}


class Capital(BaseModel):
    city: str = Field(max_length=30)
    country: str = Field(max_length=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    remote = RemoteServer(
        ["--max-model-len", "1024"], log_path=tmp_path_factory.mktemp("log") / "server.log"
    )
    yield remote
    assert remote.stop() == 0, remote.log_tail()


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


ASK = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]


def test_parse_returns_the_pydantic_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="", messages=ASK, response_format=Capital, temperature=0, max_tokens=60
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Capital)
    assert completion.choices[0].finish_reason == "stop"


def test_json_schema_and_json_object_response_formats(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="",
        messages=ASK,
        temperature=0,
        max_tokens=60,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": CITY, "strict": True},
        },
    )
    jsonschema.validate(json.loads(response.choices[0].message.content or ""), CITY)
    response = client.chat.completions.create(
        model="",
        messages=ASK,
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(response.choices[0].message.content or ""), dict)


def test_vllm_fields_on_completions_choice_regex_grammar(client: openai.OpenAI) -> None:
    choice = client.completions.create(
        model="",
        prompt="Is water wet? Answer:",
        temperature=0,
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert choice.choices[0].text in ("yes", "no")
    regex = client.completions.create(
        model="",
        prompt="The year is",
        temperature=0,
        max_tokens=10,
        extra_body={"guided_regex": r"[12][0-9]{3}"},
    )
    assert re.fullmatch(r"[12][0-9]{3}", regex.choices[0].text)
    grammar = client.completions.create(
        model="",
        prompt="A colour:",
        temperature=0,
        max_tokens=10,
        extra_body={"guided_grammar": 'root ::= "red" | "green" | "blue"'},
    )
    assert grammar.choices[0].text in ("red", "green", "blue")
    guided = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "Pick a side"}],
        temperature=0,
        max_tokens=10,
        extra_body={"guided_choice": ["left", "right"]},
    )
    assert guided.choices[0].message.content in ("left", "right")


def test_streamed_json_parses_when_joined(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="",
        messages=ASK,
        temperature=0,
        max_tokens=60,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), CITY)


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
            "response_format.json_schema.schema is invalid",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", ""),
        ({"structured_outputs": {"regex": "(a"}}, "structured_outputs", "regex is invalid"),
        ({"structured_outputs": {"pattern": "a"}}, "structured_outputs", "pattern"),
        (
            {"structured_outputs": {"regex": "a", "_reasoning_end_token_id": 5}},
            "structured_outputs",
            "_reasoning_end_token_id",
        ),
        ({"guided_json": "{not json"}, "guided_json", "guided_json is not valid JSON"),
        (
            {"guided_choice": ["a"], "structured_outputs": {"regex": "a"}},
            "guided_choice",
            "Only one structured output constraint",
        ),
        (
            {"use_beam_search": True, "response_format": {"type": "json_object"}},
            "response_format",
            "not supported with use_beam_search",
        ),
        ({"best_of": 2}, "best_of", "best_of is supported on /v1/completions only"),
        (
            {"prompt_logprobs": 1, "stream": True},
            "prompt_logprobs",
            "prompt_logprobs are not available when stream is true",
        ),
        ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend", "per-request"),
    ],
)
def test_bad_constraints_and_refused_fields_are_400s_naming_the_field(
    server: RemoteServer, body: dict[str, object], param: str, message: str
) -> None:
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=request, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"]
    # The server still answers the next request.
    ok = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60
    )
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def reasoning_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    remote = RemoteServer(
        ["--max-model-len", "512", "--reasoning-parser", "deepseek_r1"],
        log_path=tmp_path_factory.mktemp("log") / "server.log",
    )
    yield remote
    assert remote.stop() == 0, remote.log_tail()


def test_reasoning_content_is_split_from_the_answer(reasoning_server: RemoteServer) -> None:
    """--reasoning-parser deepseek_r1: the thinking goes to reasoning_content, streamed or not.
    (The output is forced by a regex: this small model does not think aloud by itself.)"""
    client = openai.OpenAI(base_url=f"{reasoning_server.url}/v1", api_key="x", max_retries=0)
    kwargs: dict[str, object] = {
        "model": "",
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "temperature": 0,
        "max_tokens": 40,
        "extra_body": {"structured_outputs": {"regex": r"Paris is in France\.</think>Paris"}},
    }
    response = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    message = response.choices[0].message
    assert message.reasoning_content == "Paris is in France."  # type: ignore[attr-defined]
    assert message.content == "Paris"
    stream = client.chat.completions.create(stream=True, **kwargs)  # type: ignore[call-overload]
    reasoning, content = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == ("Paris is in France.", "Paris")


def test_an_xgrammar_only_server_refuses_what_only_guidance_compiles(tmp_path: Path) -> None:
    """whitespace_pattern is llguidance's: with the backend pinned to xgrammar it is a 400, not
    a request the engine aborts."""
    remote = RemoteServer(
        ["--max-model-len", "512", "--structured-outputs-config", '{"backend": "xgrammar"}'],
        log_path=tmp_path / "server.log",
    )
    try:
        request = {
            "prompt": "JSON:",
            "max_tokens": 20,
            "guided_json": {"type": "object"},
            "guided_whitespace_pattern": "[ ]?",
        }
        response = httpx.post(f"{remote.url}/v1/completions", json=request, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "guided_json" and "whitespace_pattern" in error["message"]
        del request["guided_whitespace_pattern"]
        response = httpx.post(f"{remote.url}/v1/completions", json=request, timeout=60)
        assert response.status_code == 200
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        assert remote.stop() == 0, remote.log_tail()
