"""The HTTP edge's hard limits (header size and count: 431; body size: 413), on a small ASGI app
and on a live `pagoda serve`."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from pagoda.entrypoints.openai.edge_limits import EdgeLimits


async def echo(scope: Any, receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def request(app: Any, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/completions", **kwargs)

    return asyncio.run(go())


def test_header_and_body_limits() -> None:
    app = EdgeLimits(echo, max_header_bytes=1000, max_headers=10, max_body_bytes=100)
    assert request(app, content=b"x" * 100).text == "100"
    big_header = request(app, headers={"x-big": "y" * 2000}, content=b"{}")
    assert big_header.status_code == 431
    assert big_header.json()["error"]["code"] == 431
    many = request(app, headers={f"x-{i}": "1" for i in range(20)}, content=b"{}")
    assert many.status_code == 431
    too_long = request(app, content=b"x" * 101)
    assert too_long.status_code == 413
    assert "at most 100" in too_long.json()["error"]["message"]

    async def chunks() -> Any:  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b"x" * 30

    streamed = request(app, content=chunks())
    assert streamed.status_code == 413


@pytest.mark.slow
def test_a_live_server_refuses_a_64_kb_header(tmp_path: Any) -> None:
    from tests.server import RemoteServer

    server = RemoteServer(["--max-model-len", "256"], log_path=tmp_path / "server.log")
    try:
        response = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "hi", "max_tokens": 1},
            headers={"x-padding": "p" * 65536},
            timeout=30,
        )
        assert response.status_code == 431, response.text
        assert response.json()["error"]["type"] == "RequestHeaderFieldsTooLarge"
        ok = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30
        )
        assert ok.status_code == 200
    finally:
        assert server.stop() == 0, server.log_tail()


@pytest.mark.parametrize("disabled", [False, True])
def test_disable_fastapi_docs_removes_the_api_documentation(disabled: bool) -> None:
    import argparse

    from pagoda.entrypoints.openai.api_server import build_app

    app = build_app(argparse.Namespace(disable_fastapi_docs=disabled))

    async def get(path: str) -> int:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get(path)).status_code

    for path in ("/docs", "/openapi.json"):
        assert asyncio.run(get(path)) == (404 if disabled else 200)
