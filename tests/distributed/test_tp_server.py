"""`pagoda serve -tp 2` and `-pp 2` (two ranks, gloo on 127.0.0.1) driven by the official openai
client: the same greedy text as one rank, streaming, concurrent requests, abort on disconnect; a killed
worker makes /health 503, requests a 500 with an OpenAI error body, and the server exit 1 within
a bounded time; SIGTERM leaves no process behind."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.reliability.test_sigterm import alive, descendants
from tests.server import RemoteServer
from tests.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.slow


def start(model: Path, tmp_path: Path, *extra: str) -> RemoteServer:
    return RemoteServer(
        [str(model), "--served-model-name", "tiny", "--max-model-len", "256", *extra],
        log_path=tmp_path / f"server{'-'.join(extra)}.log",
    )


def complete(client: openai.OpenAI, prompt: str) -> str:
    response = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    return response.choices[0].text


@pytest.mark.parametrize("split", [["-tp", "2"], ["-pp", "2"]], ids=["tp2", "pp2"])
def test_two_rank_server_serves_what_one_rank_serves(tmp_path: Path, split: list[str]) -> None:
    """Under -pp 2 the engine keeps a step per stage in flight: the concurrent requests share
    the two steps, and the aborted stream's step may still be in flight when it ends."""
    model = make_tiny_llama(tmp_path / "model")
    prompts = ["The quick brown fox", "Hello, world!", "Numbers: 0 1 2", "Once upon a time"]
    single = start(model, tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{single.url}/v1", api_key="x", max_retries=0)
        expected = [complete(client, p) for p in prompts]
    finally:
        assert single.stop() == 0
    server = start(model, tmp_path, *split)
    processes = descendants(server.process.pid)
    assert len(processes) >= 2  # the engine core and its worker
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda p: complete(client, p), prompts)) == expected
        stream = client.completions.create(
            model="tiny", prompt=prompts[0], max_tokens=12, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected[0]
        # A client that hangs up mid-stream: its request is aborted, the server stays healthy.
        body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            next(r.iter_lines())
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert complete(client, prompts[1]) == expected[1]
    finally:
        assert server.stop() == 0, server.log_tail()
    time.sleep(1)
    assert not [pid for pid in processes if alive(pid)], "processes left behind"


def test_a_killed_worker_fails_the_server_loudly(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "model")
    server = start(model, tmp_path, "-tp", "2")
    processes = descendants(server.process.pid)
    try:
        workers = [
            pid for pid in processes if "multiproc" in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        assert len(workers) == 1, processes
        import os

        os.kill(workers[0], signal.SIGKILL)
        response = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "tiny", "prompt": "Hello", "max_tokens": 8},
            timeout=60,
        )
        assert response.status_code == 500
        assert response.json()["error"]["code"] == 500
        code = server.process.wait(30)
        assert code == 1, server.log_tail()
        assert "tensor-parallel" in server.log_tail()
    finally:
        server.stop()
    time.sleep(1)
    assert not [pid for pid in processes if alive(pid)], "processes left behind"
