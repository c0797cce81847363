"""Reading a live server's /metrics: the engine's gauges, to check that nothing leaked."""

from __future__ import annotations

import time

import httpx


def gauge(url: str, name: str) -> float:
    """The value of `name` (one series, the model's) on the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not on /metrics")


def wait_idle(url: str, timeout: float = 60.0) -> tuple[float, float, float]:
    """Wait until no request runs or waits and no KV block is held; returns the last
    (running, waiting, KV usage) seen, so a caller can assert on them."""
    deadline = time.monotonic() + timeout
    while True:
        running = gauge(url, "pagoda:num_requests_running")
        waiting = gauge(url, "pagoda:num_requests_waiting")
        usage = gauge(url, "pagoda:kv_cache_usage_perc")
        if (running, waiting, usage) == (0, 0, 0) or time.monotonic() > deadline:
            return running, waiting, usage
        time.sleep(0.25)
