"""`/openapi.json` describes every body: request models on the POST routes, response and error
models on every route, so `/docs` shows the fields and schema-driven tools see real operations.
The bodies real clients send validate against it; the ones the server refuses do not."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import httpx
import jsonschema
import pytest

from pagoda.entrypoints.openai.api_server import build_app


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    app = build_app(argparse.Namespace())

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/openapi.json")

    response = asyncio.run(get())
    assert response.status_code == 200
    return dict(response.json())


def body_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    """The request body schema of `POST path`, resolvable against the document's components."""
    ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = ref["$ref"].rsplit("/", 1)[1]
    return {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/tokenize", "TokenizeRequest"),
        ("/detokenize", "DetokenizeRequest"),
    ],
)
def test_every_post_route_documents_its_body_and_errors(
    spec: dict[str, Any], path: str, model: str
) -> None:
    operation = spec["paths"][path]["post"]
    assert operation["requestBody"]["required"] is True
    schema = spec["components"]["schemas"][model]
    assert schema["type"] == "object" and schema["properties"]
    responses = operation["responses"]
    ok = responses["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.rsplit("/", 1)[1] in spec["components"]["schemas"]
    for status in ("400", "401", "404", "413", "431", "500", "503"):
        error = responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert error.endswith("/ErrorResponse"), (path, status)
    # Every reference in the document resolves.
    jsonschema.Draft202012Validator.check_schema(schema)


def test_streaming_routes_document_the_event_stream(spec: dict[str, Any]) -> None:
    for path, chunk in (
        ("/v1/completions", "CompletionStreamResponse"),
        ("/v1/chat/completions", "ChatCompletionStreamResponse"),
    ):
        ok = spec["paths"][path]["post"]["responses"]["200"]
        assert "text/event-stream" in ok["content"]
        assert chunk in ok["description"] and chunk in spec["components"]["schemas"]
        assert "429" in spec["paths"][path]["post"]["responses"]


def test_real_client_bodies_validate_and_refused_ones_do_not(spec: dict[str, Any]) -> None:
    completion = body_schema(spec, "/v1/completions")
    chat = body_schema(spec, "/v1/chat/completions")
    jsonschema.validate(
        {"model": "m", "prompt": "Hi", "max_tokens": 8, "temperature": 0.5, "stop": ["\n"]},
        completion,
    )
    jsonschema.validate({"prompt": [[1, 2, 3], [4]], "stream": True, "seed": 3}, completion)
    jsonschema.validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        },
        chat,
    )
    for bad in ({"prompt": "Hi", "max_tokens": "eight"}, {"prompt": "Hi", "stream": "yes"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, completion)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"model": "m"}, chat)  # messages is required


def test_operational_routes_are_documented_without_duplicate_ids(spec: dict[str, Any]) -> None:
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    assert set(spec["paths"]["/health"]["get"]["responses"]) == {"200", "503"}
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "get" in spec["paths"]["/v1/models"]
