"""Engine statistics: a per-step snapshot from the scheduler and the periodic log line.

The log line mirrors vLLM's so operators read it the same way: prompt and generation throughput,
running and waiting requests, KV cache usage and the prefix-cache hit rate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

logger = logging.getLogger("pagoda.stats")


@dataclass(slots=True)
class SchedulerStats:
    """State of the scheduler after one step."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0


class StatLogger:
    """Accumulates step stats and logs one line every `interval` seconds."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._reset(time.monotonic())
        self.last: SchedulerStats | None = None

    def _reset(self, now: float) -> None:
        self.window_start = now
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.queries = 0
        self.hits = 0

    def record(self, stats: SchedulerStats) -> None:
        self.last = stats
        self.prompt_tokens += stats.num_prompt_tokens
        self.generation_tokens += stats.num_generation_tokens
        self.queries += stats.prefix_cache_queries
        self.hits += stats.prefix_cache_hits
        now = time.monotonic()
        if now - self.window_start >= self.interval:
            self.log(now)

    def log(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.window_start, 1e-9)
        last = self.last or SchedulerStats()
        hit_rate = 100.0 * self.hits / self.queries if self.queries else 0.0
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
            "Prefix cache hit rate: %.1f%%",
            self.prompt_tokens / elapsed,
            self.generation_tokens / elapsed,
            last.num_running_reqs,
            last.num_waiting_reqs,
            100.0 * last.kv_cache_usage,
            hit_rate,
        )
        self._reset(now)
