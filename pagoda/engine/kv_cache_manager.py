"""KV cache manager: which blocks each request holds, and prefix-cache hits on admission.

The scheduler owns one manager. On admission it asks `get_computed_blocks` for the cached prefix
of a request, then `allocate_slots` for room to compute the rest (chunk by chunk, then one token
per decode step), and `free` when the request finishes or is preempted. The model runner only
ever sees the resulting block ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.engine.block_pool import BlockPool, KVCacheBlock
from pagoda.engine.kv_cache_utils import check_hash_algo, update_block_hashes
from pagoda.engine.request import Request


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups over an interval: requests looked up, tokens queried, tokens hit."""

    requests: int = 0
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    """Allocates blocks to requests from one `BlockPool` and finds their cached prefixes.

    `hash_algo` is the `prefix_caching_hash_algo` setting; raises ValueError if unsupported.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        hash_algo: str = "sha256",
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        check_hash_algo(hash_algo)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.hash_algo = hash_algo
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request have been offered to the cache, so each step
        # only looks at the blocks that filled since the last one.
        self.num_cached_blocks: dict[str, int] = {}
        self._stats = PrefixCacheStats()
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        """Fraction of KV-cache blocks in use, in [0, 1]."""
        return self.block_pool.get_usage()

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Lifetime fraction of queried prompt tokens served from the prefix cache."""
        if not self.prefix_cache_queries:
            return 0.0
        return self.prefix_cache_hits / self.prefix_cache_queries

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of leading full blocks of `request` found in the cache.

        Returns the blocks (not yet referenced: pass them to `allocate_slots`) and the number of
        tokens they hold. The hit never covers the last token: the forward pass must compute at
        least one position to produce logits for the next token.
        """
        if not self.enable_caching:
            return [], 0
        update_block_hashes(request, self.block_size, self.hash_algo)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        token_ids = request.all_token_ids
        computed_blocks: list[KVCacheBlock] = []
        for block_index, block_hash in enumerate(request.block_hashes[:max_hit_blocks]):
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            start = block_index * self.block_size
            # Collision guard: a hash match alone is not proof; the stored tokens must match too.
            if block.token_ids != tuple(token_ids[start : start + self.block_size]):
                break
            computed_blocks.append(block)
        num_computed_tokens = len(computed_blocks) * self.block_size
        self._record_lookup(request.num_tokens, num_computed_tokens)
        return computed_blocks, num_computed_tokens

    def _record_lookup(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self._stats.requests += 1
        self._stats.queries += num_queried_tokens
        self._stats.hits += num_hit_tokens
        self.prefix_cache_queries += num_queried_tokens
        self.prefix_cache_hits += num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
        num_new_computed_tokens: int = 0,
        num_lookahead_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Make `request` hold enough blocks for its computed, newly hit and new tokens, and
        `num_lookahead_tokens` slots after them (a draft model's own K/V for its drafts, which
        are never cached: only blocks full of the request's tokens are).

        `new_computed_blocks`/`num_new_computed_tokens` are a prefix hit from
        `get_computed_blocks`. Returns the newly allocated blocks (not the hit ones), or None,
        with nothing changed, when the pool has too few free blocks.
        """
        computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.get(request.request_id, [])
        num_total_tokens = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_required_blocks = -(-(num_total_tokens + num_lookahead_tokens) // self.block_size)
        num_new_blocks = max(0, num_required_blocks - len(req_blocks) - len(computed_blocks))
        # A hit block with no reference sits in the free queue; touching it takes it out, so it
        # costs a free block just like a new one.
        num_free_hits = sum(1 for block in computed_blocks if block.ref_cnt == 0)
        if num_new_blocks + num_free_hits > self.block_pool.get_num_free_blocks():
            return None

        # Touch the hits before taking new blocks, so the pool cannot hand them out (evicting
        # the very prefix we just matched).
        self.block_pool.touch(computed_blocks)
        req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
        req_blocks.extend(computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks) if num_new_blocks else []
        req_blocks.extend(new_blocks)

        if self.enable_caching:
            # NOTE: blocks are cached as soon as they are allocated, before the forward pass has
            # written their K/V. This is safe because within each layer the attention backend
            # writes all new K/V of the step before any request attends, so a request admitted
            # later in the same step may already share them; this is how the n > 1 samples of
            # one prompt share its blocks.
            self._cache_full_blocks(request, req_blocks, num_total_tokens)
        return new_blocks

    def _cache_full_blocks(
        self, request: Request, req_blocks: list[KVCacheBlock], num_total_tokens: int
    ) -> None:
        update_block_hashes(request, self.block_size, self.hash_algo)
        # Tokens past num_tokens (e.g. lookahead slots) are not known yet, so cannot be hashed.
        num_full_blocks = min(num_total_tokens, request.num_tokens) // self.block_size
        num_cached = self.num_cached_blocks.get(request.request_id, 0)
        token_ids = request.all_token_ids
        for block_index in range(num_cached, num_full_blocks):
            block = req_blocks[block_index]
            if block.block_hash is not None:  # a prefix hit, already in the cache
                continue
            start = block_index * self.block_size
            self.block_pool.cache_full_block(
                block,
                request.block_hashes[block_index],
                tuple(token_ids[start : start + self.block_size]),
            )
        self.num_cached_blocks[request.request_id] = max(num_cached, num_full_blocks)

    def free(self, request: Request) -> None:
        """Release all blocks of `request`; a no-op for a request that holds none.

        Blocks are released tail first, so the end of a sequence is evicted before its prefix,
        which other requests are more likely to share.
        """
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks is not None:
            self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        """The block table of a request (empty for an unknown id)."""
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; returns False (and does nothing) while any block is in use."""
        return self.block_pool.reset_prefix_cache()

    def make_prefix_cache_stats(self) -> PrefixCacheStats:
        """Prefix-cache lookups since the previous call; the counters then start again at zero."""
        stats, self._stats = self._stats, PrefixCacheStats()
        return stats
