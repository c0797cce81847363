"""Engine statistics: a per-step snapshot from the scheduler and the periodic log line.

The log line mirrors vLLM's so operators read it the same way: every 10 seconds while the engine
is busy, prompt and generation throughput, running and waiting requests, KV cache usage and the
prefix-cache hit rate. An idle engine logs nothing. The same snapshots feed the Prometheus metrics
(`pagoda.metrics.prometheus`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagoda.metrics.engine_state import EngineSnapshot

if TYPE_CHECKING:
    from pagoda.spec_decode.config import SpeculativeConfig

logger = logging.getLogger("pagoda.stats")

# vLLM's default VLLM_LOG_STATS_INTERVAL.
DEFAULT_LOG_INTERVAL_S = 10.0


@dataclass(slots=True)
class SchedulerStats:
    """State of the scheduler after one step."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    # Of the waiting ones, those passed over for a reason other than capacity (a grammar still
    # compiling): vLLM's num_requests_waiting_by_reason{reason="deferred"}.
    num_deferred_reqs: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # Structured output in this step: seconds the compiler thread spent compiling grammars, and
    # seconds spent filling token bitmasks (the step loop's own cost of constraints).
    grammar_compile_seconds: float = 0.0
    grammar_mask_seconds: float = 0.0
    # Speculative decoding in this step; None when it is off.
    spec_decoding: SpecDecodingStats | None = None
    # The core's requests and KV blocks, a few times a second when the server asks for them
    # (`EngineConfig.snapshot_interval`), else None.
    snapshot: EngineSnapshot | None = None


@dataclass(slots=True)
class SpecDecodingStats:
    """Speculative decoding over an interval, with vLLM's counters: verification steps of
    requests that had drafts, drafted and accepted tokens, and acceptances by draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    @classmethod
    def empty(cls, config: SpeculativeConfig | None) -> SpecDecodingStats:
        k = config.num_speculative_tokens if config is not None else 0
        return cls(num_accepted_tokens_per_pos=[0] * k)

    def observe(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """One request's verification: it drafted and kept this many tokens."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        for position in range(num_accepted_tokens):
            self.num_accepted_tokens_per_pos[position] += 1

    def add(self, other: SpecDecodingStats) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        for position, count in enumerate(other.num_accepted_tokens_per_pos):
            self.num_accepted_tokens_per_pos[position] += count

    def take(self) -> SpecDecodingStats:
        """These counts, leaving this record at zero."""
        taken = SpecDecodingStats(
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            list(self.num_accepted_tokens_per_pos),
        )
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * len(taken.num_accepted_tokens_per_pos)
        return taken


class StatLogger:
    """Accumulates step stats and logs one line every `interval` seconds while the engine is busy.

    The line is vLLM's: `Engine 000: Avg prompt throughput: ..., Running: N reqs, Waiting: M reqs,
    KV cache usage: ..., Prefix cache hit rate: ...` (with `Preemptions: P, ` before the KV cache
    usage when any happened in the window). "GPU" is left out of "KV cache usage" because Pagoda
    also runs on CPU. A window in which no token was computed and nothing is running or waiting is
    idle: it is not logged.
    """

    def __init__(self, interval: float = DEFAULT_LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._reset(time.monotonic())
        self.last: SchedulerStats | None = None
        self._last_record_time = float("-inf")

    def _reset(self, now: float) -> None:
        self.window_start = now
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.queries = 0
        self.hits = 0
        self.preemptions = 0
        self.compile_seconds = 0.0
        self.mask_seconds = 0.0
        self.spec: SpecDecodingStats | None = None

    def _drained(self) -> bool:
        last = self.last
        return last is None or (last.num_running_reqs == 0 and last.num_waiting_reqs == 0)

    def _idle(self) -> bool:
        return self._drained() and self.prompt_tokens == 0 and self.generation_tokens == 0

    def record(self, stats: SchedulerStats) -> None:
        """Add one step's stats; logs when the current window is `interval` seconds old."""
        now = time.monotonic()
        if self._drained() and now - self._last_record_time >= self.interval:
            # NOTE: the engine steps only while it has work, so a step that comes an interval or
            # more after the engine drained ends a quiet spell: open a fresh window, or the quiet
            # time would dilute the next line's throughput. (The unlogged tail of the previous busy
            # spell is dropped; a line about it now would be stale.) Shorter gaps stay in the
            # window, so back-to-back requests that each drain the engine still get their lines.
            self._reset(now)
        self._last_record_time = now
        self.last = stats
        self.prompt_tokens += stats.num_prompt_tokens
        self.generation_tokens += stats.num_generation_tokens
        self.queries += stats.prefix_cache_queries
        self.hits += stats.prefix_cache_hits
        self.preemptions += stats.num_preemptions
        self.compile_seconds += stats.grammar_compile_seconds
        self.mask_seconds += stats.grammar_mask_seconds
        if stats.spec_decoding is not None:
            if self.spec is None:
                positions = len(stats.spec_decoding.num_accepted_tokens_per_pos)
                self.spec = SpecDecodingStats(num_accepted_tokens_per_pos=[0] * positions)
            self.spec.add(stats.spec_decoding)
        if now - self.window_start >= self.interval:
            self.log(now)

    def log(self, now: float | None = None) -> None:
        """Log the current window (unless it was idle) and start a new one."""
        now = time.monotonic() if now is None else now
        if self._idle():
            self._reset(now)
            return
        elapsed = max(now - self.window_start, 1e-9)
        last = self.last or SchedulerStats()
        hit_rate = 100.0 * self.hits / self.queries if self.queries else 0.0
        preemptions = f"Preemptions: {self.preemptions}, " if self.preemptions else ""
        grammars = ""
        if self.compile_seconds or self.mask_seconds:
            grammars = (
                f", Grammar compile: {1e3 * self.compile_seconds:.1f} ms, "
                f"masks: {1e3 * self.mask_seconds:.1f} ms"
            )
        logger.info(
            "Engine 000: Avg prompt throughput: %.1f tokens/s, "
            "Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, %sKV cache usage: %.1f%%, "
            "Prefix cache hit rate: %.1f%%%s",
            self.prompt_tokens / elapsed,
            self.generation_tokens / elapsed,
            last.num_running_reqs,
            last.num_waiting_reqs,
            preemptions,
            100.0 * last.kv_cache_usage,
            hit_rate,
            grammars,
        )
        spec = self.spec
        if spec is not None and spec.num_drafts:
            # vLLM's second line, for speculative decoding.
            per_position = ", ".join(
                f"{count / spec.num_drafts:.3f}" for count in spec.num_accepted_tokens_per_pos
            )
            logger.info(
                "SpecDecoding metrics: Mean acceptance length: %.2f, Accepted throughput: %.2f "
                "tokens/s, Drafted throughput: %.2f tokens/s, Accepted: %d tokens, Drafted: %d "
                "tokens, Per-position acceptance rate: %s, Avg Draft acceptance rate: %.1f%%",
                1 + spec.num_accepted_tokens / spec.num_drafts,
                spec.num_accepted_tokens / elapsed,
                spec.num_draft_tokens / elapsed,
                spec.num_accepted_tokens,
                spec.num_draft_tokens,
                per_position,
                100.0 * spec.num_accepted_tokens / max(spec.num_draft_tokens, 1),
            )
        self._reset(now)
