"""uvicorn's access log on a live server: a line per request by default, none with
`--disable-uvicorn-access-log` (vLLM's flag), errors and start-up lines either way."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.server import RemoteServer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("disabled", [False, True])
def test_access_log_lines_follow_the_flag(tmp_path: Path, disabled: bool) -> None:
    log = tmp_path / "server.log"
    args = ["--max-model-len", "256"] + (["--disable-uvicorn-access-log"] if disabled else [])
    server = RemoteServer(args, log_path=log)
    try:
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200
    finally:
        assert server.stop() == 0, server.log_tail()
    text = log.read_text(errors="replace")
    assert "Uvicorn running on" in text or "Application startup complete" in text, text[-2000:]
    assert ('"GET /v1/models HTTP/1.1" 200' in text) is not disabled, text[-2000:]
