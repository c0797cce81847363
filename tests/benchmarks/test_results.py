"""The benchmark arithmetic and vLLM's printed blocks and JSON keys, on hand-made measurements."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pagoda.benchmarks.results import (
    RequestOutcome,
    compute_serve_metrics,
    format_latency,
    format_serve_result,
    format_throughput,
    latency_json,
    serve_result_json,
    throughput_json,
)


def outcomes() -> list[RequestOutcome]:
    return [
        RequestOutcome(
            prompt_len=10,
            success=True,
            start_time=0.0,
            ttft=0.1,
            latency=0.15,
            itl=[0.02, 0.03],
            output_tokens=3,
        ),
        RequestOutcome(
            prompt_len=20,
            success=True,
            start_time=0.5,
            ttft=0.2,
            latency=1.0,
            itl=[0.05],
            output_tokens=2,
        ),
        RequestOutcome(prompt_len=30, success=False, error="HTTP 500: boom"),
    ]


def test_counts_and_throughputs_use_successful_requests_only() -> None:
    metrics = compute_serve_metrics(outcomes(), duration=2.0)
    assert (metrics.completed, metrics.failed) == (2, 1)
    assert (metrics.total_input, metrics.total_output) == (30, 5)
    assert metrics.request_throughput == pytest.approx(1.0)
    assert metrics.output_throughput == pytest.approx(2.5)
    assert metrics.total_token_throughput == pytest.approx(17.5)
    assert metrics.request_goodput is None


def test_latency_stats_in_ms_with_tpot_excluding_the_first_token() -> None:
    metrics = compute_serve_metrics(outcomes(), duration=2.0, percentiles=[50, 99])
    assert metrics.tpots == pytest.approx([0.025, 0.8])
    ttft, tpot, itl, e2el = (metrics.stats[k] for k in ("ttft", "tpot", "itl", "e2el"))
    assert ttft.mean == pytest.approx(150.0)
    assert ttft.median == pytest.approx(150.0)
    assert ttft.std == pytest.approx(50.0)
    assert [p for p, _ in ttft.percentiles] == [50.0, 99.0]
    assert [v for _, v in ttft.percentiles] == pytest.approx([150.0, 199.0])
    assert tpot.mean == pytest.approx(412.5)
    assert itl.mean == pytest.approx(100.0 / 3)
    assert itl.median == pytest.approx(30.0)
    assert e2el.mean == pytest.approx(575.0)


def test_peaks_count_chunks_and_open_requests_per_second() -> None:
    metrics = compute_serve_metrics(outcomes(), duration=2.0)
    # Both requests' chunks all arrive in the first second; both requests are open in it.
    assert metrics.max_output_tokens_per_s == 5.0
    assert metrics.max_concurrent_requests == 2


def test_goodput_counts_requests_meeting_every_bound() -> None:
    metrics = compute_serve_metrics(
        outcomes(), duration=2.0, goodput_slos_ms={"ttft": 150, "tpot": 30}
    )
    assert metrics.request_goodput == pytest.approx(0.5)


def test_no_successful_request_gives_zeros_not_errors() -> None:
    metrics = compute_serve_metrics(outcomes()[2:], duration=1.0)
    assert (metrics.completed, metrics.failed, metrics.total_output) == (0, 1, 0)
    assert metrics.stats["ttft"].mean == 0.0
    assert metrics.max_output_tokens_per_s == 0.0


def test_result_block_has_vllms_labels_layout_and_order() -> None:
    metrics = compute_serve_metrics(outcomes(), duration=2.0)
    block = format_serve_result(metrics, max_concurrency=4, request_rate=math.inf).splitlines()
    assert block == [
        "============ Serving Benchmark Result ============",
        "Successful requests:                     2         ",
        "Failed requests:                         1         ",
        "Maximum request concurrency:             4         ",
        "Benchmark duration (s):                  2.00      ",
        "Total input tokens:                      30        ",
        "Total generated tokens:                  5         ",
        "Request throughput (req/s):              1.00      ",
        "Output token throughput (tok/s):         2.50      ",
        "Peak output token throughput (tok/s):    5.00      ",
        "Peak concurrent requests:                2.00      ",
        "Total Token throughput (tok/s):          17.50     ",
        "---------------Time to First Token----------------",
        "Mean TTFT (ms):                          150.00    ",
        "Median TTFT (ms):                        150.00    ",
        "P99 TTFT (ms):                           199.00    ",
        "-----Time per Output Token (excl. 1st token)------",
        "Mean TPOT (ms):                          412.50    ",
        "Median TPOT (ms):                        412.50    ",
        "P99 TPOT (ms):                           792.25    ",
        "---------------Inter-token Latency----------------",
        "Mean ITL (ms):                           33.33     ",
        "Median ITL (ms):                         30.00     ",
        "P99 ITL (ms):                            49.60     ",
        "==================================================",
    ]


def test_optional_lines_appear_only_when_configured() -> None:
    plain = format_serve_result(
        compute_serve_metrics(outcomes(), 2.0), max_concurrency=None, request_rate=math.inf
    )
    assert "Maximum request concurrency" not in plain
    assert "Request rate configured" not in plain
    assert "Request goodput" not in plain
    assert "End-to-end Latency" not in plain
    configured = format_serve_result(
        compute_serve_metrics(outcomes(), 2.0, percentiles=[90], goodput_slos_ms={"e2el": 500}),
        max_concurrency=None,
        request_rate=4.0,
        selected_metrics=["ttft", "e2el"],
    )
    assert "Request rate configured (RPS):           4.00      " in configured
    assert "Request goodput (req/s):                 0.50      " in configured
    assert "----------------End-to-end Latency----------------" in configured
    assert "P90 E2EL (ms):" in configured
    assert "TPOT" not in configured


def test_saved_json_has_vllms_keys_and_details_only_on_request() -> None:
    metrics = compute_serve_metrics(outcomes(), 2.0, percentiles=[99, 99.9])
    summary = serve_result_json(metrics, outcomes(), detailed=False)
    detailed = serve_result_json(metrics, outcomes(), detailed=True)
    keys = {
        "duration",
        "completed",
        "failed",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "request_goodput",
        "output_throughput",
        "total_token_throughput",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
    }
    for metric in ("ttft", "tpot", "itl", "e2el"):
        keys |= {f"{s}_{metric}_ms" for s in ("mean", "median", "std", "p99", "p99.9")}
    per_request = {"input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors"}
    assert set(summary) == keys
    assert set(detailed) == keys | per_request
    assert detailed["errors"] == ["", "", "HTTP 500: boom"]
    assert detailed["output_lens"] == [3, 2, 0]


def test_throughput_lines_and_json_match_vllm() -> None:
    text = format_throughput(num_requests=8, prompt_tokens=800, output_tokens=400, elapsed=4.0)
    assert text.splitlines() == [
        "Throughput: 2.00 requests/s, 300.00 total tokens/s, 100.00 output tokens/s",
        "Total num prompt tokens:  800",
        "Total num output tokens:  400",
    ]
    data = throughput_json(8, 800, 400, 4.0)
    assert data["elapsed_time"] == 4.0
    assert data["num_requests"] == 8
    assert data["total_num_tokens"] == 1200
    assert data["requests_per_second"] == pytest.approx(2.0)
    assert data["tokens_per_second"] == pytest.approx(300.0)


def test_latency_percentiles_and_lines_match_vllm() -> None:
    latencies = [1.0, 2.0, 3.0, 4.0]
    data = latency_json(latencies)
    assert data["avg_latency"] == pytest.approx(2.5)
    assert data["latencies"] == latencies
    assert list(data["percentiles"]) == ["10", "25", "50", "75", "90", "99"]
    assert data["percentiles"]["50"] == pytest.approx(2.5)
    lines = format_latency(latencies).splitlines()
    assert lines[0] == "Avg latency: 2.5 seconds"
    assert lines[1] == f"10% percentile latency: {np.percentile(latencies, 10)} seconds"
    assert lines[-1].startswith("99% percentile latency: ")
