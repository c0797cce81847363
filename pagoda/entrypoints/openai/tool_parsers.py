"""Tool-call parsers: a model's text output into OpenAI `tool_calls`, one parser per format.

`--tool-call-parser NAME` picks one (vLLM's names); `tool_choice: "auto"` runs it on every output.
Each parser returns the content the model wrote besides its calls and the calls themselves; an
output it cannot parse is returned as content, whole, with no calls (as vLLM does), so a model that
answers in prose is never turned into an error. `start_markers` are where a call can begin: a
stream holds its text back from there until the output ends, then sends the calls.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number (Qwen2.5/3,
  Hermes, most `<tool_call>` JSON models); content is the text before the first call.
- llama3_json: the whole output is `{"name": ..., "parameters": {...}}` (or `arguments`), several
  separated by `;`, optionally after `<|python_tag|>` (Llama 3.1-3.3).
- mistral: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}` (Mistral v0.3 and later),
  or `[TOOL_CALLS]name[ARGS]{...}` per call (the v11 tokenizer's form).
- pythonic: the whole output is a Python list of calls, `[f(a=1), g(b="x")]` (Llama 3.2/4 and
  others); arguments must be literals.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ToolCall:
    """One call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(slots=True)
class ExtractedToolCalls:
    content: str | None
    calls: list[ToolCall]


def _arguments_json(value: Any) -> str:
    if isinstance(value, str):  # some models write the arguments as a JSON string already
        try:
            json.loads(value)
            return value
        except ValueError:
            return json.dumps(value)
    return json.dumps(value if value is not None else {}, ensure_ascii=False)


def _call_from_object(obj: Any, argument_keys: tuple[str, ...] = ("arguments",)) -> ToolCall:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("a tool call must be an object with a string name")
    arguments: Any = next((obj[key] for key in argument_keys if key in obj), {})
    return ToolCall(obj["name"], _arguments_json(arguments))


def _content_or_none(text: str) -> str | None:
    return text if text.strip() else None


@dataclass(slots=True)
class PartialCall:
    """A call as far as a stream has written it: its name once the string is complete, and the
    raw text of its arguments value so far (`arguments_done` once the value is balanced). The raw
    text only ever grows, so a stream can send it piece by piece."""

    name: str | None
    arguments: str
    arguments_done: bool


def _string_end(text: str, start: int) -> int | None:
    """The index after the JSON string that opens at `text[start]` ('"'), or None if unfinished."""
    position = start + 1
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2
            continue
        if char == '"':
            return position + 1
        position += 1
    return None


def _value_end(text: str, start: int) -> int | None:
    """The index after the JSON value that begins at `text[start]`, or None if unfinished."""
    if start >= len(text):
        return None
    if text[start] == '"':
        return _string_end(text, start)
    if text[start] not in "{[":
        match = re.compile(r"[^,}\]\s]*").match(text, start)
        end = match.end() if match else start
        return end if end < len(text) else None  # a bare literal may still grow
    depth, position = 0, start
    while position < len(text):
        char = text[position]
        if char == '"':
            string_end = _string_end(text, position)
            if string_end is None:
                return None
            position = string_end
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return position + 1
        position += 1
    return None


def scan_call_objects(
    text: str, argument_keys: tuple[str, ...] = ("arguments", "parameters")
) -> list[PartialCall]:
    """The call objects `{"name": ..., "arguments": ...}` in `text`, complete or not, in order:
    every top-level `{` starts one, and what lies between them (tags, separators) is skipped.
    The arguments count only once the name came first (the templates' order); a call whose
    arguments come first is reported without them until the end."""
    calls: list[PartialCall] = []
    position = 0
    while True:
        start = text.find("{", position)
        if start < 0:
            return calls
        call = PartialCall(None, "", False)
        calls.append(call)
        cursor = start + 1
        while True:
            key_match = re.compile(r'\s*,?\s*"').match(text, cursor)
            if key_match is None:
                break
            key_start = key_match.end() - 1
            key_end = _string_end(text, key_start)
            if key_end is None:
                return calls
            key = text[key_start + 1 : key_end - 1]
            colon = re.compile(r"\s*:\s*").match(text, key_end)
            if colon is None or colon.end() >= len(text):
                return calls
            value_start = colon.end()
            value_end = _value_end(text, value_start)
            if key == "name" and text[value_start] == '"':
                if value_end is None:
                    return calls
                call.name = json.loads(text[value_start:value_end])
            elif key in argument_keys and call.name is not None:
                call.arguments = text[value_start : value_end or len(text)]
                call.arguments_done = value_end is not None
            if value_end is None:
                return calls
            cursor = value_end
        object_end = _value_end(text, start)
        if object_end is None:
            return calls
        position = object_end


