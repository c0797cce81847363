"""Taking an `EngineSnapshot` (`pagoda.metrics.engine_state`) of a scheduler's requests and
KV blocks, for the server's live page; the engine core calls `take_snapshot` between steps."""

from __future__ import annotations

import time

from pagoda.engine.kv_cache_manager import KVCacheManager
from pagoda.engine.request import Request
from pagoda.engine.scheduler import Scheduler
from pagoda.metrics.engine_state import (
    CACHED,
    FREE,
    MAX_BLOCK_MAP_CELLS,
    PRECEDENCE,
    SHARED,
    USED,
    EngineSnapshot,
    RequestProgress,
    process_rss_bytes,
)


def take_snapshot(scheduler: Scheduler, engine_index: int = 0) -> EngineSnapshot:
    """The state of `scheduler`'s requests and KV blocks now."""
    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    states = []
    cached_free = used = 0
    for block in pool.blocks:
        if block.ref_cnt > 1:
            states.append(SHARED)
            used += 1
        elif block.ref_cnt == 1:
            states.append(USED)
            used += 1
        elif block.block_hash is not None:
            states.append(CACHED)
            cached_free += 1
        else:
            states.append(FREE)
    per_cell = max(1, -(-len(states) // MAX_BLOCK_MAP_CELLS))
    block_map = "".join(_fold(states, per_cell))
    requests = [_progress(r, "running", manager) for r in scheduler.running]
    requests += [
        _progress(r, "preempted" if r.num_preemptions else "waiting", manager)
        for r in scheduler.waiting
    ]
    return EngineSnapshot(
        timestamp=time.monotonic(),
        engine_index=engine_index,
        num_blocks=pool.num_blocks,
        block_size=manager.block_size,
        num_free_blocks=len(states) - used - cached_free,
        num_cached_free_blocks=cached_free,
        num_used_blocks=used,
        blocks_per_cell=per_cell,
        block_map=block_map,
        requests=requests,
        rss_bytes=process_rss_bytes(),
    )


def _fold(states: list[str], per_cell: int) -> list[str]:
    if per_cell == 1:
        return states
    return [
        max(states[start : start + per_cell], key=PRECEDENCE.__getitem__)
        for start in range(0, len(states), per_cell)
    ]


def _progress(request: Request, status: str, manager: KVCacheManager) -> RequestProgress:
    return RequestProgress(
        request_id=request.request_id,
        status=status,
        num_prompt_tokens=request.num_prompt_tokens,
        num_computed_tokens=request.num_computed_tokens,
        num_output_tokens=request.num_output_tokens,
        num_cached_tokens=max(request.num_cached_tokens, 0),
        num_blocks=len(manager.req_to_blocks.get(request.request_id, ())),
        arrival_time=request.arrival_time,
    )
