"""Hostile input against a live server: every case gets a 4xx with an OpenAI error body (where
HTTP allows one), the server never answers 5xx, never crashes, and serves normally afterwards."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.reliability.metrics import wait_idle
from tests.server import RemoteServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    live = RemoteServer(["--max-model-len", "256"], log_path=log)
    yield live
    assert live.stop() == 0, live.log_tail()
    assert "Traceback" not in log.read_text(errors="replace")


def post(server: RemoteServer, path: str = "/v1/completions", **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=120, **kwargs)


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    error = dict(response.json()["error"])
    assert error["code"] == status and error["message"] and error["type"]
    return error


def deep(depth: int) -> str:
    return '{"prompt": "x", "max_tokens": 1, "extra": ' + "[" * depth + "]" * depth + "}"


JSON = {"content-type": "application/json"}

CASES: list[tuple[str, str, bytes | str | dict[str, Any]]] = [
    ("nested 10,000 deep", "/v1/completions", deep(10_000)),
    ("nested 100 deep", "/v1/completions", deep(100)),
    ("huge n", "/v1/completions", {"prompt": "x", "n": 10**9}),
    ("huge max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": 10**12}),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -1}),
    ("huge logprobs", "/v1/completions", {"prompt": "x", "logprobs": 10**6}),
    ("huge top_logprobs", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 10**6,
    }),
    ("5 MB prompt", "/v1/completions", {"prompt": "word " * 1_000_000, "max_tokens": 1}),
    ("invalid UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe\xfa", "max_tokens": 1}'),
    ("lone surrogate", "/v1/completions", '{"prompt": "\\ud800 x", "max_tokens": 1}'),
    ("not JSON", "/v1/completions", b"prompt=x"),
    ("JSON array body", "/v1/completions", b"[1, 2, 3]"),
    ("empty body", "/v1/completions", b""),
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "many"}),
    ("wrong prompt type", "/v1/completions", {"prompt": {"text": "x"}}),
    ("NaN temperature", "/v1/completions", b'{"prompt": "x", "temperature": NaN}'),
    ("infinite top_p", "/v1/completions", b'{"prompt": "x", "top_p": 1e400}'),
    ("token id out of vocabulary", "/v1/completions", {"prompt": [10**12], "max_tokens": 1}),
    ("too many stop strings", "/v1/completions", {"prompt": "x", "stop": ["a"] * 10_000}),
    ("huge seed", "/v1/completions", {"prompt": "x", "seed": 2**70}),
    ("empty messages", "/v1/chat/completions", {"messages": []}),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}),
    ("request chat template", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 7 * 7 }}",
    }),
    ("bad response_format", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"},
    }),
    ("bad JSON schema", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                            "schema": {"type": "no-such-type"}}},
    }),
    ("refused field", "/v1/completions", {"prompt": "x", "early_stopping": True}),
    ("huge detokenize", "/detokenize", {"tokens": [1] * 2_000_000}),
    ("negative token to detokenize", "/detokenize", {"tokens": [-5]}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "path", "body"), CASES, ids=[case[0] for case in CASES])
def test_hostile_body_gets_a_400(
    server: RemoteServer, name: str, path: str, body: bytes | str | dict[str, Any]
) -> None:
    if isinstance(body, dict):
        response = post(server, path, json=body)
    else:
        content = body.encode() if isinstance(body, str) else body
        response = post(server, path, content=content, headers=JSON)
    # 413 only for bodies over the edge limit, which none of these is.
    assert_openai_error(response, 400)


def test_oversized_headers_and_body_get_431_and_413(server: RemoteServer) -> None:
    assert_openai_error(post(server, json={"prompt": "x"}, headers={"x-big": "y" * 65_536}), 431)
    many = {f"x-h{i}": "1" for i in range(200)}
    assert_openai_error(post(server, json={"prompt": "x"}, headers=many), 431)
    assert_openai_error(post(server, content=b" " * (33 * 1024 * 1024), headers=JSON), 413)


def raw_exchange(server: RemoteServer, payload: bytes, wait: float = 5.0) -> bytes:
    """Send bytes on a fresh connection and read what comes back within `wait` seconds (or
    until the server closes); then hang up."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        sock.sendall(payload)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def test_lying_content_length_never_gets_a_server_error(server: RemoteServer) -> None:
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    # Longer than the body: the server waits for the rest until the client hangs up (its
    # read ends with a disconnect, which must not be logged as an error); no answer meanwhile.
    longer = raw_exchange(server, head + b"Content-Length: 1000\r\n\r\n" + body, wait=2.0)
    assert longer == b"", longer[:200]
    # Shorter than the body: the truncated JSON is a 400, the rest is not a valid request.
    shorter = raw_exchange(server, head + b"Content-Length: 5\r\n\r\n" + body)
    assert shorter.startswith(b"HTTP/1.1 400"), shorter[:200]
    assert b"HTTP/1.1 5" not in shorter
    # Not a number.
    bogus = raw_exchange(server, head + b"Content-Length: lots\r\n\r\n" + body)
    assert bogus.startswith(b"HTTP/1.1 400"), bogus[:200]


def test_the_server_still_serves_after_the_hostile_input(server: RemoteServer) -> None:
    response = post(server, json={"prompt": "The capital of France is", "max_tokens": 4})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert wait_idle(server.url) == (0, 0, 0)


def test_a_large_header_arriving_in_pieces_still_gets_the_431(server: RemoteServer) -> None:
    # h11 buffers an incomplete request head up to a limit (16 KiB by default) and answers a bare
    # 400 beyond it; the server raises that limit so EdgeLimits' 431 (with its body) answers.
    import time

    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Padding: " + b"p" * 65536 + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        for start in range(0, len(head), 4096):
            sock.sendall(head[start : start + 4096])
            time.sleep(0.005)
        sock.sendall(body)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < 64:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 431"), received[:200]
