"""SIGTERM under load: requests in flight finish within the grace period; past it each stream
ends with a final error event and [DONE] and each non-streaming request with a 503 body (never a
torn body); requests after the signal are not served; the server exits 0 and leaves no process
behind. A second signal exits at once.

`PAGODA_DRAIN_STREAMS` sets the number of streams (default 16, of 128 tokens each)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server import RemoteServer

pytestmark = pytest.mark.slow

STREAMS = int(os.environ.get("PAGODA_DRAIN_STREAMS", "16"))


def _stream(url: str, max_tokens: int, started: threading.Event, events: list[Any]) -> None:
    body = {"prompt": "Count:", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=180) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
            started.set()


def _post(url: str, max_tokens: int, responses: list[httpx.Response]) -> None:
    body = {"prompt": "Count:", "max_tokens": max_tokens, "ignore_eos": True}
    responses.append(httpx.post(f"{url}/v1/completions", json=body, timeout=180))


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except FileNotFoundError:
            continue
        found += [int(child) for child in children]
        todo += [int(child) for child in children]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _run(
    tmp_path: Path, grace: str, max_tokens: int, signals: int = 1
) -> tuple[list[list[Any]], list[httpx.Response], int, float]:
    server = RemoteServer(
        ["--max-model-len", "1024", "--max-num-seqs", "32", "--graceful-shutdown-timeout", grace],
        log_path=tmp_path / "server.log",
    )
    children = descendants(server.process.pid)
    streams: list[list[Any]] = [[] for _ in range(STREAMS)]
    starts = [threading.Event() for _ in streams]
    threads = [
        threading.Thread(target=_stream, args=(server.url, max_tokens, start, events))
        for start, events in zip(starts, streams)
    ]
    posts: list[httpx.Response] = []
    threads.append(threading.Thread(target=_post, args=(server.url, max_tokens, posts)))
    for thread in threads:
        thread.start()
    for start in starts:
        assert start.wait(180)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    if signals > 1:
        time.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
    else:
        time.sleep(0.5)
        try:  # a request after the signal is not served (refused, or a 503)
            late = httpx.post(
                f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10
            )
            assert late.status_code == 503
            assert late.headers["connection"] == "close" and "retry-after" in late.headers
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        except httpx.TransportError:
            pass
    code = server.process.wait(120)
    exited_after = time.monotonic() - signalled
    for thread in threads:
        thread.join(60)
    server.stop()
    assert children and not [pid for pid in children if alive(pid)], "processes left behind"
    return streams, posts, code, exited_after


def test_streams_in_flight_finish_within_the_grace_period(tmp_path: Path) -> None:
    streams, posts, code, _ = _run(tmp_path, "60", 128)
    assert code == 0
    for events in streams:
        assert events[-1] == "[DONE]"
        finishes = [c["finish_reason"] for e in events[:-1] for c in e.get("choices", [])]
        assert finishes[-1] == "length"
        assert sum(len(c["text"]) > 0 for e in events[:-1] for c in e["choices"]) > 0
    assert posts[0].status_code == 200
    assert posts[0].json()["usage"]["completion_tokens"] == 128


def test_past_the_grace_period_each_request_ends_with_an_error(tmp_path: Path) -> None:
    streams, posts, code, _ = _run(tmp_path, "1", 900)
    assert code == 0
    for events in streams:
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == 503
        assert "shutting down" in events[-2]["error"]["message"]
    assert posts[0].status_code == 503
    assert "shutting down" in posts[0].json()["error"]["message"]


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    _, _, _, exited_after = _run(tmp_path, "60", 900, signals=2)
    # Well before the 60 s grace (the streams had hundreds of tokens to go).
    assert exited_after < 30
