"""Snapshots of the engine core's state for the live page and the JSON stats stream.

The core attaches an `EngineSnapshot` to its step stats a few times a second (and whenever it
falls idle, so the last one seen never shows requests that have finished): which requests it
holds and how far each has got, and the state of every KV block. The API side
(`pagoda.metrics.live`) keeps the latest one per engine and adds the rates it measures itself.
Everything here is plain data that msgspec carries across the process boundary.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagoda.engine.kv_cache_manager import KVCacheManager
    from pagoda.engine.request import Request
    from pagoda.engine.scheduler import Scheduler

# The block map has at most this many cells; a larger cache folds consecutive blocks into one
# cell, which shows the busiest state among them.
MAX_BLOCK_MAP_CELLS = 8192
# One character per cell, in rising order of precedence when blocks are folded together.
FREE, CACHED, USED, SHARED = ".", "c", "u", "s"
_PRECEDENCE = {FREE: 0, CACHED: 1, USED: 2, SHARED: 3}


@dataclass(slots=True)
class RequestProgress:
    """How far one request held by the core has got. `status` is "running", "waiting" or
    "preempted" (waiting again after losing its blocks); `arrival_time` is on the monotonic
    clock, which every process of the machine shares."""

    request_id: str
    status: str
    num_prompt_tokens: int
    num_computed_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_blocks: int
    arrival_time: float


@dataclass(slots=True)
class EngineSnapshot:
    """One engine core's state between two steps.

    `block_map` has one character per block (or per group of blocks when there are more than
    `MAX_BLOCK_MAP_CELLS`, `blocks_per_cell` each): "." free, "c" free but holding a cached
    prefix that a new request can reuse, "u" in use by one request, "s" shared by several (a
    prefix hit). `rss_bytes` is the core process's resident memory.
    """

    timestamp: float = 0.0
    engine_index: int = 0
    num_blocks: int = 0
    block_size: int = 0
    num_free_blocks: int = 0
    num_cached_free_blocks: int = 0
    num_used_blocks: int = 0
    blocks_per_cell: int = 1
    block_map: str = ""
    requests: list[RequestProgress] = field(default_factory=list)
    rss_bytes: int = 0


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
        max(states[start : start + per_cell], key=_PRECEDENCE.__getitem__)
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


def process_rss_bytes() -> int:
    """This process's resident memory in bytes (0 where /proc is not there to say)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
