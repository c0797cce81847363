"""`pagoda serve` runs its engine core in a child process (PAGODA_ENABLE_MULTIPROCESSING, default
on): requests are served through it, its death is reported instead of hanging the server, and
stopping the server leaves no engine process behind. Real processes, real HTTP."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.server import RemoteServer
from tests.tiny_llama import make_tiny_llama


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().split(") ")[-1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _complete(server: RemoteServer) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny", "prompt": "Hello there", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return make_tiny_llama(tmp_path / "tiny")


def _serve(model_dir: Path, tmp_path: Path, multiprocessing: str) -> RemoteServer:
    return RemoteServer(
        [str(model_dir), "--served-model-name", "tiny", "--max-model-len", "128"],
        env={"PAGODA_ENABLE_MULTIPROCESSING": multiprocessing},
        log_path=tmp_path / "server.log",
    )


def test_engine_core_runs_in_a_child_and_stops_with_the_server(
    model_dir: Path, tmp_path: Path
) -> None:
    server = _serve(model_dir, tmp_path, "1")
    try:
        children = _children(server.process.pid)
        assert len(children) == 1, children
        response = _complete(server)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
    finally:
        status = server.stop()
    assert status == 0, server.log_tail()
    deadline = time.monotonic() + 10
    while _exists(children[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _exists(children[0]), "the engine core process outlived the server"


def test_same_tokens_with_and_without_the_engine_process(model_dir: Path, tmp_path: Path) -> None:
    texts = []
    for multiprocessing in ("1", "0"):
        server = _serve(model_dir, tmp_path, multiprocessing)
        try:
            assert len(_children(server.process.pid)) == (1 if multiprocessing == "1" else 0)
            response = _complete(server)
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
        finally:
            assert server.stop() == 0, server.log_tail()
    assert texts[0] == texts[1]


def test_dead_engine_process_fails_health_and_requests_and_the_server_exits_1(
    model_dir: Path, tmp_path: Path
) -> None:
    server = _serve(model_dir, tmp_path, "1")
    try:
        assert _complete(server).status_code == 200
        (child,) = _children(server.process.pid)
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health").status_code == 200:
            assert time.monotonic() < deadline, "/health still 200 after the engine died"
            time.sleep(0.1)
        assert httpx.get(f"{server.url}/health").status_code == 503
        response = _complete(server)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "InternalServerError"
        assert "engine core" in error["message"]
        # Then the server stops by itself, with status 1 (as vLLM does), for a restart.
        status = server.process.wait(30)
    finally:
        server.stop()
    assert status == 1, server.log_tail()
