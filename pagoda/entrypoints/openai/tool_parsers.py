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


class ToolParser:
    name = ""
    start_markers: tuple[str, ...] = ()

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
