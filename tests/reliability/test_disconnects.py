"""Streams whose clients hang up mid-stream, among many that do not: every other stream
completes, the engine ends idle with every KV block returned, and a second round of the same
load does not grow the server's memory.

Knobs (the target run: 1000 requests at concurrency 256): `PAGODA_DISCONNECT_REQUESTS`
(default 96 per round), `PAGODA_DISCONNECT_CONCURRENCY` (default 32)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.metrics import wait_idle
from tests.server import RemoteServer

pytestmark = pytest.mark.slow

MAX_TOKENS = 16


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants (the engine-core process), from /proc."""
    total = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(
                int(line.split()[1]) * 1024
                for line in status.splitlines()
                if line.startswith("VmRSS")
            )
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
        todo.extend(int(child) for child in children)
    return total


async def one_stream(
    client: httpx.AsyncClient, index: int, hang_up: bool, gate: asyncio.Semaphore
) -> str:
    """'done' for a stream that ended with [DONE] after its finish_reason, 'hung up' for one
    this client closed after two events."""
    body = {
        "prompt": f"Story {index}: once upon a time",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    async with gate, client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        events = 0
        finish = None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                assert finish == "length", f"stream {index} ended without finishing"
                return "done"
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            finish = chunk["choices"][0]["finish_reason"] or finish
            events += 1
            if hang_up and events == 2:
                return "hung up"  # leaving the block closes the connection mid-stream
    raise AssertionError(f"stream {index} was cut without [DONE]")


async def one_round(url: str, requests: int, concurrency: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        results = await asyncio.gather(
            *(one_stream(client, i, rng.random() < 0.1, gate) for i in range(requests))
        )
    return {kind: results.count(kind) for kind in ("done", "hung up")}


def test_disconnecting_clients_leak_nothing_and_others_complete(tmp_path: Path) -> None:
    requests = int(os.environ.get("PAGODA_DISCONNECT_REQUESTS", "96"))
    concurrency = int(os.environ.get("PAGODA_DISCONNECT_CONCURRENCY", "32"))
    server = RemoteServer(
        ["--max-model-len", "256", "--max-num-seqs", str(min(concurrency, 256))],
        log_path=tmp_path / "server.log",
    )
    try:
        figures = []
        for round_index in range(2):
            start = time.monotonic()
            counts = asyncio.run(one_round(server.url, requests, concurrency, seed=round_index))
            seconds = time.monotonic() - start
            assert counts["done"] + counts["hung up"] == requests
            assert counts["hung up"] > 0 and counts["done"] > 0
            assert wait_idle(server.url) == (0, 0, 0)
            rss = tree_rss_bytes(server.process.pid)
            figures.append((counts, round(seconds, 1), rss // 2**20))
        print(f"rounds (counts, seconds, RSS MiB): {figures}")
        # The second round reuses what the first allocated: allow noise, not a leak.
        first_rss, second_rss = figures[0][2], figures[1][2]
        assert second_rss <= first_rss * 1.05 + 16, figures
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0, server.log_tail()
