"""Abort in every state returns every block: the free count goes back to its start."""

from __future__ import annotations

import pytest

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.request import FinishReason, Request, RequestStatus
from pagedserve.scheduler.scheduler import Scheduler

GPU, CPU = 6, 8


def make(mode="recompute", caching=True, **sched) -> Scheduler:
    sched.setdefault("watermark", 0.0)
    return Scheduler(SchedulerConfig(preemption_mode=mode, **sched),
                     CacheConfig(block_size=4, num_gpu_blocks=GPU,
                                 num_cpu_blocks=CPU if mode == "swap" else 0,
                                 enable_prefix_caching=caching))


def add(s, rid, prompt, t=0.0, **params) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**params), arrival_time=t)
    s.add_request(r)
    return r


def step(s, token=1):
    out = s.schedule()
    s.update(out, {i.request_id: token for i in out.scheduled if i.sample})
    s.kv.check_invariants()
    return out


def assert_all_returned(s: Scheduler, *requests: Request) -> None:
    for r in requests:
        assert r.status is RequestStatus.FINISHED and r.finish_reason is FinishReason.ABORT
        assert r.request_id not in s.requests
    assert s.kv.num_free_blocks == GPU
    assert s.kv.block_tables == {} and s.kv.cpu_block_tables == {}
    if s.kv.cpu_pool is not None:
        assert s.kv.cpu_pool.num_free_blocks == CPU
    s.kv.check_invariants()
    assert not s.has_unfinished()
    assert s.running == [] and len(s.waiting) == 0 and len(s.swapped) == 0


def test_abort_waiting():
    s = make()
    r = add(s, "r", [1, 2, 3])
    s.abort_request("r")
    assert_all_returned(s, r)
    assert s.schedule().forgotten_request_ids == []  # workers never saw it


def test_abort_running_mid_prefill():
    s = make(max_num_batched_tokens=4)
    r = add(s, "r", list(range(10)))
    out = step(s)
    assert out.scheduled[0].num_tokens == 4 and r.num_computed_tokens == 4
    assert s.kv.num_free_blocks == GPU - 1
    s.abort_request("r")
    assert_all_returned(s, r)
    assert s.schedule().forgotten_request_ids == ["r"]


def test_abort_running_decode():
    s = make()
    r = add(s, "r", list(range(10)), max_tokens=10)
    step(s)
    step(s)
    assert r.status is RequestStatus.RUNNING and r.num_output_tokens == 2
    s.abort_request("r")
    assert_all_returned(s, r)


def preempt_second(mode):
    s = make(mode, caching=False)
    a = add(s, "a", list(range(12)), t=0, max_tokens=20)
    b = add(s, "b", list(range(50, 62)), t=1, max_tokens=20)
    step(s)  # a: 3 blocks, b: 3 blocks, pool full
    step(s)  # a needs a fourth block: b is preempted
    return s, a, b


def test_abort_preempted():
    s, a, b = preempt_second("recompute")
    assert b.status is RequestStatus.PREEMPTED
    s.abort_request("b")
    s.abort_request("a")
    assert_all_returned(s, a, b)


def test_abort_swapped():
    s, a, b = preempt_second("swap")
    assert b.status is RequestStatus.SWAPPED and s.kv.cpu_pool.num_free_blocks == CPU - 3
    s.abort_request("b")
    assert s.kv.cpu_pool.num_free_blocks == CPU
    s.abort_request("a")
    assert_all_returned(s, a, b)


def test_abort_fork_parent_before_fork():
    s = make(max_num_batched_tokens=4)
    p = add(s, "p", list(range(10)), n=3)
    step(s)
    assert p.status is RequestStatus.RUNNING and s.children == {"p": []}
    s.abort_request("p")
    assert_all_returned(s, p)
    assert "p" not in s.children and not s._fork_pending
    add(s, "p", [1, 2])  # the id is free again


def test_abort_forked_children_one_then_all():
    s = make()
    add(s, "p", list(range(7)), n=3, max_tokens=10)
    step(s)
    step(s)
    kids = [s.requests[f"p/{i}"] for i in range(3)]
    s.abort_request("p/1")
    assert kids[1].finish_reason is FinishReason.ABORT
    assert s.kv.pool.ref_counts[0] == 2  # the other two still share the first block
    s.kv.check_invariants()
    s.abort_request("p")
    assert_all_returned(s, *kids)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_abort_between_schedule_and_update(mode):
    s = make(mode)
    a = add(s, "a", list(range(9)), max_tokens=5)
    b = add(s, "b", list(range(20, 29)), max_tokens=5)
    out = s.schedule()
    s.abort_request("a")
    s.kv.check_invariants()
    emitted = s.update(out, {"a": 1, "b": 2})
    assert emitted == [b] and a.output_token_ids == []
    assert s.schedule().forgotten_request_ids == ["a"]
    s.abort_request("b")
    assert_all_returned(s, a, b)


def test_abort_unknown_and_twice_is_harmless():
    s = make()
    r = add(s, "r", [1, 2, 3])
    step(s)
    s.abort_request("r")
    s.abort_request("r")
    s.abort_request("nope")
    assert_all_returned(s, r)


def test_abort_everything_midway_with_shared_prefixes():
    s = make(max_num_batched_tokens=6)
    reqs = [add(s, f"r{i}", [7, 7, 7, 7, 8, 8, 8, 8, i], t=i, max_tokens=4) for i in range(3)]
    reqs.append(add(s, "n", [7, 7, 7, 7, 9], t=5, n=2, max_tokens=4))
    for _ in range(4):
        step(s)
    for r in reqs:
        s.abort_request(r.request_id)
    assert s.kv.num_free_blocks == GPU and not s.has_unfinished()
    s.kv.check_invariants()


def test_paused_request_skips_steps_keeps_blocks_and_aborts_cleanly():
    s = make()
    a = add(s, "a", range(1, 6), max_tokens=10)
    b = add(s, "b", range(1, 4), max_tokens=10, t=1.0)
    step(s)
    s.pause("a")
    out = step(s)
    assert [item.request_id for item in out.scheduled] == ["b"]
    assert s.kv.block_tables["a"] == [0, 1]
    s.resume_paused()
    out = step(s)
    assert [item.request_id for item in out.scheduled] == ["b", "a"]
    s.pause("a")
    s.abort_request("a")
    s.abort_request("b")
    assert s.paused == {}
    assert_all_returned(s, a, b)


def test_requeue_after_lost_ranks_resets_the_prefix_cache_a_plain_reset_must_refuse():
    s = make()
    a = add(s, "a", range(1, 10), max_tokens=5)
    step(s)  # blocks 0 and 1 are full: cached, and in use by a
    assert s.kv.pool.reset_prefix_cache() is False
    assert [h is not None for h in s.kv.pool.block_hash] == [True, True, False, False, False,
                                                           False]
    s.requeue_all_for_recompute()  # frees every block first, so the reset goes through
    assert s.kv.pool.block_hash == [None] * GPU and s.kv.num_free_blocks == GPU
    assert a.status is RequestStatus.PREEMPTED and list(s.waiting) == [a]
    out = step(s)
    assert [(i.start_position, i.num_tokens) for i in out.scheduled] == [(0, 10)]
    assert a.num_cached_tokens == 0 and s.prefix_cache_hits == 0
