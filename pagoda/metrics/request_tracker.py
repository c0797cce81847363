"""Per-request timing for the Prometheus histograms: TTFT, inter-token latency, end-to-end latency.

The engine core reports tokens step by step (`EngineCoreOutputs`, stamped with the time the step
ended); the API side feeds each request's share of a step into a `RequestTracker`, which remembers
when the request arrived and when it last produced tokens, and forwards the intervals to a
`PrometheusMetrics`:

    arrival ──TTFT──► first token batch ──ITL──► next batch ──ITL──► ... ──► finished
    └──────────────────────────────── e2e ─────────────────────────────────────┘
    arrival ─queue─► scheduled ─prefill─► first token ──────decode──────────────► finished
                     └──────────────────── inference ───────────────────────────┘

The queue phase is the engine core's (it reports `queue_seconds` with a request's first token);
the others follow from it. The phases and the request's mean time per output token are
observed when it finishes, as in vLLM.

Today a step samples one token per request, but a step that hands a request several tokens at once
(speculative decoding) is one engine iteration, so inter-token latency is observed once per token
batch, as vLLM does, not once per token.

Every timestamp passed in must come from the same clock; `time.monotonic()` is the engine's (it
stamps `EngineCoreOutputs.timestamp`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pagoda.metrics.prometheus import PrometheusMetrics

__all__ = ["RequestTracker"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _RequestTimes:
    arrival_time: float
    # When the request's latest token batch arrived; None until its first one.
    last_token_time: float | None = None
    first_token_time: float | None = None
    # Seconds from arrival to the first scheduling, as the core reported it.
    queue_seconds: float | None = None


class RequestTracker:
    """Turns a stream of per-request token events into TTFT / ITL / e2e observations.

    Events for a request id that was never announced with `on_arrival` (or that already finished)
    are ignored, never raised: a late output for an aborted request must not break the loop that
    routes outputs. State is dropped when a request finishes, so a caller must end every request
    it announces with `on_finished` (or `discard`) or its entry stays behind.
    """

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics
        self._requests: dict[str, _RequestTimes] = {}

    def __len__(self) -> int:
        """Number of requests currently tracked."""
        return len(self._requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def on_arrival(self, request_id: str, arrival_time: float) -> None:
        """Start tracking `request_id`, which arrived at `arrival_time` (seconds, engine clock).

        Announcing an id again restarts its timing; the earlier state is dropped.
        """
        self._requests[request_id] = _RequestTimes(arrival_time)

    def on_tokens(
        self,
        request_id: str,
        num_new_tokens: int,
        now: float,
        queue_seconds: float | None = None,
    ) -> None:
        """Record that `request_id` received `num_new_tokens` tokens at time `now`
        (`queue_seconds`: the core's queue time, sent with the first token).

        The first batch observes the time to first token; each later one observes the latency
        since the previous batch. A batch with no tokens (e.g. the final output of an aborted
        request) observes nothing.
        """
        times = self._requests.get(request_id)
        if times is None or num_new_tokens <= 0:
            return
        if times.last_token_time is None:
            times.first_token_time = now
            times.queue_seconds = queue_seconds
            self.metrics.record_first_token(_elapsed(times.arrival_time, now))
        else:
            self.metrics.record_inter_token(_elapsed(times.last_token_time, now))
        times.last_token_time = now

    def on_finished(
        self,
        request_id: str,
        finish_reason: str,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        now: float,
    ) -> None:
        """Record that `request_id` finished at `now` with `finish_reason`, and stop tracking it.

        Call `on_tokens` for the final batch first: the tokens that came with the finishing
        output are part of the latency histograms too.
        """
        times = self._requests.pop(request_id, None)
        if times is None:
            logger.debug("finish of untracked request %s ignored", request_id)
            return
        self.metrics.record_finished(
            finish_reason,
            _elapsed(times.arrival_time, now),
            num_prompt_tokens,
            num_generation_tokens,
        )
        first = times.first_token_time
        if first is None:
            return  # never produced a token: it had no prefill or decode phase
        queue = times.queue_seconds
        if queue is None:  # not reported (an older core): count the whole TTFT as prefill
            queue = 0.0
        queue = min(max(queue, 0.0), _elapsed(times.arrival_time, first))
        scheduled = times.arrival_time + queue
        decode = _elapsed(first, now)
        self.metrics.record_phases(
            queue_s=queue,
            prefill_s=_elapsed(scheduled, first),
            decode_s=decode,
            inference_s=_elapsed(scheduled, now),
            time_per_output_token_s=(
                decode / (num_generation_tokens - 1) if num_generation_tokens > 1 else None
            ),
        )

    def discard(self, request_id: str) -> None:
        """Stop tracking `request_id` without recording anything (it never really ran)."""
        self._requests.pop(request_id, None)


def _elapsed(start: float, end: float) -> float:
    # NOTE: clamped at zero: timestamps taken on different threads can come out a hair out of
    # order, and a negative latency would land in the lowest bucket and skew the sum anyway.
    return max(end - start, 0.0)