class ToolParser:
    name = ""
    start_markers: tuple[str, ...] = ()

    def stream_calls(self, text: str) -> list[PartialCall] | None:
        """The calls begun in `text` so far, for streaming them as they are written; None when
        this format cannot be streamed before the output ends (the calls then go out whole)."""
        return None

    def extract(self, text: str) -> ExtractedToolCalls:
        try:
            return self._extract(text)
        except (ValueError, SyntaxError, TypeError):
            return ExtractedToolCalls(text, [])

    def _extract(self, text: str) -> ExtractedToolCalls:
        raise NotImplementedError


class HermesToolParser(ToolParser):
    name = "hermes"
    start_markers = ("<tool_call>",)

    def stream_calls(self, text: str) -> list[PartialCall] | None:
        start = text.find("<tool_call>")
        if start < 0:
            return None
        return scan_call_objects(text[start:], ("arguments",))

    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def _extract(self, text: str) -> ExtractedToolCalls:
        start = text.find("<tool_call>")
        if start < 0:
            return ExtractedToolCalls(text, [])
        calls = [_call_from_object(json.loads(body)) for body in self._CALL.findall(text[start:])]
        return ExtractedToolCalls(_content_or_none(text[:start]), calls)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_markers = ("<|python_tag|>", "{")

    def stream_calls(self, text: str) -> list[PartialCall] | None:
        body = text.lstrip().removeprefix("<|python_tag|>").lstrip()
        if not body.startswith("{"):
            return None
        return scan_call_objects(body, ("parameters", "arguments"))

    def _extract(self, text: str) -> ExtractedToolCalls:
        body = text.strip().removeprefix("<|python_tag|>").lstrip()
        if not body.startswith("{"):
            return ExtractedToolCalls(text, [])
        decoder = json.JSONDecoder()
        calls, position = [], 0
        while position < len(body):
            obj, position = decoder.raw_decode(body, position)
            calls.append(_call_from_object(obj, ("parameters", "arguments")))
            rest = body[position:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                raise ValueError("text after the tool calls")
            position = len(body) - len(rest)
        return ExtractedToolCalls(None, calls)


class MistralToolParser(ToolParser):
    name = "mistral"
    start_markers = ("[TOOL_CALLS]",)

    def stream_calls(self, text: str) -> list[PartialCall] | None:
        start = text.find("[TOOL_CALLS]")
        if start < 0 or "[ARGS]" in text[start:]:
            return None  # the [ARGS] form goes out whole
        return scan_call_objects(text[start + len("[TOOL_CALLS]") :], ("arguments",))

    def _extract(self, text: str) -> ExtractedToolCalls:
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return ExtractedToolCalls(text, [])
        content = _content_or_none(text[:start])
        body = text[start:]
        if "[ARGS]" in body:  # [TOOL_CALLS]name[ARGS]{...}, repeated
            calls = []
            for part in body.split("[TOOL_CALLS]")[1:]:
                name, _, arguments = part.partition("[ARGS]")
                calls.append(ToolCall(name.strip(), _arguments_json(json.loads(arguments))))
            return ExtractedToolCalls(content, calls)
        listed = json.loads(body.removeprefix("[TOOL_CALLS]").strip())
        if isinstance(listed, dict):
            listed = [listed]
        return ExtractedToolCalls(content, [_call_from_object(obj) for obj in listed])


class PythonicToolParser(ToolParser):
    name = "pythonic"
    start_markers = ("[",)

    def _extract(self, text: str) -> ExtractedToolCalls:
        body = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>")
        if not body.startswith("["):
            return ExtractedToolCalls(text, [])
        tree = ast.parse(body, mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return ExtractedToolCalls(text, [])
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                raise ValueError("each element must be a call with keyword arguments")
            arguments = {
                kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None
            }
            calls.append(ToolCall(node.func.id, json.dumps(arguments, ensure_ascii=False)))
        return ExtractedToolCalls(None, calls)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser
    for parser in (HermesToolParser, Llama3JsonToolParser, MistralToolParser, PythonicToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    """The parser called `name`. Raises ValueError naming the known ones."""
    parser = TOOL_PARSERS.get(name)
    if parser is None:
        raise ValueError(
            f"unknown tool call parser {name!r}; available: {', '.join(sorted(TOOL_PARSERS))}"
        )
    return parser()
