"""Exact values on the running requests' inline decode path (running.py) and the gated checks
of `Scheduler.update`: block ids, pool order, copy-on-write, caching, stop points."""

from __future__ import annotations

import pytest

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.block_pool import BlockPool
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.request import FinishReason, Request
from pagedserve.scheduler.scheduler import Scheduler


def decoding(num_gpu_blocks: int, prompts: dict[str, list[int]], max_tokens: int = 20,
             caching: bool = True) -> Scheduler:
    """A scheduler whose requests have been prefilled and now decode one token per step."""
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8,
                                          max_model_len=64, watermark=0.0),
                          CacheConfig(4, num_gpu_blocks, 0, caching))
    for arrival, (request_id, prompt) in enumerate(prompts.items()):
        scheduler.add_request(Request(request_id, prompt, SamplingParams(max_tokens=max_tokens),
                                      arrival_time=float(arrival)))
    out = scheduler.schedule()
    scheduler.update(out, {item.request_id: 9 for item in out.scheduled})
    return scheduler


def test_a_decode_that_starts_a_block_takes_the_next_free_block_in_pool_order():
    # "a" holds blocks 0, 1 (7 tokens + 1 sampled = 8: its table is full); "b" holds 2, 3.
    scheduler = decoding(6, {"a": [1, 2, 3, 4, 5, 6, 7], "b": [11, 12, 13, 14, 15, 16, 17]})
    assert scheduler.kv.block_tables == {"a": [0, 1], "b": [2, 3]}
    out = scheduler.schedule()
    assert [(i.request_id, i.token_ids, i.start_position, i.table_start, i.table_blocks,
             i.sample) for i in out.scheduled] == [
        ("a", [9], 7, 2, [], True), ("b", [9], 7, 2, [], True)]
    scheduler.update(out, {"a": 10, "b": 10})
    out = scheduler.schedule()  # both start their third block: 4 then 5
    assert [(i.request_id, i.token_ids, i.start_position, i.table_start, i.table_blocks)
            for i in out.scheduled] == [("a", [10], 8, 2, [4]), ("b", [10], 8, 2, [5])]
    assert scheduler.kv.block_tables == {"a": [0, 1, 4], "b": [2, 3, 5]}
    assert scheduler.kv.pool.free_block_ids() == []


def test_a_new_block_is_the_least_recently_freed_cached_one_once_plain_ones_are_gone():
    scheduler = decoding(7, {"old": [1, 2, 3, 4, 5, 6, 7, 8, 9]}, max_tokens=1)
    # "old" finished: its blocks went back last first, 2 (partial: plain), then 1, 0 (cached).
    assert scheduler.kv.pool.free_block_ids() == [3, 4, 5, 6, 2, 1, 0]
    scheduler.add_request(Request("a", [31, 32, 33, 34, 35, 36, 37],
                                  SamplingParams(max_tokens=20), arrival_time=5.0))
    out = scheduler.schedule()
    scheduler.update(out, {"a": 9})
    assert scheduler.kv.block_tables == {"a": [3, 4]}
    for token in (10, 11, 12):  # fill blocks 3, 4 and take plain 5, 6, 2 on the way
        out = scheduler.schedule()
        scheduler.update(out, {"a": token})
    pool = scheduler.kv.pool
    assert scheduler.kv.block_tables == {"a": [3, 4, 5]}
    for token in range(13, 21):
        out = scheduler.schedule()
        scheduler.update(out, {"a": token})
    assert scheduler.kv.block_tables["a"] == [3, 4, 5, 6, 2]
    assert pool.free_block_ids() == [1, 0] and pool.num_cached_free_blocks == 2


def test_a_decode_with_no_free_block_preempts_the_newest_as_the_general_path_does():
    scheduler = decoding(4, {"a": [1, 2, 3, 4, 5, 6, 7], "b": [11, 12, 13, 14, 15, 16, 17]})
    out = scheduler.schedule()
    scheduler.update(out, {"a": 10, "b": 10})
    out = scheduler.schedule()  # "a" needs a third block; none is free: "b" (newest) goes
    assert [i.request_id for i in out.scheduled] == ["a"]
    assert out.scheduled[0].table_blocks == [3] and out.scheduled[0].start_position == 8
    assert [r.request_id for r in scheduler.waiting] == ["b"]
    assert scheduler.num_preemptions == 1 and scheduler.requests["b"].num_computed_tokens == 0


def test_a_decode_into_a_shared_partial_block_copies_it_first():
    scheduler = decoding(8, {"p": [1, 2, 3, 4, 5]})  # 5 + 1 tokens: block 1 half full
    scheduler.fork_sequence("p", "p/b", [9])
    out = scheduler.schedule()
    assert [(i.request_id, i.start_position, i.table_start, i.table_blocks)
            for i in out.scheduled] == [("p", 5, 1, [2]), ("p/b", 5, 0, [0, 1])]
    assert out.blocks_to_copy == [(1, 2)]


