"""Prometheus metrics for the `/metrics` route, named like vLLM's so its dashboards keep working.

Every metric is vLLM's with the prefix `pagoda:` instead of `vllm:` and a `model_name` label (the
first served model name). Scheduler-level numbers (running / waiting requests, KV cache usage,
token and prefix-cache counters, preemptions) arrive once per engine step through `record_step`;
request-level timings (TTFT, inter-token latency, end-to-end latency, prompt / generation lengths)
arrive from a `RequestTracker` (`pagoda.metrics.request_tracker`) as requests produce tokens and
finish. `render` produces the exposition body for the HTTP route.

Each `PrometheusMetrics` owns a `CollectorRegistry` rather than using prometheus_client's global
one, so two servers (or two tests) in one process never register the same name twice or read each
other's counts.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from pagoda.metrics.stats import SchedulerStats

__all__ = [
    "E2E_LATENCY_BUCKETS",
    "FINISHED_REASONS",
    "INTER_TOKEN_LATENCY_BUCKETS",
    "PrometheusMetrics",
    "TTFT_BUCKETS",
    "build_1_2_5_buckets",
]

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), kept identical so that histogram_quantile
# panels built for vLLM read the same on Pagoda.
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

# The reasons a request can finish (`EngineCoreOutput.finish_reason`). Their series exist from the
# start at 0, as in vLLM, so a rate() over request_success_total works before the first abort.
FINISHED_REASONS: tuple[str, ...] = ("stop", "length", "abort")

# Used for the token-count histograms when the caller does not pass the model's context length.
_DEFAULT_MAX_MODEL_LEN = 131072


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """Bucket bounds 1, 2, 5, 10, 20, 50, ... that do not exceed `max_value` (vLLM's rule).

    >>> build_1_2_5_buckets(100)
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
    """
    if max_value < 1:
        raise ValueError(f"max_value must be at least 1, got {max_value}")
    buckets: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_value:
                return buckets
            buckets.append(float(value))
        scale *= 10


class PrometheusMetrics:
    """The engine's Prometheus metrics for one served model, in a registry of their own.

    `registry` defaults to a fresh `CollectorRegistry` that also carries the standard `process_*`
    and `python_*` collectors (as vLLM's global registry does); pass an existing registry to add
    Pagoda's metrics to it instead. `max_model_len` sets the top of the 1-2-5 buckets of the
    per-request token histograms, as in vLLM; pass the served model's context length.

    All methods are thread-safe (prometheus_client locks each value), so the engine thread and the
    event loop may both record.
    """

    def __init__(
        self,
        model_name: str,
        registry: CollectorRegistry | None = None,
        *,
        max_model_len: int | None = None,
    ) -> None:
        self.model_name = model_name
        if registry is None:
            registry = CollectorRegistry()
            # Only on a registry we created: the global one already has these, and registering a
            # collector twice raises "Duplicated timeseries".
            prometheus_client.ProcessCollector(registry=registry)
            prometheus_client.PlatformCollector(registry=registry)
            prometheus_client.GCCollector(registry=registry)
        self.registry = registry
        labels = ["model_name"]
        token_buckets = build_1_2_5_buckets(max_model_len or _DEFAULT_MAX_MODEL_LEN)

        # NOTE: prometheus_client adds `_total` to a counter's name when it exposes it (and a
        # `_created` timestamp next to it), so counters are declared without the suffix:
        # "pagoda:prompt_tokens" is exposed as `pagoda:prompt_tokens_total`, vLLM's spelling.
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labelnames=labels, registry=registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labelnames=labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] | list[float]) -> Histogram:
            return Histogram(name, doc, labelnames=labels, buckets=buckets, registry=registry)

        # Children bound to our label value once, so recording is one call with no label lookup.
        self.num_requests_running = gauge(
            "pagoda:num_requests_running", "Requests in the running batch."
        ).labels(model_name)
        # Requests the server refused at admission, by reason ("overload": the queue was full).
        self.requests_rejected = Counter(
            "pagoda:requests_rejected",
            "Requests refused at admission (429) because the waiting queue was full.",
            labelnames=["model_name", "reason"],
            registry=registry,
        )
        self._model_name = model_name
        self.num_requests_waiting = gauge(
            "pagoda:num_requests_waiting",
            "Requests waiting to be scheduled, preempted ones included.",
        ).labels(model_name)
        self.kv_cache_usage_perc = gauge(
            "pagoda:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1)."
        ).labels(model_name)

        self.prefix_cache_queries = counter(
            "pagoda:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
        ).labels(model_name)
        self.prefix_cache_hits = counter(
            "pagoda:prefix_cache_hits", "Prompt tokens found in the prefix cache."
        ).labels(model_name)
        self.prompt_tokens = counter(
            "pagoda:prompt_tokens", "Prompt (prefill) tokens computed."
        ).labels(model_name)
        self.generation_tokens = counter("pagoda:generation_tokens", "Tokens generated.").labels(
            model_name
        )
        self.num_preemptions = counter(
            "pagoda:num_preemptions", "Requests preempted to free KV cache blocks."
        ).labels(model_name)
        self._request_success = Counter(
            "pagoda:request_success",
            "Finished requests, by finish reason.",
            labelnames=["model_name", "finished_reason"],
            registry=registry,
        )
        for reason in FINISHED_REASONS:
            self._request_success.labels(model_name, reason)

        self.time_to_first_token = histogram(
            "pagoda:time_to_first_token_seconds",
            "Seconds from arrival to the first generated token.",
            TTFT_BUCKETS,
        ).labels(model_name)
        self.inter_token_latency = histogram(
            "pagoda:inter_token_latency_seconds",
            "Seconds between consecutive token batches of a request.",
            INTER_TOKEN_LATENCY_BUCKETS,
        ).labels(model_name)
        self.e2e_request_latency = histogram(
            "pagoda:e2e_request_latency_seconds",
            "Seconds from arrival to the end of a request.",
            E2E_LATENCY_BUCKETS,
        ).labels(model_name)
        self.request_prompt_tokens = histogram(
            "pagoda:request_prompt_tokens",
            "Prompt length of each finished request, in tokens.",
            token_buckets,
        ).labels(model_name)
        self.request_generation_tokens = histogram(
            "pagoda:request_generation_tokens",
            "Generated length of each finished request, in tokens.",
            token_buckets,
        ).labels(model_name)

    def record_step(self, stats: SchedulerStats) -> None:
        """Fold one engine step's `SchedulerStats` in: set the gauges, add the per-step counts."""
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage)
        # Counter.inc raises on a negative amount; a miscounted step must not take down the event
        # loop that records it, so clamp instead.
        self.prefix_cache_queries.inc(max(stats.prefix_cache_queries, 0))
        self.prefix_cache_hits.inc(max(stats.prefix_cache_hits, 0))
        self.prompt_tokens.inc(max(stats.num_prompt_tokens, 0))
        self.generation_tokens.inc(max(stats.num_generation_tokens, 0))
        self.num_preemptions.inc(max(stats.num_preemptions, 0))

    def record_first_token(self, ttft_s: float) -> None:
        """Observe one request's time to first token (arrival to first token), in seconds."""
        self.time_to_first_token.observe(ttft_s)

    def record_inter_token(self, itl_s: float) -> None:
        """Observe the time between two consecutive token batches of one request, in seconds."""
        self.inter_token_latency.observe(itl_s)

    def record_finished(
        self,
        finish_reason: str,
        e2e_s: float,
        num_prompt_tokens: int,
        num_generation_tokens: int,
    ) -> None:
        """Count one finished request under `finish_reason` and observe its latency and lengths.

        `finish_reason` is "stop", "length" or "abort" (`EngineCoreOutput.finish_reason`); another
        value gets a series of its own rather than being dropped.
        """
        self._request_success.labels(self.model_name, finish_reason).inc()
        self.e2e_request_latency.observe(e2e_s)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type.

        Without `accept` (or for a plain scraper) this is the classic text format 0.0.4 that every
        Prometheus understands; pass the request's Accept header to let a scraper that asks for
        OpenMetrics (or text format 1.0.0) get it.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
