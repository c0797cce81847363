"""Tests for the block pool: LRU free queue, reference counts and the prefix-cache hash table."""

from __future__ import annotations

import pytest

from pagoda.engine.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock


def _hash(i: int) -> bytes:
    return i.to_bytes(32, "little")


def _free_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_block_queue]


def test_free_queue_pops_least_recently_appended_first() -> None:
    blocks = [KVCacheBlock(block_id=i) for i in range(4)]
    queue = FreeBlockQueue(blocks)

    assert [queue.popleft().block_id for _ in range(4)] == [0, 1, 2, 3]
    assert queue.num_free_blocks == 0
    with pytest.raises(IndexError):
        queue.popleft()


def test_free_queue_removes_block_from_middle_by_relinking_neighbours() -> None:
    blocks = [KVCacheBlock(block_id=i) for i in range(5)]
    queue = FreeBlockQueue(blocks)

    queue.remove(blocks[2])

    # Only the removed block and its two neighbours are touched: that is what makes it O(1).
    assert blocks[1].next_free is blocks[3]
    assert blocks[3].prev_free is blocks[1]
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    assert [block.block_id for block in queue] == [0, 1, 3, 4]
    assert len(queue) == 4


def test_free_queue_refuses_to_remove_a_block_it_does_not_hold() -> None:
    queue = FreeBlockQueue([KVCacheBlock(block_id=0)])
    with pytest.raises(ValueError, match="not in the free queue"):
        queue.remove(KVCacheBlock(block_id=7))


def test_free_queue_append_n_keeps_given_order_at_tail() -> None:
    blocks = [KVCacheBlock(block_id=i) for i in range(4)]
    queue = FreeBlockQueue(blocks[:2])

    queue.append_n([blocks[3], blocks[2]])

    assert [block.block_id for block in queue] == [0, 1, 3, 2]


def test_new_blocks_come_from_the_head_with_one_reference() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)

    blocks = pool.get_new_blocks(3)

    assert [block.block_id for block in blocks] == [0, 1, 2]
    assert all(block.ref_cnt == 1 for block in blocks)
    assert pool.get_num_free_blocks() == 1


def test_get_new_blocks_raises_when_too_few_are_free() -> None:
    pool = BlockPool(num_blocks=2, enable_caching=True)
    with pytest.raises(ValueError, match="only 2 are free"):
        pool.get_new_blocks(3)
    assert pool.get_num_free_blocks() == 2


def test_least_recently_freed_block_is_reused_first() -> None:
    pool = BlockPool(num_blocks=3, enable_caching=True)
    a, b, c = pool.get_new_blocks(3)

    pool.free_blocks([b])
    pool.free_blocks([c, a])

    assert [block.block_id for block in pool.get_new_blocks(3)] == [
        b.block_id,
        c.block_id,
        a.block_id,
    ]


def test_freed_block_keeps_hash_until_reused() -> None:
    pool = BlockPool(num_blocks=2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_block(block, _hash(1), (1, 2))

    pool.free_blocks([block])

    assert block.ref_cnt == 0
    assert pool.get_cached_block(_hash(1)) is block
    assert block.token_ids == (1, 2)


def test_reusing_a_cached_block_evicts_its_hash() -> None:
    pool = BlockPool(num_blocks=1, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_block(block, _hash(1), (1, 2))
    pool.free_blocks([block])

    (reused,) = pool.get_new_blocks(1)

    assert reused is block
    assert pool.get_cached_block(_hash(1)) is None
    assert block.block_hash is None and block.token_ids is None


def test_touching_a_free_cached_block_takes_it_out_of_the_queue() -> None:
    pool = BlockPool(num_blocks=3, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_block(blocks[1], _hash(1), (1,))
    pool.free_blocks(blocks)

    hit = pool.get_cached_block(_hash(1))
    assert hit is blocks[1]
    pool.touch([hit])

    assert blocks[1].ref_cnt == 1
    assert _free_ids(pool) == [0, 2]
    assert pool.get_num_free_blocks() == 2


def test_shared_block_returns_to_queue_only_when_last_reference_drops() -> None:
    pool = BlockPool(num_blocks=2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])

    pool.free_blocks([block])
    assert block.ref_cnt == 1
    assert _free_ids(pool) == [1]

    pool.free_blocks([block])
    assert block.ref_cnt == 0
    assert _free_ids(pool) == [1, 0]


def test_duplicate_hash_keeps_the_first_cached_block() -> None:
    pool = BlockPool(num_blocks=2, enable_caching=True)
    first, second = pool.get_new_blocks(2)

    assert pool.cache_full_block(first, _hash(1), (1,))
    assert not pool.cache_full_block(second, _hash(1), (1,))

    assert pool.get_cached_block(_hash(1)) is first
    assert second.block_hash is None
    # Reusing the uncached duplicate must not evict the first block's entry.
    pool.free_blocks([second])
    pool.get_new_blocks(1)
    assert pool.get_cached_block(_hash(1)) is first


def test_pool_with_caching_disabled_never_caches() -> None:
    pool = BlockPool(num_blocks=1, enable_caching=False)
    (block,) = pool.get_new_blocks(1)

    assert not pool.cache_full_block(block, _hash(1), (1,))
    assert pool.get_cached_block(_hash(1)) is None


def test_usage_is_fraction_of_blocks_held() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    assert pool.get_usage() == 0.0

    blocks = pool.get_new_blocks(3)
    assert pool.get_usage() == 0.75

    pool.free_blocks(blocks)
    assert pool.get_usage() == 0.0


def test_reset_prefix_cache_is_refused_while_a_block_is_in_use() -> None:
    pool = BlockPool(num_blocks=2, enable_caching=True)
    first, second = pool.get_new_blocks(2)
    pool.cache_full_block(first, _hash(1), (1,))
    pool.free_blocks([first])

    assert not pool.reset_prefix_cache()
    assert pool.get_cached_block(_hash(1)) is first


def test_reset_prefix_cache_drops_every_hash_when_idle() -> None:
    pool = BlockPool(num_blocks=2, enable_caching=True)
    first, second = pool.get_new_blocks(2)
    pool.cache_full_block(first, _hash(1), (1,))
    pool.cache_full_block(second, _hash(2), (2,))
    pool.free_blocks([first, second])

    assert pool.reset_prefix_cache()

    assert pool.get_cached_block(_hash(1)) is None
    assert pool.get_cached_block(_hash(2)) is None
    assert first.block_hash is None and second.token_ids is None
    assert pool.get_num_free_blocks() == 2
