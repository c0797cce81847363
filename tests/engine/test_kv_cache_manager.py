"""Tests for the KV cache manager: block allocation, prefix hits, sharing, eviction and stats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from pagoda.engine import kv_cache_utils
from pagoda.engine.kv_cache_manager import KVCacheManager
from pagoda.engine.kv_cache_utils import hash_block_tokens, update_block_hashes
from pagoda.engine.request import Request
from pagoda.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, prompt_token_ids: list[int]) -> Request:
    return Request(request_id, prompt_token_ids, SamplingParams(), eos_token_id=None)


def admit(manager: KVCacheManager, request: Request) -> int:
    """Admit like the scheduler does: look up the prefix, allocate the rest, compute it."""
    computed_blocks, num_computed_tokens = manager.get_computed_blocks(request)
    num_new_tokens = request.num_tokens - num_computed_tokens
    new_blocks = manager.allocate_slots(
        request, num_new_tokens, computed_blocks, num_computed_tokens
    )
    assert new_blocks is not None
    request.num_computed_tokens = request.num_tokens
    return num_computed_tokens


def test_update_block_hashes_chains_only_full_blocks() -> None:
    request = make_request("a", list(range(10)))

    update_block_hashes(request, BLOCK_SIZE)

    first = hash_block_tokens(None, [0, 1, 2, 3])
    second = hash_block_tokens(first, [4, 5, 6, 7])
    assert request.block_hashes == [first, second]
    assert len(first) == 32


def test_unsupported_hash_algo_names_the_setting() -> None:
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        hash_block_tokens(None, [1], hash_algo="md5")
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE, hash_algo="md5")


def test_first_request_misses_and_gets_enough_blocks() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(10)))

    assert manager.get_computed_blocks(request) == ([], 0)
    new_blocks = manager.allocate_slots(request, 10)

    assert new_blocks is not None and len(new_blocks) == 3
    assert manager.get_block_ids("a") == [0, 1, 2]
    assert manager.num_free_blocks == 5


def test_prefix_hit_reuses_blocks_and_skips_compute() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(10))))
    request = make_request("b", list(range(8)) + [50, 51, 52])

    num_hit_tokens = admit(manager, request)

    assert num_hit_tokens == 8
    assert manager.get_block_ids("b")[:2] == manager.get_block_ids("a")[:2]
    assert manager.get_block_ids("b")[2] not in manager.get_block_ids("a")


def test_shared_prefix_blocks_are_reference_counted() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    a, b = make_request("a", list(range(9))), make_request("b", list(range(9)))
    admit(manager, a)
    admit(manager, b)
    shared = manager.req_to_blocks["a"][:2]
    assert [block.ref_cnt for block in shared] == [2, 2]

    manager.free(a)
    assert [block.ref_cnt for block in shared] == [1, 1]
    manager.free(b)
    assert [block.ref_cnt for block in shared] == [0, 0]
    assert manager.num_free_blocks == 8


def test_hit_is_capped_to_leave_one_token_to_compute() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(8))))

    blocks, num_hit_tokens = manager.get_computed_blocks(make_request("b", list(range(8))))

    assert num_hit_tokens == 4 and len(blocks) == 1


def test_partial_block_is_never_hashed_or_shared() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(6)))
    admit(manager, a)
    assert len(a.block_hashes) == 1
    assert manager.req_to_blocks["a"][1].block_hash is None

    b = make_request("b", list(range(6)) + [9])
    assert admit(manager, b) == 4
    assert manager.get_block_ids("b")[1] != manager.get_block_ids("a")[1]


def test_same_block_tokens_after_a_different_prefix_do_not_hit() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", [0, 1, 2, 3, 4, 5, 6, 7, 8]))

    num_hit_tokens = admit(manager, make_request("b", [9, 9, 9, 9, 4, 5, 6, 7, 8]))

    assert num_hit_tokens == 0


def test_hash_collision_with_different_tokens_is_not_a_hit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def colliding_hash(
        parent: bytes | None, tokens: Sequence[int], extra: Any = None, algo: str = "sha256"
    ) -> bytes:
        return b"\x00" * 32

    monkeypatch.setattr(kv_cache_utils, "hash_block_tokens", colliding_hash)
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", [0, 1, 2, 3, 4]))
    b = make_request("b", [5, 6, 7, 8, 9])

    blocks, num_hit_tokens = manager.get_computed_blocks(b)

    assert b.block_hashes[0] == manager.req_to_blocks["a"][0].block_hash  # the collision
    assert (blocks, num_hit_tokens) == ([], 0)


def test_allocate_slots_returns_none_without_side_effects_when_out_of_blocks() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(9)))
    admit(manager, a)  # holds 3 blocks, 2 of them cached
    manager.free(a)  # all 4 free; the 2 cached ones can still be hit
    big = make_request("big", list(range(8)) + list(range(100, 109)))  # 17 tokens: 5 blocks
    blocks, num_hit_tokens = manager.get_computed_blocks(big)
    assert num_hit_tokens == 8
    free_order = [block.block_id for block in manager.block_pool.free_block_queue]

    result = manager.allocate_slots(big, big.num_tokens - 8, blocks, num_hit_tokens)

    assert result is None
    assert manager.get_block_ids("big") == []
    assert [block.ref_cnt for block in blocks] == [0, 0]
    assert [block.block_id for block in manager.block_pool.free_block_queue] == free_order
    assert manager.block_pool.get_cached_block(a.block_hashes[0]) is blocks[0]


def test_hit_on_a_free_block_costs_a_free_block() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(5)))
    admit(manager, a)
    manager.free(a)
    b = make_request("b", list(range(4)) + [7] * 8)  # 12 tokens: 1 hit block + 2 new blocks
    blocks, num_hit_tokens = manager.get_computed_blocks(b)

    assert manager.allocate_slots(b, 8, blocks, num_hit_tokens) is not None
    assert manager.num_free_blocks == 0
    assert manager.req_to_blocks["b"][0] is blocks[0]
    assert blocks[0].block_hash == a.block_hashes[0]


def test_free_releases_the_tail_of_a_sequence_first() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(12)))
    admit(manager, a)
    block_ids = manager.get_block_ids("a")

    manager.free(a)

    assert [block.block_id for block in manager.block_pool.free_block_queue] == block_ids[::-1]
    assert manager.get_block_ids("a") == []


def test_free_of_an_unknown_request_is_a_no_op() -> None:
    manager = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    manager.free(make_request("ghost", [1, 2]))
    assert manager.num_free_blocks == 2


def test_freed_prefix_is_hit_until_its_blocks_are_reused() -> None:
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    a, b = make_request("a", list(range(9))), make_request("b", list(range(9)))
    admit(manager, a)
    manager.free(a)
    assert admit(manager, b) == 8
    manager.free(b)

    # 12 fresh tokens take all 3 blocks, evicting the cached prefix.
    admit(manager, make_request("c", list(range(100, 112))))

    assert manager.get_computed_blocks(make_request("d", list(range(9)))) == ([], 0)


def test_block_is_cached_when_decoding_fills_it() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", [0, 1, 2])
    admit(manager, a)
    assert manager.req_to_blocks["a"][0].block_hash is None

    a.append_output_token_ids([3])
    assert manager.allocate_slots(a, 1) == []
    a.num_computed_tokens += 1

    assert manager.req_to_blocks["a"][0].token_ids == (0, 1, 2, 3)
    assert admit(manager, make_request("b", [0, 1, 2, 3, 4])) == 4


def test_sample_admitted_in_the_same_step_shares_uncomputed_prompt_blocks() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first, second = make_request("s0", list(range(9))), make_request("s1", list(range(9)))
    blocks, _ = manager.get_computed_blocks(first)
    manager.allocate_slots(first, 9, blocks, 0)  # not computed yet: num_computed_tokens is 0

    blocks, num_hit_tokens = manager.get_computed_blocks(second)

    assert num_hit_tokens == 8
    assert [block.block_id for block in blocks] == manager.get_block_ids("s0")[:2]


def test_prefix_cache_stats_count_queries_and_hits() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", list(range(10))))
    admit(manager, make_request("b", list(range(10))))

    stats = manager.make_prefix_cache_stats()

    assert (stats.requests, stats.queries, stats.hits) == (2, 20, 8)
    assert stats.hit_rate == 0.4
    assert manager.make_prefix_cache_stats().queries == 0
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (20, 8)
    assert manager.prefix_cache_hit_rate == 0.4


def test_usage_tracks_blocks_held_by_requests() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(5)))
    admit(manager, a)
    assert manager.usage == 0.5
    manager.free(a)
    assert manager.usage == 0.0


def test_reset_prefix_cache_is_refused_while_a_request_runs() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", list(range(5)))
    admit(manager, a)
    assert not manager.reset_prefix_cache()

    manager.free(a)
    assert manager.reset_prefix_cache()
    assert manager.get_computed_blocks(make_request("b", list(range(5)))) == ([], 0)


def test_caching_disabled_never_hits() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_caching=False)
    a = make_request("a", list(range(9)))
    admit(manager, a)

    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert all(block.block_hash is None for block in manager.req_to_blocks["a"])
