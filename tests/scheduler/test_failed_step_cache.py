"""A failed step leaves no prefix-cache entry whose KV it was to write (exact block ids)."""

from __future__ import annotations

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.request import Request
from pagedserve.scheduler.scheduler import Scheduler


def make(gpu: int = 16) -> Scheduler:
    return Scheduler(SchedulerConfig(watermark=0.0), CacheConfig(4, gpu, 0, True))


def add(s: Scheduler, request_id: str, prompt: list[int], max_tokens: int = 8) -> Request:
    request = Request(request_id, prompt, SamplingParams(max_tokens=max_tokens))
    s.add_request(request)
    return request


def test_a_failed_prefill_forgets_the_blocks_it_cached_and_keeps_older_entries():
    s = make()
    add(s, "old", [1, 2, 3, 4, 9, 9], max_tokens=1)
    first = s.schedule()
    assert first.cached_block_ids == [0]  # full and computed once the step runs
    s.update(first, {"old": 5})
    add(s, "a", [1, 2, 3, 4, 5, 6, 7, 8, 10, 11])
    failed = s.schedule()
    (item,) = failed.scheduled
    assert item.start_position == 4 and item.table_blocks == [0, 2, 3]  # block 0: a prefix hit
    assert failed.cached_block_ids == [2]
    s.forget_unwritten_blocks(failed)
    s.abort_request("a")
    assert s.kv.pool.block_hash[2] is None and s.kv.pool.block_hash[0] is not None
    again = add(s, "b", [1, 2, 3, 4, 5, 6, 7, 8, 10, 11])
    out = s.schedule()
    assert again.num_cached_tokens == 4  # block 0 only: block 2's KV was never written
    assert out.scheduled[0].start_position == 4


def test_a_block_filled_by_a_token_known_only_at_update_goes_with_the_next_step():
    # Overlapped: step 2 computes position 7 (a placeholder) before step 1's sample is known;
    # the update of step 1 then completes block 1, whose KV step 2 writes: if step 2 (in flight)
    # or step 3 fails, block 1 must leave the cache.
    s = make()
    add(s, "a", [1, 2, 3, 4, 5, 6, 7])
    step1 = s.schedule()
    step2 = s.schedule()
    assert step1.cached_block_ids == [0] and step2.cached_block_ids == []
    assert step2.scheduled[0].start_position == 7
    s.update(step1, {"a": 9})
    step3 = s.schedule()
    assert step3.cached_block_ids == [1]
    s.forget_unwritten_blocks(step2)
    s.forget_unwritten_blocks(step3)
    assert s.kv.pool.block_hash[1] is None and s.kv.pool.block_hash[0] is not None
