"""Each tool-call parser on recorded outputs of its format: one call, several, content around
them, and malformed output (returned whole as content, no calls)."""

from __future__ import annotations

import json

import pytest

from pagoda.entrypoints.openai.tool_parsers import TOOL_PARSERS, get_tool_parser


def calls_of(name: str, text: str) -> tuple[str | None, list[tuple[str, dict[str, object]]]]:
    extracted = get_tool_parser(name).extract(text)
    return extracted.content, [(c.name, json.loads(c.arguments)) for c in extracted.calls]


def test_hermes() -> None:
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert calls_of("hermes", one) == (None, [("get_weather", {"city": "Paris"})])
    two = (
        "Let me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    assert calls_of("hermes", two) == (
        "Let me check both.\n",
        [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})],
    )
    # An unclosed last call (the stop token came first) still parses.
    unclosed = '<tool_call>{"name": "f", "arguments": {}}'
    assert calls_of("hermes", unclosed) == (None, [("f", {})])
    for bad in ["Just text.", '<tool_call>{"name": "f", "arguments": {</tool_call>']:
        assert calls_of("hermes", bad) == (bad, [])


def test_llama3_json() -> None:
    assert calls_of("llama3_json", '{"name": "f", "parameters": {"x": 1}}') == (
        None,
        [("f", {"x": 1})],
    )
    several = '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "arguments": {}}'
    assert calls_of("llama3_json", several) == (None, [("f", {"x": 1}), ("g", {})])
    for bad in ["The answer is 4.", '{"name": "f", "parameters": {"x": 1}} and more', "{oops"]:
        assert calls_of("llama3_json", bad) == (bad, [])


def test_mistral() -> None:
    listed = '[TOOL_CALLS][{"name": "f", "arguments": {"a": "b"}}, {"name": "g", "arguments": {}}]'
    assert calls_of("mistral", listed) == (None, [("f", {"a": "b"}), ("g", {})])
    v11 = 'Sure.[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}'
    assert calls_of("mistral", v11) == ("Sure.", [("f", {"a": 1}), ("g", {})])
    for bad in ["No calls here.", "[TOOL_CALLS][{broken"]:
        assert calls_of("mistral", bad) == (bad, [])


def test_pythonic() -> None:
    text = '[get_weather(city="Paris", days=3), get_time(zone="CET", dst=True)]'
    assert calls_of("pythonic", text) == (
        None,
        [("get_weather", {"city": "Paris", "days": 3}), ("get_time", {"zone": "CET", "dst": True})],
    )
    for bad in ["[1, 2, 3]", "[f(x)]", "[f(a=open('x'))]", "not a list", "[f(a=1"]:
        assert calls_of("pythonic", bad) == (bad, [])


def test_unknown_parsers_are_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        get_tool_parser("nope")
    assert sorted(TOOL_PARSERS) == ["hermes", "llama3_json", "mistral", "pythonic"]


@pytest.mark.parametrize(
    ("parser_name", "text", "expected"),
    [
        (
            "hermes",
            'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"tags": ["a}", {"b": "]"}], "n": 3}}\n</tool_call>\n<tool_call>{"name": "f", '
            '"arguments": {}}</tool_call>',
            [("get_weather", '{"city": "Paris", "tags": ["a}", {"b": "]"}], "n": 3}'), ("f", "{}")],
        ),
        (
            "llama3_json",
            '{"name": "a", "parameters": {"q": "x\\"y"}}; {"name": "b", "parameters": {"z": true}}',
            [("a", '{"q": "x\\"y"}'), ("b", '{"z": true}')],
        ),
        (
            "mistral",
            '[TOOL_CALLS][{"name": "a", "arguments": {"q": 1}}, {"name": "b", "arguments": {}}]',
            [("a", '{"q": 1}'), ("b", "{}")],
        ),
    ],
)
def test_streamed_calls_only_grow_and_end_as_the_whole_calls(
    parser_name: str, text: str, expected: list[tuple[str, str]]
) -> None:
    # Every prefix of the output: names appear once complete, arguments only ever grow, and the
    # last state is each call's exact arguments text, which parses like extract()'s.
    parser = get_tool_parser(parser_name)
    previous: list[tuple[str | None, str]] = []
    for end in range(len(text) + 1):
        calls = parser.stream_calls(text[:end]) or []
        state = [(call.name, call.arguments) for call in calls]
        for (old_name, old_args), (name, args) in zip(previous, state):
            assert old_name is None or old_name == name
            assert args.startswith(old_args), (end, old_args, args)
        previous = state
    assert previous == expected
    extracted = parser.extract(text)
    assert [json.loads(a) for _, a in expected] == [
        json.loads(c.arguments) for c in extracted.calls
    ]


def test_formats_that_cannot_stream_say_so() -> None:
    assert get_tool_parser("pythonic").stream_calls("[f(a=1)]") is None
    assert get_tool_parser("mistral").stream_calls('[TOOL_CALLS]f[ARGS]{"a": 1}') is None
    assert get_tool_parser("hermes").stream_calls("no call here") is None
