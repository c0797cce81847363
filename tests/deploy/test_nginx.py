"""`deploy/compose/nginx.conf` in a real nginx, in front of a live `pagoda serve` started by the
entrypoint: the config passes `nginx -t`, a streamed chat completion arrives token by token
through the proxy, and nginx reuses its HTTP/1.1 connections to Pagoda.

The file is the template the official nginx image renders with envsubst; here the same two
placeholders are filled in with loopback ports, and a minimal main config (pid, logs and temp
paths inside a temp dir, no daemon) includes it, as the image's own nginx.conf does.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import (
    DEPLOY_DIR,
    ENTRYPOINT,
    log_tail,
    server_env,
    start_logged,
    stop,
    wait_healthy,
)
from tests.server import free_port

NGINX_TEMPLATE = DEPLOY_DIR / "compose" / "nginx.conf"
NGINX = shutil.which("nginx") or next(
    (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(path).exists()), None
)
pytestmark = pytest.mark.skipif(
    NGINX is None,
    reason="nginx is not installed (.ci/run installs Debian's nginx package when run as root)",
)

MODEL = "tiny"
MAIN_CONF = """daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {site};
}}
"""


def render_template(text: str, variables: dict[str, str]) -> str:
    """What the nginx image's envsubst step does: replace ${NAME} for the variables given only."""
    for name, value in variables.items():
        assert f"${{{name}}}" in text, f"{NGINX_TEMPLATE} has no ${{{name}}}"
        text = text.replace(f"${{{name}}}", value)
    leftover = re.findall(r"\$\{\w+\}", text)
    assert not leftover, f"placeholders that compose does not set: {leftover}"
    return text


@dataclass(slots=True)
class Nginx:
    process: subprocess.Popen[bytes]
    url: str


def write_config(tmp: Path, upstream_port: int, listen_port: int, template: str) -> Path:
    site = tmp / "pagoda.conf"
    site.write_text(
        render_template(
            template,
            {
                "PAGODA_UPSTREAM": f"127.0.0.1:{upstream_port}",
                "NGINX_PORT": f"127.0.0.1:{listen_port}",
            },
        )
    )
    main = tmp / "nginx.conf"
    main.write_text(MAIN_CONF.format(tmp=tmp, site=site))
    return main


def nginx_command(tmp: Path, main: Path, *extra: str) -> list[str]:
    assert NGINX is not None
    return [NGINX, "-p", str(tmp), "-c", str(main), "-e", str(tmp / "error.log"), *extra]