@pytest.mark.parametrize("caching", [True, False])
def test_a_block_filled_by_a_decode_is_cached_in_the_same_step(caching):
    scheduler = decoding(8, {"a": [1, 2, 3, 4, 5, 6]}, caching=caching)  # 6 + 1 tokens
    out = scheduler.schedule()  # computes token 7 (the sampled 9): block 1 is full of known ids
    assert out.scheduled[0].start_position == 6
    assert scheduler.kv.num_hashed_blocks.get("a", 0) == (1 if caching else 0)
    scheduler.update(out, {"a": 9})
    out = scheduler.schedule()
    assert out.scheduled[0].start_position == 7
    assert scheduler.kv.num_hashed_blocks.get("a", 0) == (2 if caching else 0)
    assert (scheduler.kv.pool.block_hash[1] is not None) is caching


@pytest.mark.parametrize(("sampled", "params", "finish", "length"), [
    ([7, 7, 7], dict(min_tokens=2, stop_token_ids=[7]), FinishReason.STOP, 2),
    ([4, 4], dict(ignore_eos=True, max_tokens=2), FinishReason.LENGTH, 2),
    ([4], dict(), FinishReason.STOP, 1),
    ([8] * 10, dict(), FinishReason.LENGTH, 6),  # 10 prompt tokens, max_model_len 16
    ([8, 8, 8], dict(max_tokens=3), FinishReason.LENGTH, 3),
])
def test_update_stops_exactly_where_check_stop_says(sampled, params, finish, length):
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4,
                                          max_model_len=16, watermark=0.0),
                          CacheConfig(4, 8, 0, True))
    request = Request("r", list(range(10, 20)), SamplingParams(**params), eos_token_id=4)
    scheduler.add_request(request)
    for token in sampled:
        out = scheduler.schedule()
        if out.is_empty:
            break
        scheduler.update(out, {"r": token})
    assert request.finish_reason is finish and len(request.output_token_ids) == length
    assert "r" not in scheduler.requests and scheduler.kv.pool.num_free_blocks == 8


def test_a_block_filled_by_the_last_token_of_a_finished_overlapped_request_stays_cached():
    # Overlapped: the last sample is scheduled before the one before it is known, so the
    # block it completes is full of known ids only in update(), which indexes it there.
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4,
                                          max_model_len=32, watermark=0.0),
                          CacheConfig(4, 8, 0, True))
    scheduler.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=2), arrival_time=0))
    first = scheduler.schedule()  # the prompt, and sample 1
    second = scheduler.schedule()  # sample 2, fed sample 1's placeholder
    assert second.scheduled[0].token_ids == [-1] and second.scheduled[0].start_position == 3
    scheduler.update(first, {"a": 4})
    assert scheduler.schedule().is_empty  # both samples are pending: nothing more to run
    scheduler.update(second, {"a": 5})
    pool = scheduler.kv.pool
    assert "a" not in scheduler.requests and pool.block_hash[0] is not None
    assert pool.free_block_ids()[-1] == 0 and pool.num_cached_free_blocks == 1
    scheduler.add_request(Request("b", [1, 2, 3, 4, 9], SamplingParams(max_tokens=1),
                                  arrival_time=1))
    scheduler.schedule()
    assert scheduler.requests["b"].num_cached_tokens == 4


def test_allocate_one_takes_plain_then_lru_cached_and_none_when_empty():
    pool = BlockPool(3)
    assert [pool.allocate_one(), pool.allocate_one(), pool.allocate_one()] == [0, 1, 2]
    assert pool.allocate_one() is None and pool.ref_counts == [1, 1, 1]
    pool.cache(0, b"h0")
    pool.cache(2, b"h2")
    pool.free([2, 1, 0])
    assert pool.free_block_ids() == [1, 2, 0]
    assert pool.allocate_one() == 1  # plain first
    assert pool.allocate_one() == 2 and pool.lookup(b"h2") is None  # evicted from the index
    assert pool.lookup(b"h0") == 0 and pool.ref_counts == [0, 1, 1]
    pool.check_invariants()


@pytest.mark.parametrize(("max_tokens", "expected"), [(None, 6), (3, 3), (6, 6), (50, 6)])
def test_a_held_sequence_limits_its_outputs_to_max_tokens_or_the_context(max_tokens, expected):
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4,
                                          max_model_len=16, watermark=0.0),
                          CacheConfig(4, 16, 0, True))
    request = Request("r", list(range(10, 20)), SamplingParams(max_tokens=max_tokens, n=2))
    assert request.max_output_tokens > 1 << 40  # not held by a scheduler yet
    scheduler.add_request(request)
    assert request.max_output_tokens == expected
    out = scheduler.schedule()  # the shared prefill of all but the last prompt token
    scheduler.update(out, {})
    children = [scheduler.requests[f"r/{index}"] for index in range(2)]
    assert [child.max_output_tokens for child in children] == [expected, expected]
    beam = scheduler.fork_sequence("r/0", "r/0/beam")
    assert beam.max_output_tokens == expected
