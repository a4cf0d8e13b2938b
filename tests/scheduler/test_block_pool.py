"""BlockPool: exact allocation order (plain FIFO from ascending ids, then cached LRU)."""

from __future__ import annotations

import pytest

from pagedserve.scheduler.block_pool import BlockPool, NoFreeBlocksError


def h(i: int) -> bytes:
    return f"hash-{i}".encode()


def test_new_pool_allocates_ascending():
    pool = BlockPool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.ref_counts == [1, 1, 1, 1, 1, 0, 0, 0]
    assert pool.free_block_ids() == [5, 6, 7]
    assert pool.num_free_blocks == 3
    assert pool.usage() == pytest.approx(5 / 8)


def test_plain_blocks_are_reused_fifo_in_free_order():
    pool = BlockPool(8)
    pool.allocate(5)
    pool.free([2, 0])
    assert pool.free_block_ids() == [5, 6, 7, 2, 0]
    assert pool.allocate(4) == [5, 6, 7, 2]
    assert pool.allocate(1) == [0]
    assert pool.num_free_blocks == 0


def test_plain_blocks_before_cached_then_cached_lru():
    pool = BlockPool(4)
    assert pool.allocate(4) == [0, 1, 2, 3]
    for block in (0, 1, 2):
        pool.cache(block, h(block))
    pool.free(reversed([0, 1, 2, 3]))  # a request frees last block first
    assert pool.free_block_ids() == [3, 2, 1, 0]
    assert pool.num_cached_free_blocks == 3
    assert pool.allocate(1) == [3]  # plain first, although it was freed first
    assert pool.allocate(1) == [2]  # then the least recently freed cached block: the tail
    assert pool.lookup(h(2)) is None and pool.block_hash[2] is None
    assert pool.lookup(h(1)) == 1 and pool.lookup(h(0)) == 0
    assert pool.allocate(2) == [1, 0]
    assert pool.lookup(h(0)) is None and pool.lookup(h(1)) is None


def test_freed_plain_after_cached_still_goes_first():
    pool = BlockPool(3)
    pool.allocate(3)
    pool.cache(0, h(0))
    pool.free([0])
    pool.free([1])
    assert pool.free_block_ids() == [1, 0]
    assert pool.allocate(2) == [1, 0]


def test_share_revives_a_free_cached_block_and_refreeing_moves_it_to_lru_end():
    pool = BlockPool(3)
    pool.allocate(3)
    pool.cache(0, h(0))
    pool.cache(1, h(1))
    pool.free([0, 1])
    assert pool.free_block_ids() == [0, 1]
    pool.share([0])
    assert pool.ref_counts[0] == 1 and pool.free_block_ids() == [1]
    pool.share([0])
    assert pool.ref_counts[0] == 2
    pool.free([0, 0])
    assert pool.free_block_ids() == [1, 0]  # 0 is now the most recently freed
    assert pool.allocate(1) == [1]


def test_share_a_plain_free_block_is_an_error():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="block 1 is free"):
        pool.share([1])


def test_free_more_than_referenced_is_an_error():
    pool = BlockPool(2)
    pool.allocate(1)
    pool.free([0])
    with pytest.raises(RuntimeError, match="block 0 freed more often"):
        pool.free([0])
    assert pool.ref_counts == [0, 0]
    assert pool.free_block_ids() == [1, 0]


def test_allocate_too_many_changes_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocksError, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    assert pool.free_block_ids() == [2]
    assert pool.allocate(0) == []


def test_every_copy_of_a_prefix_is_indexed_and_disabled_caching_is_a_no_op():
    pool = BlockPool(3)
    pool.allocate(3)
    pool.cache(0, h(9))
    pool.cache(1, h(9))  # same prefix computed twice
    assert pool.block_hash[:2] == [h(9), h(9)] and pool.lookup(h(9)) == 0
    pool.cache(0, h(8))  # already hashed: keeps its first hash
    assert pool.block_hash[0] == h(9) and pool.lookup(h(8)) is None
    pool.check_invariants()
    off = BlockPool(2, enable_caching=False)
    off.allocate(1)
    off.cache(0, h(1))
    assert off.lookup(h(1)) is None and off.block_hash == [None, None]


