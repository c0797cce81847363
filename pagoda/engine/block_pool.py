"""Block pool: the physical KV-cache blocks, their free list and the prefix-cache hash table.

The KV cache manager asks the pool for blocks when a request grows and hands them back when it
finishes. A freed block keeps its hash and waits in an LRU free queue, so a later request with the
same prefix can still hit it; it loses the hash only when it is reused for other tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One block of `block_size` KV slots (in every layer), identified by `block_id`.

    `block_hash` and `token_ids` are set while the block is in the prefix cache; `token_ids` lets a
    hit be checked against hash collisions. `prev_free`/`next_free` link the block into the free
    queue and are both None while the block is out of it.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None
    # repr=False: printing a block must not walk the whole free list.
    prev_free: KVCacheBlock | None = field(default=None, repr=False)
    next_free: KVCacheBlock | None = field(default=None, repr=False)

    def reset_hash(self) -> None:
        self.block_hash = None
        self.token_ids = None


class FreeBlockQueue:
    """Doubly linked list of free blocks in LRU order: the head is evicted first.

    A plain deque cannot take a block out of the middle in O(1), which every prefix hit on a free
    block needs; the links live on the blocks themselves, so no node objects are allocated.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock] = ()) -> None:
        # Sentinels at both ends remove every empty-list special case from the link updates.
        self._head = KVCacheBlock(block_id=-1)
        self._tail = KVCacheBlock(block_id=-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        self.append_n(blocks)

    def popleft(self) -> KVCacheBlock:
        """Remove and return the least recently freed block; raises IndexError when empty."""
        block = self._head.next_free
        if block is None or block is self._tail:
            raise IndexError("popleft from an empty FreeBlockQueue")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink `block` from wherever it is in the queue, in O(1)."""
        prev_block, next_block = block.prev_free, block.next_free
        if prev_block is None or next_block is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev_block.next_free = next_block
        next_block.prev_free = prev_block
        block.prev_free = None
        block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Put `block` at the tail: it becomes the last candidate for eviction."""
        assert block.prev_free is None and block.next_free is None, "block is already free"
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def append_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Append blocks in the given order (the first one is evicted first)."""
        for block in blocks:
            self.append(block)

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free

    def __len__(self) -> int:
        return self.num_free_blocks


class BlockPool:
    """All `num_blocks` KV-cache blocks, their reference counts and the prefix-cache table.

    Invariants: a block is in the free queue iff its `ref_cnt` is 0; a block is in the hash table
    iff its `block_hash` is set, and then the table maps that hash to this very block.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(block_id=i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_block_hash_to_block: dict[bytes, KVCacheBlock] = {}

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take `num_blocks` blocks from the head of the free queue, each with ref_cnt 1.

        A taken block that was still cached is evicted from the prefix cache first, since its
        slots are about to be overwritten. Raises ValueError if fewer blocks are free.
        """
        if num_blocks > self.free_block_queue.num_free_blocks:
            raise ValueError(
                f"cannot allocate {num_blocks} blocks, only "
                f"{self.free_block_queue.num_free_blocks} are free"
            )
        new_blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            assert block.ref_cnt == 0, f"free block {block.block_id} has ref_cnt {block.ref_cnt}"
            self._evict(block)
            block.ref_cnt = 1
            new_blocks.append(block)
        return new_blocks

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached_block_hash_to_block.get(block.block_hash) is block:
            del self.cached_block_hash_to_block[block.block_hash]
        block.reset_hash()

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        """The block cached under `block_hash`, in use or free, or None."""
        return self.cached_block_hash_to_block.get(block_hash)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take one more reference to each block; a free block leaves the free queue (a hit)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference to each block; blocks reaching 0 join the free-queue tail in order.

        Freed blocks keep their hash, so a later request can still hit them until they are reused.
        """
        for block in ordered_blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed more often than taken"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue.append(block)

    def cache_full_block(
        self, block: KVCacheBlock, block_hash: bytes, token_ids: tuple[int, ...]
    ) -> bool:
        """Enter a full block into the prefix cache under `block_hash`; True if it was entered.

        NOTE: when another block already holds this hash (two requests filled the same prefix
        before either was cached, or a hash collision), the first one stays the cached copy and
        `block` stays uncached; it is then an ordinary private block, reclaimed without eviction.
        """
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self.cached_block_hash_to_block:
            return False
        block.block_hash = block_hash
        block.token_ids = token_ids
        self.cached_block_hash_to_block[block_hash] = block
        return True

    def get_num_free_blocks(self) -> int:
        """Blocks with no reference, cached or not: all of them can be handed out."""
        return self.free_block_queue.num_free_blocks

    def get_usage(self) -> float:
        """Fraction of blocks held by at least one request, in [0, 1]."""
        return 1.0 - self.free_block_queue.num_free_blocks / self.num_blocks

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (returns False) while any block is in use.

        The KV cache manager caches each block of a request once, when it fills; dropping the hash
        of a block still in use would silently take it out of the cache for good, so a reset
        only happens on an idle pool (e.g. after weights change, when every cached K/V is stale).
        """
        if self.free_block_queue.num_free_blocks != self.num_blocks:
            return False
        self.cached_block_hash_to_block.clear()
        for block in self.blocks:
            block.reset_hash()
        return True
