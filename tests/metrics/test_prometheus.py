"""Tests for the observability pieces: Prometheus metrics, request timing, the stats log line and
the request log."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pagoda.entrypoints.openai.request_logger import RequestLogger
from pagoda.metrics import stats as stats_module
from pagoda.metrics.prometheus import (
    E2E_LATENCY_BUCKETS,
    INTER_TOKEN_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    PrometheusMetrics,
    build_1_2_5_buckets,
)
from pagoda.metrics.request_tracker import RequestTracker
from pagoda.metrics.stats import SchedulerStats, StatLogger

MODEL = "tiny-model"

# (exposed sample name, TYPE line name, type) for every metric the issue asks for.
EXPECTED_METRICS = [
    ("pagoda:num_requests_running", "pagoda:num_requests_running", "gauge"),
    ("pagoda:num_requests_waiting", "pagoda:num_requests_waiting", "gauge"),
    ("pagoda:kv_cache_usage_perc", "pagoda:kv_cache_usage_perc", "gauge"),
    ("pagoda:prefix_cache_queries_total", "pagoda:prefix_cache_queries_total", "counter"),
    ("pagoda:prefix_cache_hits_total", "pagoda:prefix_cache_hits_total", "counter"),
    ("pagoda:prompt_tokens_total", "pagoda:prompt_tokens_total", "counter"),
    ("pagoda:generation_tokens_total", "pagoda:generation_tokens_total", "counter"),
    ("pagoda:num_preemptions_total", "pagoda:num_preemptions_total", "counter"),
    ("pagoda:request_success_total", "pagoda:request_success_total", "counter"),
    (
        "pagoda:time_to_first_token_seconds_count",
        "pagoda:time_to_first_token_seconds",
        "histogram",
    ),
    (
        "pagoda:inter_token_latency_seconds_count",
        "pagoda:inter_token_latency_seconds",
        "histogram",
    ),
    (
        "pagoda:e2e_request_latency_seconds_count",
        "pagoda:e2e_request_latency_seconds",
        "histogram",
    ),
    ("pagoda:request_prompt_tokens_count", "pagoda:request_prompt_tokens", "histogram"),
    ("pagoda:request_generation_tokens_count", "pagoda:request_generation_tokens", "histogram"),
]


def sample(metrics: PrometheusMetrics, name: str, **labels: str) -> float:
    """The value of one exposed sample, parsed back from the rendered text."""
    body, _ = metrics.render()
    wanted = {"model_name": MODEL, **labels}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and s.labels == wanted:
                return s.value
    raise KeyError(f"no sample {name}{wanted}")


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(stats_module.time, "monotonic", fake)
    return fake


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def capture(logger_name: str) -> Iterator[ListHandler]:
    # NOTE: pagoda's own handler sets propagate=False on the `pagoda` logger, so pytest's caplog
    # (on the root logger) would see nothing; attach a handler to the logger itself.
    log = logging.getLogger(logger_name)
    handler = ListHandler()
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


@pytest.fixture
def stat_lines() -> Iterator[ListHandler]:
    yield from capture("pagoda.stats")


@pytest.fixture
def request_lines() -> Iterator[ListHandler]:
    yield from capture("pagoda.entrypoints.openai.request_logger")


# --- PrometheusMetrics ----------------------------------------------------------------------------


@pytest.mark.parametrize(("sample_name", "type_name", "kind"), EXPECTED_METRICS)
def test_render_exposes_each_metric_with_model_name_and_type(
    sample_name: str, type_name: str, kind: str
) -> None:
    text = PrometheusMetrics(MODEL).render()[0].decode()
    assert f"# TYPE {type_name} {kind}\n" in text
    assert re.search(rf'^{re.escape(sample_name)}\{{[^}}]*model_name="{MODEL}"', text, re.M)


def test_render_uses_classic_text_format_unless_openmetrics_is_asked_for() -> None:
    metrics = PrometheusMetrics(MODEL)
    assert metrics.render()[1] == "text/plain; version=0.0.4; charset=utf-8"
    body, content_type = metrics.render(
        "application/openmetrics-text; version=1.0.0; escaping=allow-utf-8"
    )
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")
    assert 'pagoda:num_requests_running{model_name="' in body.decode()


def test_a_scraper_that_would_get_escaped_names_gets_the_classic_format() -> None:
    # Prometheus 2.x's Accept header: OpenMetrics there would turn pagoda:x into pagoda_x.
    accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
        "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    body, content_type = PrometheusMetrics(MODEL).render(accept)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert 'pagoda:num_requests_running{model_name="' in body.decode()
    assert "pagoda_num_requests_running" not in body.decode()


def test_fresh_metrics_are_zero_and_every_finish_reason_is_present() -> None:
    metrics = PrometheusMetrics(MODEL)
    assert sample(metrics, "pagoda:num_requests_running") == 0
    assert sample(metrics, "pagoda:kv_cache_usage_perc") == 0
    for reason in ("stop", "length", "abort"):
        assert sample(metrics, "pagoda:request_success_total", finished_reason=reason) == 0


def test_record_step_sets_gauges_and_adds_up_counters() -> None:
    metrics = PrometheusMetrics(MODEL)
    metrics.record_step(
        SchedulerStats(
            num_running_reqs=3,
            num_waiting_reqs=2,
            kv_cache_usage=0.25,
            prefix_cache_queries=32,
            prefix_cache_hits=16,
            num_preemptions=1,
            num_prompt_tokens=100,
            num_generation_tokens=3,
        )
    )
    metrics.record_step(
        SchedulerStats(
            num_running_reqs=1,
            num_waiting_reqs=0,
            kv_cache_usage=0.5,
            prefix_cache_queries=8,
            prefix_cache_hits=0,
            num_preemptions=2,
            num_prompt_tokens=0,
            num_generation_tokens=1,
        )
    )
    # Gauges hold the latest step; counters hold the sum of all steps.
    assert sample(metrics, "pagoda:num_requests_running") == 1
    assert sample(metrics, "pagoda:num_requests_waiting") == 0
    assert sample(metrics, "pagoda:kv_cache_usage_perc") == 0.5
    assert sample(metrics, "pagoda:prefix_cache_queries_total") == 40
    assert sample(metrics, "pagoda:prefix_cache_hits_total") == 16
    assert sample(metrics, "pagoda:num_preemptions_total") == 3
    assert sample(metrics, "pagoda:prompt_tokens_total") == 100
    assert sample(metrics, "pagoda:generation_tokens_total") == 4


def test_record_step_ignores_a_negative_count_instead_of_raising() -> None:
    metrics = PrometheusMetrics(MODEL)
    metrics.record_step(SchedulerStats(num_prompt_tokens=-1, num_generation_tokens=2))
    assert sample(metrics, "pagoda:prompt_tokens_total") == 0
    assert sample(metrics, "pagoda:generation_tokens_total") == 2


def test_record_finished_counts_by_reason_and_observes_histograms() -> None:
    metrics = PrometheusMetrics(MODEL, max_model_len=1000)
    metrics.record_finished("stop", e2e_s=1.2, num_prompt_tokens=7, num_generation_tokens=30)
    metrics.record_finished("stop", e2e_s=0.4, num_prompt_tokens=3, num_generation_tokens=5)
    metrics.record_finished("length", e2e_s=9.0, num_prompt_tokens=12, num_generation_tokens=16)
    assert sample(metrics, "pagoda:request_success_total", finished_reason="stop") == 2
    assert sample(metrics, "pagoda:request_success_total", finished_reason="length") == 1
    assert sample(metrics, "pagoda:request_success_total", finished_reason="abort") == 0
    assert sample(metrics, "pagoda:e2e_request_latency_seconds_count") == 3
    assert sample(metrics, "pagoda:e2e_request_latency_seconds_sum") == pytest.approx(10.6)
    assert sample(metrics, "pagoda:e2e_request_latency_seconds_bucket", le="0.5") == 1
    assert sample(metrics, "pagoda:e2e_request_latency_seconds_bucket", le="1.5") == 2
    assert sample(metrics, "pagoda:request_prompt_tokens_count") == 3
    assert sample(metrics, "pagoda:request_prompt_tokens_sum") == 22
    assert sample(metrics, "pagoda:request_prompt_tokens_bucket", le="10.0") == 2
    assert sample(metrics, "pagoda:request_generation_tokens_sum") == 51


def test_latency_histograms_count_observations() -> None:
    metrics = PrometheusMetrics(MODEL)
    metrics.record_first_token(0.03)
    metrics.record_first_token(3.0)
    for _ in range(5):
        metrics.record_inter_token(0.02)
    assert sample(metrics, "pagoda:time_to_first_token_seconds_count") == 2
    assert sample(metrics, "pagoda:time_to_first_token_seconds_bucket", le="0.04") == 1
    assert sample(metrics, "pagoda:time_to_first_token_seconds_bucket", le="+Inf") == 2
    assert sample(metrics, "pagoda:inter_token_latency_seconds_count") == 5
    assert sample(metrics, "pagoda:inter_token_latency_seconds_sum") == pytest.approx(0.1)


def test_histograms_use_vllm_buckets() -> None:
    body = PrometheusMetrics(MODEL, max_model_len=4096).render()[0].decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}

    def bounds(name: str) -> list[float]:
        return [
            float(s.labels["le"])
            for s in families[name].samples
            if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
        ]

    assert len(TTFT_BUCKETS) == 22 and TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0
    assert bounds("pagoda:time_to_first_token_seconds") == list(TTFT_BUCKETS)
    assert bounds("pagoda:inter_token_latency_seconds") == list(INTER_TOKEN_LATENCY_BUCKETS)
    assert bounds("pagoda:e2e_request_latency_seconds") == list(E2E_LATENCY_BUCKETS)
    assert bounds("pagoda:request_prompt_tokens") == build_1_2_5_buckets(4096)
    assert build_1_2_5_buckets(4096) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert build_1_2_5_buckets(100)[-1] == 100


def test_two_instances_do_not_share_state() -> None:
    first = PrometheusMetrics(MODEL)
    second = PrometheusMetrics(MODEL)  # same names and labels: would collide in a global registry
    first.record_step(SchedulerStats(num_running_reqs=4, num_generation_tokens=10))
    first.record_finished("abort", 1.0, 1, 1)
    assert sample(first, "pagoda:generation_tokens_total") == 10
    assert sample(second, "pagoda:generation_tokens_total") == 0
    assert sample(second, "pagoda:num_requests_running") == 0
    assert sample(second, "pagoda:request_success_total", finished_reason="abort") == 0


def test_given_registry_is_used_without_adding_process_collectors() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(MODEL, registry)
    assert metrics.registry is registry
    metrics.record_step(SchedulerStats(num_waiting_reqs=2))
    assert registry.get_sample_value("pagoda:num_requests_waiting", {"model_name": MODEL}) == 2
    assert b"process_" not in metrics.render()[0]


# --- RequestTracker -------------------------------------------------------------------------------


def test_tracker_computes_ttft_itl_and_e2e_from_timestamps() -> None:
    metrics = PrometheusMetrics(MODEL)
    tracker = RequestTracker(metrics)
    tracker.on_arrival("a", arrival_time=10.0)
    tracker.on_tokens("a", 1, now=10.5)  # TTFT 0.5
    tracker.on_tokens("a", 1, now=10.75)  # ITL 0.25
    tracker.on_tokens("a", 2, now=11.0)  # ITL 0.25 (one observation per batch)
    tracker.on_finished("a", "length", num_prompt_tokens=6, num_generation_tokens=4, now=11.5)

    assert sample(metrics, "pagoda:time_to_first_token_seconds_count") == 1
    assert sample(metrics, "pagoda:time_to_first_token_seconds_sum") == 0.5
    assert sample(metrics, "pagoda:inter_token_latency_seconds_count") == 2
    assert sample(metrics, "pagoda:inter_token_latency_seconds_sum") == 0.5
    assert sample(metrics, "pagoda:e2e_request_latency_seconds_count") == 1
    assert sample(metrics, "pagoda:e2e_request_latency_seconds_sum") == 1.5
    assert sample(metrics, "pagoda:request_success_total", finished_reason="length") == 1
    assert sample(metrics, "pagoda:request_prompt_tokens_sum") == 6
    assert sample(metrics, "pagoda:request_generation_tokens_sum") == 4
    assert len(tracker) == 0


def test_tracker_keeps_requests_apart() -> None:
    metrics = PrometheusMetrics(MODEL)
    tracker = RequestTracker(metrics)
    tracker.on_arrival("a", 0.0)
    tracker.on_arrival("b", 1.0)
    tracker.on_tokens("a", 1, now=2.0)  # TTFT 2.0
    tracker.on_tokens("b", 1, now=2.0)  # TTFT 1.0
    tracker.on_tokens("a", 1, now=2.5)  # ITL 0.5
    assert sample(metrics, "pagoda:time_to_first_token_seconds_sum") == 3.0
    assert sample(metrics, "pagoda:inter_token_latency_seconds_count") == 1
    tracker.on_finished("b", "abort", 4, 1, now=3.0)
    assert "a" in tracker and "b" not in tracker


def test_tracker_ignores_unknown_ids_and_empty_batches() -> None:
    metrics = PrometheusMetrics(MODEL)
    tracker = RequestTracker(metrics)
    tracker.on_tokens("ghost", 3, now=1.0)
    tracker.on_finished("ghost", "stop", 1, 1, now=2.0)
    tracker.on_arrival("a", 0.0)
    tracker.on_tokens("a", 0, now=1.0)  # e.g. the final output of an abort: no token, no TTFT
    tracker.on_finished("a", "abort", 5, 0, now=1.0)
    tracker.on_finished("a", "abort", 5, 0, now=2.0)  # a second finish is a no-op
    tracker.discard("never-seen")
    assert sample(metrics, "pagoda:time_to_first_token_seconds_count") == 0
    assert sample(metrics, "pagoda:request_success_total", finished_reason="stop") == 0
    assert sample(metrics, "pagoda:request_success_total", finished_reason="abort") == 1
    assert sample(metrics, "pagoda:e2e_request_latency_seconds_sum") == 1.0


def test_tracker_discard_drops_state_without_recording() -> None:
    metrics = PrometheusMetrics(MODEL)
    tracker = RequestTracker(metrics)
    tracker.on_arrival("a", 0.0)
    tracker.discard("a")
    tracker.on_finished("a", "stop", 1, 1, now=1.0)
    assert len(tracker) == 0
    assert sample(metrics, "pagoda:request_success_total", finished_reason="stop") == 0


# --- StatLogger -----------------------------------------------------------------------------------


def busy(tokens: int = 10) -> SchedulerStats:
    """A step with two requests running, one waiting and `tokens` tokens generated."""
    return SchedulerStats(
        num_running_reqs=2,
        num_waiting_reqs=1,
        kv_cache_usage=0.125,
        prefix_cache_queries=4,
        prefix_cache_hits=1,
        num_generation_tokens=tokens,
    )


def test_stat_logger_logs_every_10_s_while_busy(clock: FakeClock, stat_lines: ListHandler) -> None:
    logger = StatLogger()
    for _ in range(31):  # one step per second for 30 s
        logger.record(busy())
        clock.now += 1.0
    assert len(stat_lines.messages) == 3
    assert stat_lines.messages[1] == (
        "Engine 000: Avg prompt throughput: 0.0 tokens/s, "
        "Avg generation throughput: 10.0 tokens/s, Running: 2 reqs, Waiting: 1 reqs, "
        "KV cache usage: 12.5%, Prefix cache hit rate: 25.0%"
    )


def test_stat_logger_shows_preemptions_only_when_there_were_some(
    clock: FakeClock, stat_lines: ListHandler
) -> None:
    logger = StatLogger()
    logger.record(busy())
    clock.now += 10.0
    logger.record(SchedulerStats(num_running_reqs=1, num_preemptions=2, num_prompt_tokens=50))
    clock.now += 10.0
    logger.record(busy())
    first, second = stat_lines.messages
    assert "Running: 1 reqs, Waiting: 0 reqs, Preemptions: 2, KV cache usage: 0.0%" in first
    assert "Preemptions" not in second


def test_stat_logger_is_silent_when_idle(clock: FakeClock, stat_lines: ListHandler) -> None:
    logger = StatLogger()
    for _ in range(30):
        logger.record(SchedulerStats())
        clock.now += 1.0
    clock.now += 60.0
    logger.log()
    assert stat_lines.messages == []


def test_stat_logger_does_not_count_a_quiet_spell_as_throughput(
    clock: FakeClock, stat_lines: ListHandler
) -> None:
    logger = StatLogger()
    # The last step of a request: it produced tokens and left the engine drained.
    logger.record(SchedulerStats(num_generation_tokens=5))
    clock.now += 600.0  # ten quiet minutes, no steps
    for _ in range(11):
        logger.record(busy())
        clock.now += 1.0
    # One line, for the 10 s after the quiet spell only; not 115 tokens over 610 s.
    assert len(stat_lines.messages) == 1
    assert "Avg generation throughput: 11.0 tokens/s" in stat_lines.messages[0]


def test_stat_logger_keeps_logging_back_to_back_requests(
    clock: FakeClock, stat_lines: ListHandler
) -> None:
    logger = StatLogger()
    for second in range(21):
        # Each request drains the engine at its last step, and the next arrives a second later.
        drained = second % 3 == 2
        logger.record(SchedulerStats(num_generation_tokens=1) if drained else busy(tokens=1))
        clock.now += 1.0
    assert len(stat_lines.messages) == 2


# --- RequestLogger --------------------------------------------------------------------------------


def test_request_logger_logs_the_whole_prompt_without_a_limit(request_lines: ListHandler) -> None:
    RequestLogger(max_log_len=None).log_request("cmpl-1", "Hello\nworld", [1, 2, 3], "params")
    assert request_lines.messages == [
        "Received request cmpl-1: prompt: 'Hello\\nworld', params: params, "
        "prompt_token_ids: [1, 2, 3]."
    ]


def test_request_logger_truncates_prompt_and_token_ids(request_lines: ListHandler) -> None:
    RequestLogger(max_log_len=4).log_request("r", "abcdefgh", list(range(10)), "p")
    assert request_lines.messages == [
        "Received request r: prompt: 'abcd', params: p, prompt_token_ids: [0, 1, 2, 3]."
    ]


def test_request_logger_with_zero_length_logs_no_prompt_text(request_lines: ListHandler) -> None:
    RequestLogger(0).log_request("r", "a secret prompt", [5, 6], "p")
    (line,) = request_lines.messages
    assert "secret" not in line
    assert "prompt: ''" in line and "prompt_token_ids: []" in line


def test_request_logger_accepts_missing_prompt_or_ids(request_lines: ListHandler) -> None:
    RequestLogger(3).log_request("r", None, [1, 2, 3, 4], "p")
    RequestLogger(3).log_request("s", "text", None, "p")
    assert request_lines.messages == [
        "Received request r: prompt: None, params: p, prompt_token_ids: [1, 2, 3].",
        "Received request s: prompt: 'tex', params: p, prompt_token_ids: None.",
    ]


def test_request_logger_rejects_a_negative_length() -> None:
    with pytest.raises(ValueError, match="max_log_len must be non-negative, got -1"):
        RequestLogger(-1)
