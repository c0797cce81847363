"""The shipped monitoring: a real Prometheus (Debian's package; .ci/run installs it) scrapes a
live `pagoda serve` with `deploy/prometheus/prometheus.yml` (its target pointed at the test
server), and every query of `deploy/grafana/pagoda-dashboard.json`, and the queries of vLLM's own
dashboards on the metric names they use, returns data after some traffic. A dashboard that names
a metric or label Pagoda does not expose fails here, not in front of an operator."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.conftest import DEPLOY_DIR, log_tail
from tests.server import RemoteServer, free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus is not installed (.ci/run installs Debian's package when run as root)",
    ),
]
DASHBOARD = DEPLOY_DIR / "grafana" / "pagoda-dashboard.json"
SCRAPE_CONFIG = DEPLOY_DIR / "prometheus" / "prometheus.yml"
MODEL = "smol"

# What vLLM's Grafana dashboards (examples/online_serving/prometheus_grafana/grafana.json and
# examples/observability/dashboards/grafana/vllm_overview.json) query, by metric name and shape,
# with their variables filled in as below: each must return data from Pagoda's vllm: names.
VLLM_DASHBOARD_QUERIES = [
    'histogram_quantile(0.99, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',
    'rate(vllm:e2e_request_latency_seconds_sum{model_name="$model_name"}[$__rate_interval]) / rate(vllm:e2e_request_latency_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'histogram_quantile(0.5, sum by(le) (rate(vllm:time_per_output_token_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',
    'vllm:num_requests_running{model_name="$model_name"}',
    'vllm:num_requests_waiting{model_name="$model_name"}',
    'histogram_quantile(0.95, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',
    'vllm:gpu_cache_usage_perc{model_name="$model_name"}',
    'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}[$__rate_interval]))',
    'rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_max_num_generation_tokens_sum{model_name="$model_name"}[$__rate_interval])',
    # vllm_overview.json
    'histogram_quantile(0.95, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket{job=~"$job", model_name=~"$model_name", instance=~"$instance"}[$__rate_interval])))',
    'max(vllm:kv_cache_usage_perc{job=~"$job", model_name=~"$model_name", instance=~"$instance"})',
    'sum(rate(vllm:num_preemptions_total{job=~"$job", model_name=~"$model_name", instance=~"$instance"}[$__rate_interval]))',
    'sum(rate(vllm:prefix_cache_hits_total{job=~"$job", model_name=~"$model_name", instance=~"$instance"}[$__rate_interval])) / (sum(rate(vllm:prefix_cache_queries_total{job=~"$job", model_name=~"$model_name", instance=~"$instance"}[$__rate_interval])) > 0)',
    'sum(rate(vllm:request_time_per_output_token_seconds_bucket{job=~"$job", model_name=~"$model_name", instance=~"$instance", le="0.1"}[$__rate_interval])) / (sum(rate(vllm:request_time_per_output_token_seconds_count{job=~"$job", model_name=~"$model_name", instance=~"$instance"}[$__rate_interval])) > 0)',
    'sum(vllm:num_requests_waiting_by_reason{job=~"$job", model_name=~"$model_name", instance=~"$instance", reason="capacity"})',
    'histogram_quantile(0.5, sum by (le) (rate(vllm:iteration_tokens_total_bucket{job=~"$job", model_name=~"$model_name", instance=~"$instance"}[$__rate_interval])))',
    'sum(rate(vllm:prompt_tokens_by_source_total{job=~"$job", model_name=~"$model_name", instance=~"$instance", source="local_compute"}[$__rate_interval]))',
    '(sum(rate(http_requests_total{job=~"$job", instance=~"$instance", status="5xx"}[$__rate_interval])) or vector(0)) / (sum(rate(http_requests_total{job=~"$job", instance=~"$instance"}[$__rate_interval])) > 0)',
    'sum by (handler) (rate(http_request_duration_seconds_sum{job=~"$job", instance=~"$instance"}[$__rate_interval])) / (sum by (handler) (rate(http_request_duration_seconds_count{job=~"$job", instance=~"$instance"}[$__rate_interval])) > 0)',
]  # fmt: skip


def fill(expr: str) -> str:
    """Grafana's variable substitution, for one server scraped as job "pagoda"."""
    for name, value in (
        ("$__rate_interval", "1m"),
        ("$__range", "5m"),
        ("$model_name", MODEL),
        ("$instance", ".*"),
        ("$job", "pagoda"),
    ):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_the_dashboard_is_grafana_json_with_variables_and_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = [variable["name"] for variable in dashboard["templating"]["list"]]
    assert names == ["datasource", "job", "model_name", "instance"]
    queries = dashboard_queries()
    assert len(queries) >= 30
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
    for _, expr in queries:
        # Only variables the dashboard defines, or Grafana's own.
        for variable in re.findall(r"\$(\w+)", expr):
            assert variable in names or variable.startswith("__"), (variable, expr)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus URL that has scraped a Pagoda server after traffic of every kind."""
    tmp = tmp_path_factory.mktemp("monitoring")
    server = RemoteServer(
        ["--served-model-name", MODEL, "--max-model-len", "256", "--max-num-seqs", "2",
         "--max-queued-requests", "1"],
        log_path=tmp / "server.log",
    )  # fmt: skip
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    job = config["scrape_configs"][0]
    assert job["job_name"] == "pagoda" and job["metrics_path"] == "/metrics"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    config["global"]["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    assert PROMETHEUS is not None
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        # Scraped before and after the traffic, so every counter visibly rises in the windows.
        wait_for_scrapes(url, tmp / "prometheus.log", 1)
        traffic(server.url)
        wait_for_scrapes(url, tmp / "prometheus.log", 4)
        yield url
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        log.close()
        assert server.stop() == 0, server.log_tail()


def traffic(url: str) -> None:
    """Requests of every kind: plain, streamed, chat, a shared prefix, a 4xx, and a 429."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"prompt": "The same long prefix for the cache. " * 8 + "Go", "max_tokens": 16}
    for _ in range(3):
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=chat, timeout=120) as response:
        assert response.status_code == 200
        response.read()
    assert httpx.post(f"{url}/v1/completions", json={"prompt": 5}, timeout=30).status_code == 400
    long = {"prompt": "Count:", "max_tokens": 48, "ignore_eos": True}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda _: httpx.post(f"{url}/v1/completions", json=long, timeout=300).status_code,
                range(8),
            )
        )
    assert 429 in statuses and 200 in statuses


