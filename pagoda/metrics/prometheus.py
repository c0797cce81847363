"""Prometheus metrics for the `/metrics` route, named like vLLM's so its dashboards keep working.

Every metric is vLLM's with the prefix `pagoda:` instead of `vllm:` and a `model_name` label (the
first served model name). By default each is also exposed under vLLM's own name (`vllm:...`, with
vLLM's `engine="0"` label, and the deprecated `vllm:time_per_output_token_seconds` and
`vllm:gpu_cache_usage_perc` that older vLLM dashboards still query), so a dashboard or alert
written for vLLM reads Pagoda unchanged: `_VllmNames` renames the families at scrape time, no
value is recorded twice. Scheduler-level numbers (running / waiting requests, KV cache usage,
token and prefix-cache counters, preemptions) arrive once per engine step through `record_step`;
request-level timings (TTFT, inter-token latency, end-to-end latency, prompt / generation lengths)
arrive from a `RequestTracker` (`pagoda.metrics.request_tracker`) as requests produce tokens and
finish. `render` produces the exposition body for the HTTP route.

Each `PrometheusMetrics` owns a `CollectorRegistry` rather than using prometheus_client's global
one, so two servers (or two tests) in one process never register the same name twice or read each
other's counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from pagoda.metrics.http import HttpMetrics
from pagoda.metrics.stats import SchedulerStats, SpecDecodingStats

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

# vLLM's buckets of iteration_tokens_total: 1, 8, 16, 32, ..., 16384.
ITERATION_TOKEN_BUCKETS: tuple[float, ...] = (1.0,) + tuple(float(8 << i) for i in range(12))

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
    `vllm_names` also exposes every metric under vLLM's name (see the module docstring).

    All methods are thread-safe (prometheus_client locks each value), so the engine thread and the
    event loop may both record.
    """

    def __init__(
        self,
        model_name: str,
        registry: CollectorRegistry | None = None,
        *,
        max_model_len: int | None = None,
        vllm_names: bool = True,
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
        own: list[Collector] = []

        def gauge(name: str, doc: str) -> Gauge:
            own.append(Gauge(name, doc, labelnames=labels, registry=registry))
            return own[-1]  # type: ignore[return-value]

        def counter(name: str, doc: str, labelnames: list[str] = labels) -> Counter:
            own.append(Counter(name, doc, labelnames=labelnames, registry=registry))
            return own[-1]  # type: ignore[return-value]

        def histogram(name: str, doc: str, buckets: tuple[float, ...] | list[float]) -> Histogram:
            own.append(Histogram(name, doc, labelnames=labels, buckets=buckets, registry=registry))
            return own[-1]  # type: ignore[return-value]

        # Children bound to our label value once, so recording is one call with no label lookup.
        self.num_requests_running = gauge(
            "pagoda:num_requests_running", "Requests in the running batch."
        ).labels(model_name)
        # Requests the server refused at admission, by reason ("overload": the queue was full).
        self.requests_rejected = counter(
            "pagoda:requests_rejected",
            "Requests refused at admission (429) because the waiting queue was full.",
            ["model_name", "reason"],
        )
        self.requests_rejected.labels(model_name, "overload")  # at 0 from the start
        self.num_requests_waiting = gauge(
            "pagoda:num_requests_waiting",
            "Requests waiting to be scheduled, preempted ones included.",
        ).labels(model_name)
        waiting_by_reason = Gauge(
            "pagoda:num_requests_waiting_by_reason",
            "Waiting requests by why they wait: capacity (KV cache or batch slots) or deferred "
            "(a grammar still compiling).",
            labelnames=["model_name", "reason"],
            registry=registry,
        )
        own.append(waiting_by_reason)
        self.waiting_for_capacity = waiting_by_reason.labels(model_name, "capacity")
        self.waiting_deferred = waiting_by_reason.labels(model_name, "deferred")
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
        by_source = counter(
            "pagoda:prompt_tokens_by_source",
            "Prompt tokens by where their KV came from: local_compute (computed) or "
            "local_cache_hit (the prefix cache).",
            ["model_name", "source"],
        )
        self.prompt_tokens_computed = by_source.labels(model_name, "local_compute")
        self.prompt_tokens_from_cache = by_source.labels(model_name, "local_cache_hit")
        self.prompt_tokens_cached = counter(
            "pagoda:prompt_tokens_cached", "Prompt tokens served from the prefix cache."
        ).labels(model_name)
        self.generation_tokens = counter("pagoda:generation_tokens", "Tokens generated.").labels(
            model_name
        )
        self.num_preemptions = counter(
            "pagoda:num_preemptions", "Requests preempted to free KV cache blocks."
        ).labels(model_name)
        self._request_success = counter(
            "pagoda:request_success",
            "Finished requests, by finish reason.",
            ["model_name", "finished_reason"],
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
        self.request_max_num_generation_tokens = histogram(
            "pagoda:request_max_num_generation_tokens",
            "Generated length of each finished sequence, in tokens (vLLM: the longest of a "
            "request's n; Pagoda observes each of the n).",
            token_buckets,
        ).labels(model_name)
        self.request_time_per_output_token = histogram(
            "pagoda:request_time_per_output_token_seconds",
            "Mean seconds per output token after the first, of each finished request.",
            INTER_TOKEN_LATENCY_BUCKETS,
        ).labels(model_name)
        # The phases of each finished request that produced a token (see RequestTracker).
        self.request_queue_time = histogram(
            "pagoda:request_queue_time_seconds",
            "Seconds a request waited before it was first scheduled.",
            E2E_LATENCY_BUCKETS,
        ).labels(model_name)
        self.request_prefill_time = histogram(
            "pagoda:request_prefill_time_seconds",
            "Seconds from a request's first scheduling to its first token.",
            E2E_LATENCY_BUCKETS,
        ).labels(model_name)
        self.request_decode_time = histogram(
            "pagoda:request_decode_time_seconds",
            "Seconds from a request's first token to its last.",
            E2E_LATENCY_BUCKETS,
        ).labels(model_name)
        self.request_inference_time = histogram(
            "pagoda:request_inference_time_seconds",
            "Seconds from a request's first scheduling to its end.",
            E2E_LATENCY_BUCKETS,
        ).labels(model_name)
        self.request_params_n = histogram(
            "pagoda:request_params_n", "The n of each finished request.", (1, 2, 5, 10, 20)
        ).labels(model_name)
        self.request_params_max_tokens = histogram(
            "pagoda:request_params_max_tokens",
            "The max_tokens of each finished request (its context limit when unset).",
            token_buckets,
        ).labels(model_name)
        self.iteration_tokens = histogram(
            "pagoda:iteration_tokens_total",
            "Tokens computed per engine step (prefill and decode).",
            ITERATION_TOKEN_BUCKETS,
        ).labels(model_name)

        self._vllm_names = _VllmNames(own) if vllm_names else None
        if self._vllm_names is not None:
            registry.register(self._vllm_names)
        # Speculative decoding's counters, made at the first step that reports drafts (vLLM
        # has them only when speculation is on).
        self._spec: tuple[Counter, Counter, Counter, Counter] | None = None
        # The API server's HTTP metrics (unprefixed, as vLLM's are): fed by its middleware.
        self.http = HttpMetrics(registry)

    def record_step(self, stats: SchedulerStats) -> None:
        """Fold one engine step's `SchedulerStats` in: set the gauges, add the per-step counts."""
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        deferred = min(max(stats.num_deferred_reqs, 0), stats.num_waiting_reqs)
        self.waiting_deferred.set(deferred)
        self.waiting_for_capacity.set(stats.num_waiting_reqs - deferred)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage)
        # Counter.inc raises on a negative amount; a miscounted step must not take down the event
        # loop that records it, so clamp instead.
        self.prefix_cache_queries.inc(max(stats.prefix_cache_queries, 0))
        self.prefix_cache_hits.inc(max(stats.prefix_cache_hits, 0))
        self.prompt_tokens.inc(max(stats.num_prompt_tokens, 0))
        self.prompt_tokens_computed.inc(max(stats.num_prompt_tokens, 0))
        self.prompt_tokens_from_cache.inc(max(stats.prefix_cache_hits, 0))
        self.prompt_tokens_cached.inc(max(stats.prefix_cache_hits, 0))
        self.generation_tokens.inc(max(stats.num_generation_tokens, 0))
        self.num_preemptions.inc(max(stats.num_preemptions, 0))
        step_tokens = stats.num_prompt_tokens + stats.num_generation_tokens
        if step_tokens > 0:
            self.iteration_tokens.observe(step_tokens)
        if stats.spec_decoding is not None:
            self._record_spec_decoding(stats.spec_decoding)

    def _record_spec_decoding(self, spec: SpecDecodingStats) -> None:
        if self._spec is None:
            labels = ["model_name"]
            made = (
                Counter(
                    "pagoda:spec_decode_num_drafts",
                    "Verification steps of requests that had drafts.",
                    labelnames=labels,
                    registry=self.registry,
                ),
                Counter(
                    "pagoda:spec_decode_num_draft_tokens",
                    "Draft tokens proposed.",
                    labelnames=labels,
                    registry=self.registry,
                ),
                Counter(
                    "pagoda:spec_decode_num_accepted_tokens",
                    "Draft tokens accepted.",
                    labelnames=labels,
                    registry=self.registry,
                ),
                Counter(
                    "pagoda:spec_decode_num_accepted_tokens_per_pos",
                    "Draft tokens accepted, by position in the draft (0 first).",
                    labelnames=["model_name", "position"],
                    registry=self.registry,
                ),
            )
            if self._vllm_names is not None:
                self._vllm_names.add_sources(made)
            self._spec = made
        drafts, draft_tokens, accepted, per_pos = self._spec
        drafts.labels(self.model_name).inc(max(spec.num_drafts, 0))
        draft_tokens.labels(self.model_name).inc(max(spec.num_draft_tokens, 0))
        accepted.labels(self.model_name).inc(max(spec.num_accepted_tokens, 0))
        for position, count in enumerate(spec.num_accepted_tokens_per_pos):
            per_pos.labels(self.model_name, str(position)).inc(max(count, 0))

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
        self.request_max_num_generation_tokens.observe(num_generation_tokens)

    def record_phases(
        self,
        *,
        queue_s: float,
        prefill_s: float,
        decode_s: float,
        inference_s: float,
        time_per_output_token_s: float | None,
    ) -> None:
        """Observe the phases of one finished request (see `RequestTracker`), in seconds."""
        self.request_queue_time.observe(queue_s)
        self.request_prefill_time.observe(prefill_s)
        self.request_decode_time.observe(decode_s)
        self.request_inference_time.observe(inference_s)
        if time_per_output_token_s is not None:
            self.request_time_per_output_token.observe(time_per_output_token_s)

    def record_params(self, n: int, max_tokens: int) -> None:
        """Observe one finished request's n and max_tokens."""
        self.request_params_n.observe(n)
        self.request_params_max_tokens.observe(max_tokens)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type.

        Without `accept` (or for a plain scraper) this is the classic text format 0.0.4 that every
        Prometheus understands; pass the request's Accept header to let a scraper that asks for
        OpenMetrics (or text format 1.0.0) get it, but only where the names come through as they
        are. NOTE: prometheus_client escapes `pagoda:x` to `pagoda_x` in OpenMetrics unless the
        scraper allows UTF-8 names, and Prometheus 2.x asks for OpenMetrics without that: its
        stored series would then not match the documented names (or any vLLM dashboard), so such
        a scraper gets the classic format, in which colons are legal.
        """
        encoder, content_type = choose_encoder(accept or "")
        if "escaping=" in content_type and "escaping=allow-utf-8" not in content_type:
            encoder, content_type = choose_encoder("")
        return encoder(self.registry), content_type


# vLLM names retired after Pagoda's metrics were modelled, still queried by dashboards built for
# older vLLM releases: (old vLLM name, the Pagoda metric with its meaning).
_DEPRECATED_VLLM_ALIASES = (
    ("vllm:time_per_output_token_seconds", "pagoda:inter_token_latency_seconds"),
    ("vllm:gpu_cache_usage_perc", "pagoda:kv_cache_usage_perc"),
)


class _VllmNames(Collector):
    """Pagoda's metric families again under vLLM's names, built at scrape time from the same
    values: `pagoda:X` becomes `vllm:X` with vLLM's `engine="0"` label added (one engine)."""

    def __init__(self, sources: Iterable[Collector]) -> None:
        self._sources = list(sources)

    def add_sources(self, sources: Iterable[Collector]) -> None:
        self._sources.extend(sources)

    def collect(self) -> Iterator[Metric]:
        for source in self._sources:
            for family in source.collect():
                yield _renamed(family, "vllm:" + family.name.removeprefix("pagoda:"))
                for old_name, pagoda_name in _DEPRECATED_VLLM_ALIASES:
                    if family.name == pagoda_name:
                        yield _renamed(family, old_name)


def _renamed(family: Metric, name: str) -> Metric:
    renamed = Metric(name, family.documentation, family.type, family.unit)
    for sample in family.samples:
        renamed.add_sample(
            name + sample.name[len(family.name) :],
            {**sample.labels, "engine": "0"},
            sample.value,
            sample.timestamp,
            sample.exemplar,
        )
    return renamed