def start_nginx(tmp: Path, upstream_port: int, template: str) -> Nginx:
    port = free_port()
    main = write_config(tmp, upstream_port, port, template)
    process = subprocess.Popen(
        nginx_command(tmp, main), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log_tail(tmp / "error.log")
        try:
            httpx.get(f"{url}/health", timeout=2)
            return Nginx(process, url)
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise TimeoutError(f"nginx did not listen: {log_tail(tmp / 'error.log')}")


@dataclass(slots=True)
class Upstream:
    url: str
    port: int
    log_path: Path


@pytest.fixture(scope="module")
def pagoda(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("nginx-upstream") / "server.log"
    env = server_env(
        {
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "MODEL_NAME": str(tiny_model),
            "EXTRA_ARGS": f"--served-model-name {MODEL}",
            # uvicorn trusts X-Forwarded-For from loopback and then logs the forwarded client
            # with port 0; trusting no proxy keeps nginx's real source port in the access log.
            "FORWARDED_ALLOW_IPS": "",
        }
    )
    process = start_logged([str(ENTRYPOINT)], env, log_path)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log_path)
        yield Upstream(f"http://127.0.0.1:{port}", port, log_path)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def proxy(pagoda: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    nginx = start_nginx(tmp_path_factory.mktemp("nginx"), pagoda.port, NGINX_TEMPLATE.read_text())
    yield nginx
    nginx.process.terminate()
    nginx.process.wait(timeout=30)


CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
    "max_tokens": 200,
    "temperature": 0,
    "ignore_eos": True,
}


@dataclass(slots=True)
class Arrival:
    seconds: float  # since the request was sent
    data: bytes


def stream_chat(url: str) -> tuple[httpx.Response, list[Arrival], float]:
    """POST a streamed chat; the reads as they arrive, and when the response ended."""
    arrivals: list[Arrival] = []
    with httpx.Client(timeout=60) as client:
        start = time.monotonic()
        with client.stream(
            "POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True}
        ) as response:
            for data in response.iter_raw():
                arrivals.append(Arrival(time.monotonic() - start, data))
        return response, arrivals, time.monotonic() - start


def sse_text(body: bytes) -> str:
    events = [
        line[len("data: ") :] for line in body.decode().split("\n\n") if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    return "".join(
        choice["delta"].get("content") or ""
        for event in events[:-1]
        for choice in json.loads(event)["choices"]
    )


def test_nginx_t_accepts_the_rendered_config(tmp_path: Path) -> None:
    main = write_config(tmp_path, free_port(), free_port(), NGINX_TEMPLATE.read_text())
    result = subprocess.run(nginx_command(tmp_path, main, "-t"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr


def test_streamed_chat_arrives_through_nginx_token_by_token(proxy: Nginx, pagoda: Upstream) -> None:
    response, arrivals, total = stream_chat(proxy.url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    # 200 tokens take the tiny model a second or two: unbuffered, they arrive as many reads
    # spread over that time, the first long before the end; a buffered proxy sends one burst.
    assert len(arrivals) >= 10, [a.seconds for a in arrivals]
    assert arrivals[0].seconds < 0.5 * total, ([a.seconds for a in arrivals], total)
    assert sum(a.seconds < 0.5 * total for a in arrivals) >= 3, (
        [a.seconds for a in arrivals],
        total,
    )
    # And nothing was lost or reordered on the way: the text is the greedy direct answer.
    direct = httpx.post(f"{pagoda.url}/v1/chat/completions", json=CHAT, timeout=60)
    assert direct.status_code == 200
    assert (
        sse_text(b"".join(a.data for a in arrivals))
        == (direct.json()["choices"][0]["message"]["content"])
    )


def upstream_client_ports(log_path: Path, marker: str) -> list[tuple[int, str]]:
    """(client port, HTTP version) of each request for `marker` in uvicorn's access log."""
    pattern = re.compile(rf'127\.0\.0\.1:(\d+) - "GET {re.escape(marker)} (HTTP/[\d.]+)"')
    text = log_path.read_text(errors="replace")
    return [(int(port), version) for port, version in pattern.findall(text)]


def fetch_through(url: str, marker: str, count: int) -> None:
    for _ in range(count):
        # A new client connection each time: only nginx's upstream side can reuse one.
        assert httpx.get(f"{url}{marker}", timeout=10).status_code == 200


def test_nginx_reuses_http11_connections_to_pagoda(proxy: Nginx, pagoda: Upstream) -> None:
    marker = "/health?keepalive-check"
    fetch_through(proxy.url, marker, 3)
    seen = upstream_client_ports(pagoda.log_path, marker)
    assert len(seen) == 3, log_tail(pagoda.log_path)
    assert {version for _, version in seen} == {"HTTP/1.1"}
    # One upstream connection (one source port, a real one) carried all three requests.
    assert len({port for port, _ in seen}) == 1 and seen[0][0] > 0, seen


def test_control_without_upstream_keepalive_connections_are_not_reused(
    pagoda: Upstream, tmp_path: Path
) -> None:
    # The check above can fail: with the keepalive lines gone, every request opens a connection.
    template = NGINX_TEMPLATE.read_text()
    for line in ("keepalive 32;", 'proxy_set_header Connection "";'):
        assert line in template
        template = template.replace(line, "")
    nginx = start_nginx(tmp_path, pagoda.port, template)
    try:
        marker = "/health?no-keepalive-check"
        fetch_through(nginx.url, marker, 3)
        seen = upstream_client_ports(pagoda.log_path, marker)
        assert len(seen) == 3 and len({port for port, _ in seen}) == 3, seen
    finally:
        nginx.process.terminate()
        nginx.process.wait(timeout=30)


def test_metrics_are_not_exposed_through_nginx(proxy: Nginx, pagoda: Upstream) -> None:
    assert httpx.get(f"{pagoda.url}/metrics", timeout=10).status_code == 200
    for path in ("/metrics", "/metrics/", "/metrics?x=1"):
        assert httpx.get(f"{proxy.url}{path}", timeout=10).status_code == 404
    assert httpx.get(f"{proxy.url}/health", timeout=10).status_code == 200
