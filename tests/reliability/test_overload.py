"""Admission control on a live server: beyond `--max-queued-requests` waiting requests, new ones
get a 429 at once with `Retry-After`, counted in /metrics; every admitted request completes."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.server import RemoteServer

pytestmark = pytest.mark.slow


async def burst(url: str, body: dict[str, Any], count: int) -> list[httpx.Response]:
    """`count` requests sent at once, on as many connections."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return list(
            await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(count)))
        )


def test_overload_is_refused_with_retry_after_and_admitted_requests_finish(tmp_path: Any) -> None:
    server = RemoteServer(
        ["--max-model-len", "256", "--max-num-seqs", "2", "--max-queued-requests", "1"],
        log_path=tmp_path / "server.log",
    )
    try:
        body = {"prompt": "Count to one hundred:", "max_tokens": 48, "ignore_eos": True}

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)

        responses = asyncio.run(burst(server.url, body, 30))
        refused = [r for r in responses if r.status_code == 429]
        admitted = [r for r in responses if r.status_code == 200]
        assert refused and admitted and len(refused) + len(admitted) == 30
        # The burst arrives in one go: 2 running + 1 queued, give or take one that finished
        # meanwhile. Requests admitted in the same event-loop turn count against each other.
        assert len(admitted) <= 4, len(admitted)
        for response in refused:
            assert int(response.headers["retry-after"]) >= 1
            error = response.json()["error"]
            assert error["code"] == 429 and "overloaded" in error["message"]
        for response in admitted:
            assert len(response.json()["choices"][0]["text"]) > 0
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        line = next(
            line
            for line in metrics.splitlines()
            if line.startswith("pagoda:requests_rejected_total{") and 'reason="overload"' in line
        )
        assert float(line.rsplit(" ", 1)[1]) == len(refused)
        # Once the queue drains, requests are admitted again.
        assert post(0).status_code == 200
    finally:
        assert server.stop() == 0, server.log_tail()


def test_prompt_token_bound_refuses_with_retry_after_and_admits_a_lone_long_prompt(
    tmp_path: Any,
) -> None:
    server = RemoteServer(
        ["--max-model-len", "512", "--max-num-seqs", "1", "--max-queued-prompt-tokens", "100"],
        log_path=tmp_path / "server.log",
    )
    try:
        # About 60 prompt tokens each: with one running and one pending, a third does not fit.
        prompt = "Name a colour of the rainbow, then a fruit of that colour. " * 5
        body = {"prompt": prompt, "max_tokens": 24, "ignore_eos": True}

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{server.url}/v1/completions", json=body, timeout=300)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
        refused = [r for r in responses if r.status_code == 429]
        admitted = [r for r in responses if r.status_code == 200]
        assert refused and admitted and len(refused) + len(admitted) == 8
        for response in refused:
            assert int(response.headers["retry-after"]) >= 1
            assert "prompt tokens" in response.json()["error"]["message"]
        # Nothing pending: a prompt longer than the bound is still admitted.
        long_body = {"prompt": prompt * 3, "max_tokens": 4}
        response = httpx.post(f"{server.url}/v1/completions", json=long_body, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] > 100
    finally:
        assert server.stop() == 0, server.log_tail()
