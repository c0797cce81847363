"""A request's constraint as one hashable `GrammarSpec`: what the backends compile and the cache key.

Torch-free: the API process builds and validates specs too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagoda.sampling_params import StructuredOutputsParams

# Longest schema, regex, grammar or joined choice text a request may carry: a bound on the work
# one request can ask the grammar compiler for.
MAX_SPEC_CHARS = 64 * 1024


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """`kind` is json, json_object, regex, grammar or choice; `text` the schema (JSON text), regex,
    grammar or choices (a JSON list); the options shape JSON grammars."""

    kind: str
    text: str
    any_whitespace: bool = True
    additional_properties: bool = True
    whitespace_pattern: str | None = None
    disable_fallback: bool = False

    @property
    def field(self) -> str:
        """The request field to name in an error about this spec."""
        return f"structured_outputs.{self.kind}"


def grammar_spec(params: StructuredOutputsParams) -> GrammarSpec:
    """The spec of `params`.

    Raises:
        ValueError: a schema that is not JSON, or a text longer than MAX_SPEC_CHARS.
    """
    kind = params.kind
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object).")
        text = json.dumps(schema, sort_keys=True)
    elif kind == "json_object":
        text = ""
    elif kind == "choice":
        assert params.choice is not None
        text = json.dumps(params.choice)
    else:
        value = getattr(params, kind)
        assert isinstance(value, str)
        text = value
    if len(text) > MAX_SPEC_CHARS:
        raise ValueError(
            f"structured_outputs.{kind} is {len(text)} characters; at most {MAX_SPEC_CHARS} are "
            "accepted."
        )
    return GrammarSpec(
        kind=kind,
        text=text,
        any_whitespace=not params.disable_any_whitespace,
        additional_properties=not params.disable_additional_properties,
        whitespace_pattern=params.whitespace_pattern,
        disable_fallback=params.disable_fallback,
    )


def choice_regex(choices: list[str]) -> str:
    """A regex that matches exactly one of `choices`."""
    return "(" + "|".join(_escape_regex(choice) for choice in choices) + ")"


def _escape_regex(text: str) -> str:
    # Every character that is special in a regex (Rust's and xgrammar's syntax alike) escaped.
    return "".join("\\" + c if c in r"\.^$|?*+()[]{}-/" else c for c in text)


def guidance_grammar(spec: GrammarSpec) -> str:
    """The spec as an llguidance grammar definition (for validation and the guidance backend)."""
    import llguidance

    if spec.kind == "json":
        schema = json.loads(spec.text)
        options: dict[str, object] = {"whitespace_flexible": spec.any_whitespace}
        if spec.whitespace_pattern is not None:
            options["whitespace_pattern"] = spec.whitespace_pattern
        if not spec.additional_properties:
            schema = closed_objects(schema)
        if isinstance(schema, dict):
            schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **options}}
        return llguidance.grammar_from("json_schema", json.dumps(schema))
    if spec.kind == "json_object":
        return llguidance.grammar_from("json_schema", json.dumps({"type": "object"}))
    if spec.kind == "choice":
        return llguidance.grammar_from("regex", choice_regex(json.loads(spec.text)))
    kind: Any = spec.kind  # "regex" or "grammar"
    return llguidance.grammar_from(kind, spec.text)


def closed_objects(schema: object) -> object:
    """`schema` with `additionalProperties: false` on every object schema that does not say."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_objects(value) for key, value in schema.items()}
    if (schema.get("type") == "object" or "properties" in schema) and (
        "additionalProperties" not in schema
    ):
        closed["additionalProperties"] = False
    return closed
