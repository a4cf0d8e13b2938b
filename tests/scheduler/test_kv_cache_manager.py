"""KVCacheManager directly: block tables, chained-hash prefix hits, fork + CoW, swapping."""

from __future__ import annotations

import pytest

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.kv_cache_manager import ROOT_HASH, KVCacheManager, hash_block
from pagedserve.scheduler.request import Request

PROMPT = list(range(100, 110))  # 10 tokens: blocks [100..103], [104..107], [108, 109]


def req(request_id, prompt, outputs=(), salt=None, computed=0, **params):
    r = Request(request_id, list(prompt), SamplingParams(**params), cache_salt=salt)
    r.output_token_ids.extend(outputs)
    r.num_computed_tokens = computed
    return r


def prefill(kv, r):
    update = kv.allocate_slots(r, r.num_tokens)
    r.num_computed_tokens = r.num_tokens
    kv.cache_computed_blocks(r)
    return update


def test_allocate_grows_table_by_whole_blocks_with_exact_updates():
    kv = KVCacheManager(4, 8, enable_prefix_caching=False)
    r = req("r", PROMPT)
    update = kv.allocate_slots(r, 10)
    assert (update.start, update.block_ids, update.copies) == (0, [0, 1, 2], [])
    r.num_computed_tokens = 10
    r.append_token(1)
    update = kv.allocate_slots(r, 1)  # position 10 lives in block 2
    assert (update.start, update.block_ids) == (3, [])
    r.num_computed_tokens = 11
    r.append_token(2)
    r.num_computed_tokens = 12
    r.append_token(3)
    update = kv.allocate_slots(r, 1)  # position 12 opens block 3
    assert (update.start, update.block_ids) == (3, [3])
    assert kv.block_tables == {"r": [0, 1, 2, 3]}
    kv.free("r")
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 3, 2, 1, 0]  # last block first
    kv.check_invariants()


def test_allocate_fails_without_change_and_respects_reserve():
    kv = KVCacheManager(4, 3)
    r = req("r", PROMPT)
    assert kv.blocks_needed(r, 10) == 3
    assert kv.allocate_slots(r, 10, reserve=1) is None
    assert "r" not in kv.block_tables and kv.num_free_blocks == 3
    assert kv.allocate_slots(r, 10).block_ids == [0, 1, 2]
    r.num_computed_tokens = 10
    for t in (1, 2, 3):
        r.append_token(t)
    assert kv.allocate_slots(r, 3) is None  # needs block 3, none free
    assert kv.block_tables["r"] == [0, 1, 2]
    kv.check_invariants()


def test_chained_hash_depends_on_parent_tokens_and_salt():
    first = hash_block(ROOT_HASH, [1, 2], None)
    assert first == hash_block(ROOT_HASH, [1, 2], None)
    assert first != hash_block(ROOT_HASH, [2, 1], None)
    assert first != hash_block(ROOT_HASH, [1, 2], "tenant")
    assert hash_block(first, [3, 4], None) != hash_block(ROOT_HASH, [3, 4], None)


def test_prefix_hits_reuse_exact_blocks_and_never_cover_last_token():
    kv = KVCacheManager(4, 8)
    a = req("a", PROMPT)
    assert prefill(kv, a).block_ids == [0, 1, 2]
    assert kv.pool.block_hash[0] is not None and kv.pool.block_hash[1] is not None
    assert kv.pool.block_hash[2] is None  # partial block is never indexed
    b = req("b", PROMPT[:8] + [7, 7, 7])
    assert kv.find_cached_prefix(b) == [0, 1]
    exact = req("c", PROMPT[:8])  # prompt ends on a block boundary: last block recomputed
    assert kv.find_cached_prefix(exact) == [0]
    nine = req("n", PROMPT[:9])
    assert kv.find_cached_prefix(nine) == [0, 1]
    other_head = req("o", [0] + PROMPT[1:])
    assert kv.find_cached_prefix(other_head) == []
    second_differs = req("s", PROMPT[:4] + [0] + PROMPT[5:])
    assert kv.find_cached_prefix(second_differs) == [0]
    salted = req("t", PROMPT, salt="tenant-b")
    assert kv.find_cached_prefix(salted) == []
    logprobs = req("l", PROMPT, prompt_logprobs=1)
    assert kv.find_cached_prefix(logprobs) == []


