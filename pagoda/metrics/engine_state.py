"""Snapshots of the engine core's state for the live page and the JSON stats stream.

The core attaches an `EngineSnapshot` to its step stats a few times a second (and whenever it
falls idle, so the last one seen never shows requests that have finished): which requests it
holds and how far each has got, and the state of every KV block. `pagoda.engine.snapshot` takes
them from the scheduler; the API side (`pagoda.metrics.live`) keeps the latest one per engine and
adds the rates it measures itself. Everything here is plain data that msgspec carries across the
process boundary (a leaf module: the step stats import it, and it imports no engine module).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# The block map has at most this many cells; a larger cache folds consecutive blocks into one
# cell, which shows the busiest state among them.
MAX_BLOCK_MAP_CELLS = 8192
# One character per cell, in rising order of precedence when blocks are folded together.
FREE, CACHED, USED, SHARED = ".", "c", "u", "s"
PRECEDENCE = {FREE: 0, CACHED: 1, USED: 2, SHARED: 3}


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


def process_rss_bytes() -> int:
    """This process's resident memory in bytes (0 where /proc is not there to say)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
