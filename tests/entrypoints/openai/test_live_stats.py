"""`/stats`, `/stats/stream`, per-response timing and cached-token usage, against a live server.

The default model serves a known load (four 160-token completions at once); the stats must show
it while it runs (running requests, blocks in use, generation throughput, each request's
progress) and return to their idle values after (nothing running, no block in use, the prompts'
blocks cached and free, throughput back to zero once its window has passed).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from pagoda.metrics.live import RATE_WINDOW_S
from tests.server import RemoteServer

API_KEY = "sk-live-stats"
LONG_PROMPT = "Paged attention keeps keys and values in fixed size blocks. " * 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    log = tmp_path_factory.mktemp("live-stats") / "server.log"
    remote = RemoteServer(["--max-model-len", "1024"], log_path=log)
    yield remote
    assert remote.stop() == 0, remote.log_tail()


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _stats(server: RemoteServer) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/stats", timeout=10)
    assert response.status_code == 200
    return dict(response.json())


def _wait_for(server: RemoteServer, condition: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = _stats(server)
        if condition(stats):
            return stats
        time.sleep(0.05)
    raise AssertionError(f"stats never met the condition; last: {stats}")


def _idle(stats: dict[str, Any]) -> bool:
    return stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_cache"]["used_blocks"] == 0


def test_an_idle_server_reports_every_block_and_nothing_running(server: RemoteServer) -> None:
    stats = _wait_for(server, _idle)
    kv = stats["kv_cache"]
    assert kv["num_blocks"] > 0 and kv["block_size"] == 16
    assert kv["free_blocks"] + kv["cached_free_blocks"] == kv["num_blocks"]
    (block_map,) = kv["maps"]
    assert len(block_map["block_map"]) == -(-kv["num_blocks"] // block_map["blocks_per_cell"])
    assert set(block_map["block_map"]) <= {".", "c"}
    assert stats["requests"] == [] and stats["last_step"]["decode_tokens"] == 0
    assert stats["memory"]["engine_rss_bytes"] > 100 << 20  # the model is in the engine's memory
    assert stats["memory"]["api_server_rss_bytes"] > 0


def test_a_known_load_moves_the_numbers_and_they_return_to_idle(
    server: RemoteServer, client: openai.OpenAI
) -> None:
    before = _wait_for(server, _idle)
    # Distinct from their first token: no prefix shared between them.
    prompts = [f"Story number {i}: {LONG_PROMPT}" for i in range(4)]
    threads = [
        threading.Thread(
            target=client.completions.create,
            kwargs={
                "model": client.models.list().data[0].id,
                "prompt": prompt,
                "max_tokens": 160,
                "extra_body": {"ignore_eos": True},
            },
        )
        for prompt in prompts
    ]
    for thread in threads:
        thread.start()
    busy = _wait_for(
        server,
        lambda s: (
            s["running"] == 4
            and s["throughput"]["generation_tokens_per_s"] > 0
            and all(r["output_tokens"] > 0 for r in s["requests"])
        ),
    )
    assert busy["kv_cache"]["used_blocks"] >= 4 * 4  # ~140 tokens each: at least 4 blocks
    assert "u" in busy["kv_cache"]["maps"][0]["block_map"]
    assert busy["last_step"]["decode_tokens"] + busy["last_step"]["prefill_tokens"] > 0
    requests = busy["requests"]
    assert len(requests) == 4 and {r["status"] for r in requests} == {"running"}
    for request in requests:
        assert request["computed_prompt_tokens"] == request["prompt_tokens"] > 100
        assert request["blocks"] >= 4 and request["ttft_s"] is not None
        assert request["elapsed_s"] >= request["ttft_s"] > 0
    later = _wait_for(
        server,
        lambda s: (
            sum(r["output_tokens"] for r in s["requests"])
            > sum(r["output_tokens"] for r in requests)
            or not s["requests"]
        ),
    )
    assert later["totals"]["generation_tokens"] > busy["totals"]["generation_tokens"]
    for thread in threads:
        thread.join()
    idle = _wait_for(server, _idle)
    assert idle["requests"] == []
    totals = idle["totals"]
    assert totals["finished_requests"] == before["totals"]["finished_requests"] + 4
    assert totals["generation_tokens"] == before["totals"]["generation_tokens"] + 4 * 160
    # The prompts' full blocks stay cached for a later request: free, but reusable.
    assert idle["kv_cache"]["cached_free_blocks"] > before["kv_cache"]["cached_free_blocks"]
    time.sleep(RATE_WINDOW_S + 0.2)
    quiet = _stats(server)
    assert quiet["throughput"]["generation_tokens_per_s"] == 0
    assert quiet["throughput"]["prompt_tokens_per_s"] == 0


def test_a_prefix_hit_while_its_owner_runs_shows_shared_blocks(
    server: RemoteServer, client: openai.OpenAI
) -> None:
    model = client.models.list().data[0].id
    prompt = "A shared beginning. " + LONG_PROMPT

    def complete() -> None:
        client.completions.create(
            model=model, prompt=prompt, max_tokens=120, extra_body={"ignore_eos": True}
        )

    _wait_for(server, _idle)
    owner = threading.Thread(target=complete)
    owner.start()
    _wait_for(server, lambda s: any(r["output_tokens"] > 0 for r in s["requests"]))
    sharer = threading.Thread(target=complete)
    sharer.start()
    both = _wait_for(server, lambda s: len(s["requests"]) == 2 and s["running"] == 2)
    assert "s" in both["kv_cache"]["maps"][0]["block_map"]
    assert max(r["cached_tokens"] for r in both["requests"]) >= 16
    owner.join()
    sharer.join()
    assert "s" not in _wait_for(server, _idle)["kv_cache"]["maps"][0]["block_map"]


def test_a_repeated_prompt_reports_its_cached_tokens_in_usage_and_stats(
    server: RemoteServer, client: openai.OpenAI
) -> None:
    model = client.models.list().data[0].id
    prompt = LONG_PROMPT + " A prefix that repeats."
    first = client.completions.create(model=model, prompt=prompt, max_tokens=4)
    hits_before = _stats(server)["prefix_cache"]["hits"]
    second = client.completions.create(model=model, prompt=prompt, max_tokens=4)
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and cached >= 16 * (second.usage.prompt_tokens // 16 - 1)
    assert _stats(server)["prefix_cache"]["hits"] >= hits_before + cached
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert chat.usage is not None and chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens_details.cached_tokens is not None


def test_the_stream_sends_a_document_per_interval_until_the_client_leaves(
    server: RemoteServer,
) -> None:
    documents, times = [], []
    with httpx.stream("GET", f"{server.url}/stats/stream?interval=0.2", timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                documents.append(json.loads(line[6:]))
                times.append(time.monotonic())
            if len(documents) == 4:
                break
    assert all(d["object"] == "engine.stats" for d in documents)
    assert documents[-1]["uptime_s"] > documents[0]["uptime_s"]
    assert times[-1] - times[0] >= 0.5  # three intervals of 0.2 s, less scheduling slack


@pytest.mark.parametrize("interval", ["0.01", "60", "soon"])
def test_an_interval_out_of_range_is_a_400_naming_it(server: RemoteServer, interval: str) -> None:
    response = httpx.get(f"{server.url}/stats/stream", params={"interval": interval}, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "interval"


def _check_timing(timing: dict[str, Any], usage: Any) -> None:
    assert timing["completion_tokens"] == usage.completion_tokens
    assert timing["prompt_tokens"] == usage.prompt_tokens
    assert 0 <= timing["queue_time_seconds"] <= timing["time_to_first_token_seconds"]
    assert timing["time_to_first_token_seconds"] <= timing["inference_time_seconds"]
    assert timing["decode_time_seconds"] <= timing["inference_time_seconds"]
    expected_rate = usage.completion_tokens / timing["inference_time_seconds"]
    assert timing["tokens_per_second"] == pytest.approx(expected_rate)
    assert timing["decode_tokens_per_second"] == pytest.approx(
        (usage.completion_tokens - 1) / timing["decode_time_seconds"]
    )
    assert timing["cached_prompt_tokens"] == usage.prompt_tokens_details.cached_tokens


def test_include_timing_adds_timing_to_chat_and_completion_bodies(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    extra = {"include_timing": True, "ignore_eos": True}
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to ten."}],
        max_tokens=12,
        extra_body=extra,
    )
    _check_timing(chat.model_extra["timing"], chat.usage)
    completion = client.completions.create(
        model=model, prompt="One, two,", max_tokens=12, extra_body=extra
    )
    _check_timing(completion.model_extra["timing"], completion.usage)
    plain = client.completions.create(model=model, prompt="One, two,", max_tokens=2)
    assert "timing" not in (plain.model_extra or {})


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("include_usage", [True, False])
def test_a_stream_with_include_timing_ends_with_a_timing_chunk(
    client: openai.OpenAI, endpoint: str, include_usage: bool
) -> None:
    model = client.models.list().data[0].id
    common: dict[str, Any] = {
        "model": model,
        "max_tokens": 8,
        "stream": True,
        "extra_body": {"include_timing": True, "ignore_eos": True},
    }
    if include_usage:
        common["stream_options"] = {"include_usage": True}
    if endpoint == "chat":
        chunks = list(
            client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **common)
        )
    else:
        chunks = list(client.completions.create(prompt="Hello", **common))
    *body, last = chunks
    assert last.choices == [] and "timing" in last.model_extra
    assert not any("timing" in (chunk.model_extra or {}) for chunk in body)
    timing = last.model_extra["timing"]
    assert timing["completion_tokens"] == 8
    assert (last.usage is not None) == include_usage


def test_include_timing_with_beam_search_is_refused_by_name(server: RemoteServer) -> None:
    response = httpx.post(
        f"{server.url}/v1/completions",
        json={
            "prompt": "Hi",
            "max_tokens": 4,
            "use_beam_search": True,
            "n": 2,
            "include_timing": True,
        },
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "include_timing"


def test_with_an_api_key_the_stats_need_it_and_the_page_does_not(tmp_path: Any) -> None:
    remote = RemoteServer(
        ["--api-key", API_KEY, "--max-model-len", "1024"], log_path=tmp_path / "server.log"
    )
    try:
        assert httpx.get(f"{remote.url}/stats", timeout=10).status_code == 401
        stream = httpx.get(f"{remote.url}/stats/stream", timeout=10)
        assert stream.status_code == 401
        headers = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.get(f"{remote.url}/stats", headers=headers, timeout=10).status_code == 200
        page = httpx.get(f"{remote.url}/", timeout=10)
        assert page.status_code == 200 and "ui/app.js" in page.text
        assert httpx.get(f"{remote.url}/ui/app.js", timeout=10).status_code == 200
    finally:
        assert remote.stop() == 0, remote.log_tail()


def test_disable_ui_removes_the_page_and_the_stats(tmp_path: Any) -> None:
    remote = RemoteServer(
        ["--disable-ui", "--max-model-len", "1024"], log_path=tmp_path / "server.log"
    )
    try:
        for path in ("/", "/ui/app.js", "/stats", "/stats/stream"):
            assert httpx.get(f"{remote.url}{path}", timeout=10).status_code == 404, path
        assert httpx.get(f"{remote.url}/health", timeout=10).status_code == 200
    finally:
        assert remote.stop() == 0, remote.log_tail()