def test_prefix_hits_survive_free_and_are_shared_with_ref_counts():
    kv = KVCacheManager(4, 8)
    a = req("a", PROMPT)
    prefill(kv, a)
    kv.free("a")
    assert kv.pool.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert kv.pool.num_cached_free_blocks == 2
    b = req("b", PROMPT[:8] + [7])
    hits = kv.find_cached_prefix(b)
    assert hits == [0, 1]
    assert kv.blocks_needed(b, 1, hits) == 3  # two free cached hits + one new block
    update = kv.allocate_slots(b, 1, hits)
    assert (update.start, update.block_ids, update.copies) == (0, [0, 1, 3], [])
    assert kv.pool.ref_counts[:4] == [1, 1, 0, 1]
    c = req("c", PROMPT[:8] + [8])
    assert kv.blocks_needed(c, 1, [0, 1]) == 1  # hits in use cost nothing
    assert kv.allocate_slots(c, 1, [0, 1]).block_ids == [0, 1, 4]
    assert kv.pool.ref_counts[:5] == [2, 2, 0, 1, 1]
    kv.check_invariants()


def test_eviction_takes_prefix_tail_first():
    kv = KVCacheManager(4, 3)
    a = req("a", list(range(12)))
    prefill(kv, a)  # three full blocks, all cached
    kv.free("a")
    assert kv.pool.free_block_ids() == [2, 1, 0]
    b = req("b", [50] * 5)
    assert kv.allocate_slots(b, 5).block_ids == [2, 1]
    assert kv.find_cached_prefix(req("x", list(range(12)))) == [0]  # head survives


def test_caching_disabled_gives_no_hits():
    kv = KVCacheManager(4, 8, enable_prefix_caching=False)
    prefill(kv, req("a", PROMPT))
    kv.free("a")
    assert kv.find_cached_prefix(req("b", PROMPT)) == []
    assert kv.pool.num_cached_free_blocks == 0


def test_a_second_copy_of_a_prefix_still_hits_after_the_first_is_evicted():
    kv = KVCacheManager(4, 8)
    prefill(kv, req("a", PROMPT))
    prefill(kv, req("b", PROMPT))  # computed separately (no lookup): blocks 3, 4, 5
    assert kv.block_tables == {"a": [0, 1, 2], "b": [3, 4, 5]}
    assert kv.pool.block_hash[3:5] == kv.pool.block_hash[0:2]
    assert kv.find_cached_prefix(req("c", PROMPT)) == [0, 1]
    kv.free("a")
    assert kv.find_cached_prefix(req("c", PROMPT)) == [3, 4]  # in use: costs no free block
    kv.free("b")
    assert kv.pool.free_block_ids() == [6, 7, 2, 5, 1, 0, 4, 3]
    filler = req("filler", [50] * 24)
    assert kv.allocate_slots(filler, 24).block_ids == [6, 7, 2, 5, 1, 0]  # evicts a's copy
    c = req("c", PROMPT)
    assert kv.find_cached_prefix(c) == [3, 4]
    kv.free("filler")
    update = kv.allocate_slots(c, 2, [3, 4])
    assert (update.start, update.block_ids) == (0, [3, 4, 0])
    assert kv.pool.ref_counts == [1, 0, 0, 1, 1, 0, 0, 0]
    kv.check_invariants()


