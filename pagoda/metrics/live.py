"""The live view of a serving engine: what `/stats` answers and `/stats/stream` streams.

`LiveStats` lives on the API side and sees every engine step as it arrives (`record`): it keeps
the counters since start, the token counts of the steps of the last `RATE_WINDOW_S` seconds (the
throughput is their sum over the window, so it falls to zero within the window once the engine
is idle), the latest step's composition, when each request got its first token, and the latest
`EngineSnapshot` of each engine core (requests and KV blocks, `pagoda.metrics.engine_state`).
`document()` turns that into one JSON-ready dict; its keys are the stream's schema
(docs/ui.md lists them).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from pagoda.engine.messages import EngineCoreOutputs
from pagoda.metrics.engine_state import EngineSnapshot, process_rss_bytes
from pagoda.metrics.stats import SchedulerStats

# Seconds of steps the throughput figures average over.
RATE_WINDOW_S = 2.0
# First-token times are kept for at most this many requests (those of the latest snapshot are
# looked up; a request that ends is dropped at once).
_MAX_TRACKED = 4096


class LiveStats:
    """Counters, rates and the latest engine snapshots for the live page (module docstring)."""

    def __init__(self, model_name: str, data_parallel_size: int = 1) -> None:
        self.model_name = model_name
        self.data_parallel_size = data_parallel_size
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.num_steps = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.preemptions = 0
        self.finished_requests = 0
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.last_step_prompt_tokens = 0
        self.last_step_generation_tokens = 0
        # (monotonic time, prompt tokens, generation tokens) of the recent steps.
        self._recent: deque[tuple[float, int, int]] = deque()
        self._first_token: dict[str, float] = {}
        self.snapshots: dict[int, EngineSnapshot] = {}

    def record(self, outputs: EngineCoreOutputs, stats: SchedulerStats) -> None:
        """Fold in one engine step (or an idle notice with no outputs)."""
        now = time.monotonic()
        self.running = stats.num_running_reqs
        self.waiting = stats.num_waiting_reqs
        self.kv_cache_usage = stats.kv_cache_usage
        if stats.snapshot is not None:
            self.snapshots[stats.snapshot.engine_index] = stats.snapshot
        if stats.num_prompt_tokens or stats.num_generation_tokens or outputs.outputs:
            self.num_steps += 1
            self.last_step_prompt_tokens = stats.num_prompt_tokens
            self.last_step_generation_tokens = stats.num_generation_tokens
            self._recent.append((now, stats.num_prompt_tokens, stats.num_generation_tokens))
        self.prompt_tokens += stats.num_prompt_tokens
        self.generation_tokens += stats.num_generation_tokens
        self.prefix_cache_queries += stats.prefix_cache_queries
        self.prefix_cache_hits += stats.prefix_cache_hits
        self.preemptions += stats.num_preemptions
        for output in outputs.outputs:
            if (
                output.new_token_ids
                and output.request_id not in self._first_token
                and len(self._first_token) < _MAX_TRACKED
            ):
                self._first_token[output.request_id] = outputs.timestamp or now
            if output.finish_reason is not None:
                self.finished_requests += 1
                self._first_token.pop(output.request_id, None)
        if not self.running and not self.waiting:
            self.last_step_prompt_tokens = self.last_step_generation_tokens = 0
            self._first_token.clear()

    def document(self) -> dict[str, Any]:
        """The engine's state now, as one JSON-ready dict."""
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        window = min(RATE_WINDOW_S, max(now - self.started, 1e-9))
        recent_prompt = sum(entry[1] for entry in self._recent)
        recent_generation = sum(entry[2] for entry in self._recent)
        snapshots = [self.snapshots[index] for index in sorted(self.snapshots)]
        return {
            "object": "engine.stats",
            "time": time.time(),
            "uptime_s": now - self.started,
            "model": self.model_name,
            "data_parallel_size": self.data_parallel_size,
            "running": self.running,
            "waiting": self.waiting,
            "last_step": {
                "prefill_tokens": self.last_step_prompt_tokens,
                "decode_tokens": self.last_step_generation_tokens,
            },
            "throughput": {
                "window_s": RATE_WINDOW_S,
                "prompt_tokens_per_s": recent_prompt / window,
                "generation_tokens_per_s": recent_generation / window,
                "steps_per_s": len(self._recent) / window,
            },
            "totals": {
                "steps": self.num_steps,
                "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens,
                "preemptions": self.preemptions,
                "finished_requests": self.finished_requests,
            },
            "prefix_cache": {
                "queries": self.prefix_cache_queries,
                "hits": self.prefix_cache_hits,
                "hit_rate": (
                    self.prefix_cache_hits / self.prefix_cache_queries
                    if self.prefix_cache_queries
                    else 0.0
                ),
            },
            "kv_cache": self._kv_cache(snapshots),
            "requests": [self._request(s, r, now) for s in snapshots for r in s.requests],
            "memory": {
                "api_server_rss_bytes": process_rss_bytes(),
                "engine_rss_bytes": sum(s.rss_bytes for s in snapshots),
            },
        }

    def _kv_cache(self, snapshots: list[EngineSnapshot]) -> dict[str, Any]:
        return {
            "usage": self.kv_cache_usage,
            "num_blocks": sum(s.num_blocks for s in snapshots),
            "block_size": snapshots[0].block_size if snapshots else 0,
            "free_blocks": sum(s.num_free_blocks for s in snapshots),
            "cached_free_blocks": sum(s.num_cached_free_blocks for s in snapshots),
            "used_blocks": sum(s.num_used_blocks for s in snapshots),
            "maps": [
                {
                    "engine": s.engine_index,
                    "num_blocks": s.num_blocks,
                    "blocks_per_cell": s.blocks_per_cell,
                    "block_map": s.block_map,
                }
                for s in snapshots
            ],
        }

    def _request(self, snapshot: EngineSnapshot, progress: Any, now: float) -> dict[str, Any]:
        first = self._first_token.get(progress.request_id)
        return {
            "id": progress.request_id,
            "engine": snapshot.engine_index,
            "status": progress.status,
            "prompt_tokens": progress.num_prompt_tokens,
            "computed_prompt_tokens": min(progress.num_computed_tokens, progress.num_prompt_tokens),
            "output_tokens": progress.num_output_tokens,
            "cached_tokens": progress.num_cached_tokens,
            "blocks": progress.num_blocks,
            "elapsed_s": now - progress.arrival_time,
            "ttft_s": None if first is None else first - progress.arrival_time,
        }
