"""Tool calling through a live `pagoda serve --enable-auto-tool-choice --tool-call-parser hermes`
and the official `openai` client: required, named, none and auto; streamed and not; a
multi-turn conversation with a tool result; the 400s of bad tool requests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server import RemoteServer

pytestmark = pytest.mark.slow

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
            },
        },
    },
]
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    remote = RemoteServer(
        ["--max-model-len", "1024", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
        log_path=tmp_path_factory.mktemp("log") / "server.log",
    )
    yield remote
    assert remote.stop() == 0, remote.log_tail()


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def forcing(markup: str) -> dict[str, Any]:
    """The extra body that makes the model write exactly `markup` (a regex of it): the call
    markup is forced so a test does not depend on this small model choosing to call."""
    return {"structured_outputs": {"regex": markup.replace("{", "\\{").replace("}", "\\}")}}


def _check_call(call: Any, names: tuple[str, ...] = ("get_weather", "get_time")) -> None:
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name in names
    schema = next(t for t in TOOLS if t["function"]["name"] == call.function.name)["function"][
        "parameters"
    ]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_required_always_calls_a_tool(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call)


def test_a_named_function_is_called_with_valid_arguments(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=80,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    (call,) = choice.message.tool_calls or []
    _check_call(call, ("get_weather",))


def test_none_answers_in_text(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="", messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=20
    )
    assert response.choices[0].message.content
    assert not response.choices[0].message.tool_calls


def test_auto_parses_the_models_tool_call_markup(client: openai.OpenAI) -> None:
    """auto reads calls out of whatever the model writes; the call markup is forced here with a
    regex so the test does not depend on this small model choosing to call."""
    markup = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>'
    response = client.chat.completions.create(
        model="",
        messages=ASK,
        tools=TOOLS,
        temperature=0,
        max_tokens=60,
        extra_body=forcing(markup),
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # And plain prose stays content under auto.
    prose = client.chat.completions.create(
        model="", messages=ASK, tools=TOOLS, temperature=0, max_tokens=12
    )
    assert prose.choices[0].message.content and not prose.choices[0].message.tool_calls


def test_streamed_calls_arrive_name_first_then_arguments(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=80,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            if delta.function and delta.function.name:
                assert not entry["name"] and not entry["arguments"]  # the name comes first
                entry["name"] = delta.function.name
                assert delta.id and delta.type == "function"
            if delta.function and delta.function.arguments:
                entry["arguments"] += delta.function.arguments
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and calls
    for entry in calls.values():
        assert entry["name"] in ("get_weather", "get_time")
        json.loads(entry["arguments"])


def test_a_conversation_with_a_tool_result(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=80,
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    messages: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(
        model="", messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=20
    )
    assert answer.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": "required"}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
    ],
)
def test_bad_tool_requests_are_400s(server: RemoteServer, body: dict[str, Any], param: str) -> None:
    request = {"messages": ASK, "max_tokens": 5, **body}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=request, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_auto_streams_each_call_as_the_model_writes_it(client: openai.OpenAI) -> None:
    """Under auto the call goes out while it is generated: its name as soon as it is complete,
    then its arguments in several pieces whose concatenation is the model's arguments text."""
    markup = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        "\n</tool_call>"
    )
    stream = client.chat.completions.create(
        model="",
        messages=ASK,
        tools=TOOLS,
        temperature=0,
        max_tokens=80,
        stream=True,
        extra_body=forcing(markup),
    )
    name = None
    pieces: list[str] = []
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            assert delta.index == 0
            if delta.function and delta.function.name:
                assert name is None and not pieces  # the name first, once
                name = delta.function.name
                assert delta.id and delta.id.startswith("chatcmpl-tool-")
            if delta.function and delta.function.arguments:
                assert choice.finish_reason is None or len(pieces) > 0
                pieces.append(delta.function.arguments)
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and name == "get_weather"
    # Streamed as written, not in one piece at the end.
    assert len(pieces) >= 3, pieces
    assert "".join(pieces) == '{"city": "Paris", "unit": "celsius"}'