def test_evicting_one_copy_leaves_the_other_findable_and_lookup_prefers_one_in_use():
    pool = BlockPool(3)
    pool.allocate(3)
    pool.cache(0, h(9))
    pool.cache(1, h(9))
    pool.free([0])
    assert pool.lookup(h(9)) == 1  # in use: sharing it takes no free block
    pool.free([1])
    assert pool.lookup(h(9)) == 0  # both free: the first cached
    assert pool.free_block_ids() == [0, 1] and pool.num_cached_free_blocks == 2
    assert pool.allocate(1) == [0]  # LRU eviction of one copy
    assert pool.lookup(h(9)) == 1 and pool.block_hash[:2] == [None, h(9)]
    pool.check_invariants()
    pool.share([1])
    assert pool.ref_counts == [1, 1, 1] and pool.free_block_ids() == []
    pool.uncache(1)
    assert pool.lookup(h(9)) is None and pool.block_hash == [None, None, None]
    pool.check_invariants()


def test_uncache_free_cached_block_becomes_plain_at_the_end():
    pool = BlockPool(3)
    pool.allocate(3)
    pool.cache(1, h(1))
    pool.free([1, 0])
    assert pool.free_block_ids() == [0, 1]  # plain 0, cached 1
    pool.uncache(1)
    pool.free([2])
    assert pool.free_block_ids() == [0, 1, 2]
    assert pool.lookup(h(1)) is None and pool.num_cached_free_blocks == 0
    pool.uncache(1)  # nothing to forget: no-op


def test_uncache_of_a_used_block_leaves_free_lists_alone():
    pool = BlockPool(2)
    pool.allocate(1)
    pool.cache(0, h(0))
    pool.uncache(0)
    assert pool.free_block_ids() == [1]
    pool.free([0])
    assert pool.free_block_ids() == [1, 0] and pool.num_cached_free_blocks == 0


def test_reset_prefix_cache_is_refused_while_a_cached_block_is_in_use():
    pool = BlockPool(5)
    pool.allocate(5)
    for block in (0, 1, 2, 3):
        pool.cache(block, h(block))
    pool.free([4, 2, 1, 0])  # block 3 stays in use, cached
    assert pool.reset_prefix_cache() is False
    assert pool.free_block_ids() == [4, 2, 1, 0] and pool.num_cached_free_blocks == 3
    assert pool.block_hash == [h(0), h(1), h(2), h(3), None]
    assert [pool.lookup(h(i)) for i in range(4)] == [0, 1, 2, 3]
    pool.check_invariants()


def test_reset_prefix_cache_turns_cached_blocks_plain_in_lru_order():
    """The docstring promises LRU order: least recently freed cached block first."""
    pool = BlockPool(5)
    pool.allocate(5)
    for block in (0, 1, 2, 3):
        pool.cache(block, h(block))  # index order 0, 1, 2, 3
    pool.free([4, 2, 1, 3, 0])  # LRU order of the cached free blocks: 2, 1, 3, 0
    assert pool.free_block_ids() == [4, 2, 1, 3, 0]
    assert pool.reset_prefix_cache() is True
    assert pool.free_block_ids() == [4, 2, 1, 3, 0]
    assert pool.num_cached_free_blocks == 0
    assert pool.block_hash == [None] * 5
    assert pool.lookup(h(3)) is None
    assert pool.allocate(5) == [4, 2, 1, 3, 0]
    pool.check_invariants()


def test_check_invariants_detects_a_corrupt_index():
    pool = BlockPool(3)
    pool.allocate(2)
    pool.cache(0, h(0))
    pool.cache(1, h(0))
    pool.check_invariants()
    pool.block_hash[1] = h(1)
    with pytest.raises(AssertionError, match="index differs from the blocks' hashes"):
        pool.check_invariants()
    pool.block_hash[1] = h(0)
    pool.free([1])
    pool._free_cached.popitem()
    pool._free_plain.append(1)
    with pytest.raises(AssertionError, match="plain free list holds a hashed"):
        pool.check_invariants()


def test_pool_needs_a_block():
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        BlockPool(0)