def test_cache_salt_keys_the_first_block_and_the_chain_carries_it():
    kv = KVCacheManager(4, 16)
    a = req("a", PROMPT, salt="tenant-a")
    prefill(kv, a)
    first = hash_block(ROOT_HASH, PROMPT[:4], "tenant-a")
    assert a.block_hashes == [first, hash_block(first, PROMPT[4:8], None)]
    same = req("same", PROMPT, salt="tenant-a")
    hits = kv.find_cached_prefix(same)
    assert hits == [0, 1]
    assert kv.allocate_slots(same, 2, hits).block_ids == [0, 1, 3]
    other = req("other", PROMPT, salt="tenant-b")
    assert kv.find_cached_prefix(other) == []
    assert prefill(kv, other).block_ids == [4, 5, 6]
    unsalted = req("unsalted", PROMPT)
    assert kv.find_cached_prefix(unsalted) == []
    assert prefill(kv, unsalted).block_ids == [7, 8, 9]
    assert kv.pool.ref_counts[:10] == [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    kv.check_invariants()


def test_fork_shares_blocks_and_copy_on_write_copies_partial_block_once_per_writer():
    kv = KVCacheManager(4, 8)
    parent = req("p", PROMPT[:7])
    assert kv.allocate_slots(parent, 6).block_ids == [0, 1]
    parent.num_computed_tokens = 6
    assert kv.fork("p", "c0") == [0, 1]
    assert kv.fork("p", "c1") == [0, 1]
    assert kv.pool.ref_counts[:2] == [3, 3]
    kv.free("p")
    assert kv.pool.ref_counts[:2] == [2, 2]
    c0 = req("c0", PROMPT[:7], computed=6)
    c1 = req("c1", PROMPT[:7], computed=6)
    assert kv.blocks_needed(c0, 1) == 1  # the copy
    update = kv.allocate_slots(c0, 1)
    assert (update.start, update.block_ids, update.copies) == (1, [2], [(1, 2)])
    assert kv.block_tables["c0"] == [0, 2]
    assert kv.pool.ref_counts[:3] == [2, 1, 1]
    assert kv.blocks_needed(c1, 1) == 0  # sole owner now: writes in place
    update = kv.allocate_slots(c1, 1)
    assert (update.start, update.block_ids, update.copies) == (2, [], [])
    assert kv.block_tables["c1"] == [0, 1]
    kv.check_invariants()
    kv.free("c0")
    kv.free("c1")
    assert kv.num_free_blocks == 8
    kv.check_invariants()


def test_copy_on_write_and_new_block_in_one_call():
    kv = KVCacheManager(4, 8, enable_prefix_caching=False)
    parent = req("p", [1, 2, 3, 4, 5, 6])
    kv.allocate_slots(parent, 6)
    kv.fork("p", "c")
    child = req("c", [1, 2, 3, 4, 5, 6], outputs=[7, 8, 9], computed=6)
    assert kv.blocks_needed(child, 3) == 2  # copy of block 1 plus block for position 8
    update = kv.allocate_slots(child, 3)
    assert (update.start, update.block_ids, update.copies) == (1, [2, 3], [(1, 2)])
    kv.check_invariants()


def test_no_copy_on_write_at_block_boundary():
    kv = KVCacheManager(4, 8)
    parent = req("p", list(range(9)))
    kv.allocate_slots(parent, 8)
    kv.fork("p", "c")
    child = req("c", list(range(9)), computed=8)
    update = kv.allocate_slots(child, 1)
    assert (update.start, update.block_ids, update.copies) == (2, [2], [])


def test_fork_into_existing_table_is_an_error():
    kv = KVCacheManager(4, 8)
    kv.allocate_slots(req("p", [1, 2]), 2)
    kv.fork("p", "c")
    with pytest.raises(ValueError, match="'c' already has a block table"):
        kv.fork("p", "c")
    kv.check_invariants()


def test_swap_out_and_in_exact_pairs():
    kv = KVCacheManager(4, 4, num_cpu_blocks=3, enable_prefix_caching=False)
    a = req("a", [1, 2, 3, 4, 5, 6])
    assert kv.allocate_slots(a, 6).block_ids == [0, 1]
    assert kv.can_swap_out(["a"])
    assert kv.swap_out(["a"]) == [(0, 0), (1, 1)]
    assert "a" not in kv.block_tables and kv.cpu_block_tables == {"a": [0, 1]}
    assert kv.pool.free_block_ids() == [2, 3, 1, 0]
    b = req("b", [9] * 10)
    kv.allocate_slots(b, 10)  # takes 2, 3, 1
    assert kv.block_tables["b"] == [2, 3, 1]
    assert kv.swap_in(["a"]) is None  # one free block, two needed
    assert kv.cpu_block_tables == {"a": [0, 1]}
    assert not kv.can_swap_out(["b"])  # three blocks, CPU has one free
    kv.free("b")
    assert kv.swap_in(["a"], reserve=3) is None
    assert kv.swap_in(["a"]) == [(0, 0), (1, 1)]
    assert kv.block_tables["a"] == [0, 1] and kv.cpu_block_tables == {}
    assert kv.cpu_pool.num_free_blocks == 3
    kv.check_invariants()


def test_free_returns_cpu_blocks_of_swapped_request():
    kv = KVCacheManager(4, 4, num_cpu_blocks=4)
    kv.allocate_slots(req("a", [1, 2, 3, 4, 5]), 5)
    kv.swap_out(["a"])
    kv.free("a")
    assert kv.cpu_pool.num_free_blocks == 4 and kv.num_free_blocks == 4
    kv.check_invariants()


def test_no_cpu_pool_means_no_swap():
    kv = KVCacheManager(4, 4)
    kv.allocate_slots(req("a", [1]), 1)
    assert kv.cpu_pool is None and not kv.can_swap_out(["a"])


def test_check_invariants_detects_corruption():
    kv = KVCacheManager(4, 4)
    kv.allocate_slots(req("a", [1, 2, 3, 4, 5]), 5)
    kv.pool.ref_counts[0] = 2
    with pytest.raises(AssertionError, match="ref counts differ"):
        kv.check_invariants()
    kv.pool.ref_counts[0] = 1
    kv.pool._free_plain.append(0)
    with pytest.raises(AssertionError, match="free lists differ"):
        kv.check_invariants()
