"""SIGTERM under load: requests in flight finish within the grace period; past it each stream
ends with a final error event and [DONE] (never a torn body); new requests are not served;
the server exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from tests.server import RemoteServer

pytestmark = pytest.mark.slow


def _stream(url: str, max_tokens: int, started: threading.Event, events: list[Any]) -> None:
    body = {"prompt": "Count:", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
            started.set()


def _run(tmp_path: Any, grace: str, max_tokens: int) -> tuple[list[list[Any]], int]:
    server = RemoteServer(
        ["--max-model-len", "1024", "--graceful-shutdown-timeout", grace],
        log_path=tmp_path / "server.log",
    )
    streams: list[list[Any]] = [[] for _ in range(3)]
    starts = [threading.Event() for _ in streams]
    threads = [
        threading.Thread(target=_stream, args=(server.url, max_tokens, start, events))
        for start, events in zip(starts, streams)
    ]
    for thread in threads:
        thread.start()
    for start in starts:
        assert start.wait(120)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    try:  # a request after the signal is not served (refused, or a 503)
        late = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10
        )
        assert late.status_code == 503
    except httpx.TransportError:
        pass
    for thread in threads:
        thread.join(120)
    code = server.process.wait(60)
    server.stop()
    return streams, code


def test_streams_in_flight_finish_within_the_grace_period(tmp_path: Any) -> None:
    streams, code = _run(tmp_path, "60", 24)
    assert code == 0
    for events in streams:
        assert events[-1] == "[DONE]"
        finishes = [c["finish_reason"] for e in events[:-1] for c in e.get("choices", [])]
        assert finishes[-1] == "length"


def test_past_the_grace_period_each_stream_ends_with_an_error_and_done(tmp_path: Any) -> None:
    streams, code = _run(tmp_path, "1", 900)
    assert code == 0
    for events in streams:
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == 503
        assert "shutting down" in events[-2]["error"]["message"]