def query(prometheus: str, expr: str) -> list[Any]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def wait_for_scrapes(prometheus: str, log: Path, count: int) -> None:
    """Until Prometheus holds `count` more successful scrapes than now."""
    deadline = time.monotonic() + 60
    start: float | None = None
    while time.monotonic() < deadline:
        try:
            result = query(prometheus, 'sum_over_time(up{job="pagoda"}[5m])')
            done = float(result[0]["value"][1]) if result else 0.0
            start = done if start is None else start
            if done >= start + count:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus did not scrape Pagoda: {log_tail(log)}")


@pytest.mark.parametrize(("title", "expr"), dashboard_queries())
def test_every_dashboard_query_returns_data(scraped: str, title: str, expr: str) -> None:
    assert query(scraped, fill(expr)), f"{title}: no data for {fill(expr)}"


@pytest.mark.parametrize("expr", VLLM_DASHBOARD_QUERIES)
def test_vllm_dashboard_queries_return_data(scraped: str, expr: str) -> None:
    assert query(scraped, fill(expr)), f"no data for {fill(expr)}"


def test_without_vllm_names_only_pagoda_names_are_exposed(tmp_path: Path) -> None:
    server = RemoteServer(
        ["--no-vllm-metric-names", "--max-model-len", "256"], log_path=tmp_path / "server.log"
    )
    try:
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert "pagoda:num_requests_running" in text and "vllm:" not in text
    finally:
        assert server.stop() == 0
