"""Scheduler: exact step outputs for prefix hits, fork + CoW, swap and recompute preemption,
policies, budgets, admission and stop conditions."""

from __future__ import annotations

import pytest
from sched_harness import Spec, expected_outputs, run_workload

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.policies import admit_if_chunk_fits
from pagedserve.scheduler.request import FinishReason, Request, RequestStatus
from pagedserve.scheduler.scheduler import Scheduler


def make(block_size=4, gpu=16, cpu=0, caching=True, **sched) -> Scheduler:
    sched.setdefault("watermark", 0.0)
    return Scheduler(SchedulerConfig(**sched), CacheConfig(block_size, gpu, cpu, caching))


def add(s: Scheduler, rid: str, prompt, t: float = 0.0, eos=None, priority=0, salt=None,
        **params) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**params), eos_token_id=eos, arrival_time=t,
                priority=priority, cache_salt=salt)
    s.add_request(r)
    return r


def step(s: Scheduler, token: int = 1):
    out = s.schedule()
    s.kv.check_invariants()
    s.update(out, {item.request_id: token for item in out.scheduled if item.sample})
    s.kv.check_invariants()
    return out


def brief(out):
    return [(i.request_id, i.start_position, i.table_start, i.table_blocks, i.sample)
            for i in out.scheduled]


P10 = list(range(100, 110))


# ---- prefix caching through the scheduler ---------------------------------------------------


def test_prefix_hit_across_requests_reuses_exact_blocks():
    s = make(gpu=16)
    a = add(s, "a", P10, max_tokens=1)
    out = step(s, token=50)
    assert brief(out) == [("a", 0, 0, [0, 1, 2], True)]
    assert a.finish_reason is FinishReason.LENGTH and a.num_cached_tokens == 0
    assert s.kv.pool.free_block_ids()[-3:] == [2, 1, 0]
    assert s.kv.pool.num_cached_free_blocks == 2  # blocks 0, 1 (full and computed)

    b = add(s, "b", P10[:8] + [77, 78, 79], max_tokens=1)
    out = step(s)
    assert b.num_cached_tokens == 8
    (item,) = out.scheduled
    assert item.token_ids == [77, 78, 79] and item.start_position == 8
    assert (item.table_start, item.table_blocks) == (0, [0, 1, 3])
    assert out.num_batched_tokens == 3

    c = add(s, "c", P10[:8], max_tokens=1)  # prompt ends on a block boundary
    out = step(s)
    assert c.num_cached_tokens == 4
    (item,) = out.scheduled
    assert item.token_ids == P10[4:8] and item.start_position == 4
    assert item.table_blocks[0] == 0 and len(item.table_blocks) == 2
    assert item.table_blocks[1] != 1  # the hit never covers the last token

    d = add(s, "d", P10, salt="tenant-b", max_tokens=1)
    out = step(s)
    assert d.num_cached_tokens == 0 and out.scheduled[0].start_position == 0
    assert 0 not in out.scheduled[0].table_blocks and 1 not in out.scheduled[0].table_blocks
    assert s.kv.num_free_blocks == 16


def test_prefix_hit_while_first_request_still_runs_shares_blocks():
    s = make(gpu=16)
    add(s, "a", P10[:8], max_tokens=5)
    step(s)  # a computed 8 tokens: blocks 0, 1 cached at update
    b = add(s, "b", P10[:8] + [1, 2], max_tokens=5)
    out = step(s)
    assert brief(out) == [("a", 8, 2, [2], True), ("b", 8, 0, [0, 1, 3], True)]
    assert b.num_cached_tokens == 8
    assert s.kv.pool.ref_counts[:4] == [2, 2, 1, 1]


def test_prefix_caching_off_records_zero_cached_tokens():
    s = make(gpu=16, caching=False)
    add(s, "a", P10, max_tokens=1)
    step(s)
    b = add(s, "b", P10, max_tokens=1)
    out = step(s)
    assert b.num_cached_tokens == 0 and out.scheduled[0].num_tokens == 10


def test_recompute_after_preemption_hits_own_cached_prefix():
    s = make(gpu=4)
    add(s, "a", list(range(8)), t=0, max_tokens=20)
    b = add(s, "b", list(range(50, 57)), t=1, max_tokens=20)
    step(s)  # a: [0, 1]; b: [2, 3]
    assert (s.kv.block_tables["a"], s.kv.block_tables["b"]) == ([0, 1], [2, 3])
    step(s)  # a: position 8 needs a block -> b (newest) preempted
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_cached_tokens == 0 and b.num_preemptions == 1
    s.abort_request("a")
    out = step(s)
    # b's first block (tokens 50..53) is still cached; 8 tokens now, last one recomputed.
    (item,) = out.scheduled
    assert item.request_id == "b" and item.start_position == 4
    assert item.table_blocks[0] == 2
    assert b.num_cached_tokens == 0  # recorded once, at first scheduling


# ---- parallel sampling: fork + copy-on-write -------------------------------------------------


def test_parallel_sampling_forks_after_prefill_of_all_but_last_token():
    s = make(gpu=16)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    add(s, "p", prompt, n=3, seed=10, max_tokens=3)
    out = step(s)
    assert brief(out) == [("p", 0, 0, [0, 1], False)]
    assert out.scheduled[0].token_ids == prompt[:6]
    assert "p" not in s.requests
    assert s.children == {"p": ["p/0", "p/1", "p/2"]}
    assert [r.request_id for r in s.running] == ["p/0", "p/1", "p/2"]
    assert all(s.kv.block_tables[f"p/{i}"] == [0, 1] for i in range(3))
    assert s.kv.pool.ref_counts[:3] == [3, 3, 0]
    assert [s.requests[f"p/{i}"].sampling_params.seed for i in range(3)] == [10, 11, 12]
    assert all(s.requests[f"p/{i}"].sampling_params.n == 1 for i in range(3))

    out = s.schedule()
    assert out.forgotten_request_ids == ["p"]
    assert out.blocks_to_copy == [(1, 2), (1, 3)]
    assert brief(out) == [("p/0", 6, 0, [0, 2], True),
                          ("p/1", 6, 0, [0, 3], True),
                          ("p/2", 6, 0, [0, 1], True)]
    assert all(item.token_ids == [11] for item in out.scheduled)
    assert [item.new_request.sampling_params.seed for item in out.scheduled] == [10, 11, 12]
    assert s.kv.pool.ref_counts[:4] == [3, 1, 1, 1]
    s.update(out, {"p/0": 1, "p/1": 2, "p/2": 3})

    out = step(s)
    assert brief(out) == [("p/0", 7, 2, [], True), ("p/1", 7, 2, [], True),
                          ("p/2", 7, 2, [], True)]
    assert out.blocks_to_copy == []
    out = step(s)
    assert brief(out) == [("p/0", 8, 2, [4], True), ("p/1", 8, 2, [5], True),
                          ("p/2", 8, 2, [6], True)]
    assert not s.has_unfinished()
    assert s.kv.num_free_blocks == 16


def test_parallel_sampling_prefix_fully_cached_forks_without_computing():
    s = make(gpu=16)
    add(s, "a", list(range(9)), max_tokens=1)
    step(s)  # caches blocks 0 and 1
    add(s, "p", list(range(9)), n=2, seed=0, max_tokens=1)
    out = step(s)
    assert out.scheduled == []  # all 8 tokens before the last one were cached
    assert s.children == {"p": ["p/0", "p/1"]}
    assert [s.requests[c].num_cached_tokens for c in ("p/0", "p/1")] == [8, 8]
    assert s.kv.pool.ref_counts[:2] == [2, 2]
    out = step(s)
    assert out.blocks_to_copy == []  # block boundary: each child gets its own new block
    assert [(i.request_id, i.start_position, i.table_blocks, i.token_ids)
            for i in out.scheduled] == [("p/0", 8, [0, 1, 3], [8]), ("p/1", 8, [0, 1, 4], [8])]


def test_parallel_sampling_single_token_prompt_forks_at_once():
    s = make(gpu=16)
    add(s, "p", [42], n=2, seed=3, max_tokens=1)
    assert [r.request_id for r in s.running] == ["p/0", "p/1"]
    out = step(s)
    assert brief(out) == [("p/0", 0, 0, [0], True), ("p/1", 0, 0, [1], True)]
    assert not s.has_unfinished() and s.kv.num_free_blocks == 16


def test_fork_sequence_for_beam_search():
    s = make(gpu=16)
    add(s, "a", [1, 2, 3, 4, 5], max_tokens=10)
    step(s, token=7)  # a: [1..5] computed, output [7]
    child = s.fork_sequence("a", "a.1", [8])
    assert child.parent_id == "a" and child.num_computed_tokens == 5
    assert s.kv.block_tables["a.1"] == [0, 1]
    with pytest.raises(ValueError, match="'a.1' is already in use"):
        s.fork_sequence("a", "a.1", [8])
    with pytest.raises(ValueError, match="must extend"):
        s.fork_sequence("a", "a.2", [])
    out = s.schedule()
    # The parent runs first: it copies the shared partial block, the child then owns block 1.
    assert out.blocks_to_copy == [(1, 2)]
    assert [(i.request_id, i.token_ids, i.start_position, i.table_start, i.table_blocks)
            for i in out.scheduled] == [("a", [7], 5, 1, [2]), ("a.1", [8], 5, 0, [0, 1])]
    assert s.kv.pool.ref_counts[:3] == [2, 1, 1]


# ---- preemption: swap and recompute -----------------------------------------------------------


def two_requests(mode: str):
    cpu = 8 if mode == "swap" else 0
    s = make(gpu=4, cpu=cpu, caching=False, preemption_mode=mode)
    a = add(s, "A", [1, 2, 3, 4, 5, 6], t=0, max_tokens=4)
    b = add(s, "B", [11, 12, 13, 14, 15, 16], t=1, max_tokens=10)
    assert brief(step(s, 21)) == [("A", 0, 0, [0, 1], True),
                                  ("B", 0, 0, [2, 3], True)]
    assert brief(step(s, 22)) == [("A", 6, 2, [], True), ("B", 6, 2, [], True)]
    assert brief(step(s, 23)) == [("A", 7, 2, [], True), ("B", 7, 2, [], True)]
    return s, a, b


def test_swap_round_trip_exact_pairs_and_kept_progress():
    s, a, b = two_requests("swap")
    out = s.schedule()  # A needs block 3 for position 8: B (newest) is swapped out
    assert out.blocks_to_swap_out == [(2, 0), (3, 1)]
    assert out.forgotten_request_ids == ["B"]
    assert brief(out) == [("A", 8, 2, [3], True)]
    assert b.status is RequestStatus.SWAPPED and b.num_computed_tokens == 8
    assert s.kv.cpu_block_tables == {"B": [0, 1]} and list(s.swapped) == [b]
    assert b.num_preemptions == 1 and s.num_preemptions == 1
    s.update(out, {"A": 24})
    assert a.finish_reason is FinishReason.LENGTH and a.output_token_ids == [21, 22, 23, 24]

    out = s.schedule()
    assert out.blocks_to_swap_in == [(0, 2), (1, 3)]
    assert out.forgotten_request_ids == ["A"]
    assert brief(out) == [("B", 8, 0, [2, 3, 1], True)]
    assert out.scheduled[0].token_ids == [23]
    assert out.scheduled[0].new_request.output_token_ids == [21, 22, 23]
    assert b.status is RequestStatus.RUNNING and b.num_computed_tokens == 9
    assert s.kv.cpu_pool.num_free_blocks == 8
    s.update(out, {"B": 30})
    s.kv.check_invariants()
    s.abort_request("B")
    assert s.kv.num_free_blocks == 4


def test_recompute_preemption_exact_outputs():
    s, a, b = two_requests("recompute")
    out = s.schedule()
    assert out.blocks_to_swap_out == []
    assert out.forgotten_request_ids == ["B"]
    assert brief(out) == [("A", 8, 2, [3], True)]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert list(s.waiting) == [b]
    s.update(out, {"A": 24})
    out = s.schedule()
    assert brief(out) == [("B", 0, 0, [2, 3, 1], True)]
    assert out.scheduled[0].token_ids == [11, 12, 13, 14, 15, 16, 21, 22, 23]


def test_swap_falls_back_to_recompute_when_cpu_pool_is_too_small():
    s = make(gpu=4, cpu=1, caching=False, preemption_mode="swap")
    add(s, "A", [1, 2, 3, 4, 5, 6], t=0, max_tokens=4)
    b = add(s, "B", [11, 12, 13, 14, 15, 16], t=1, max_tokens=10)
    for _ in range(3):
        step(s)
    out = step(s)
    assert out.blocks_to_swap_out == [] and b.status is RequestStatus.PREEMPTED


def test_swap_config_needs_cpu_blocks():
    with pytest.raises(ValueError, match="num_cpu_blocks >= 1"):
        make(preemption_mode="swap", cpu=0)


def test_victim_is_newest_not_yet_scheduled_request():
    s = make(gpu=5, caching=False)
    for rid, t in (("X", 1), ("Y", 2), ("Z", 4), ("W", 3)):
        add(s, rid, [1, 2, 3, 4], t=t, max_tokens=5)
    step(s)
    assert {r: s.kv.block_tables[r] for r in "XYZW"} == {"X": [0], "Y": [1], "Z": [2], "W": [3]}
    out = s.schedule()
    # X takes the last free block; Y needs one: Z (arrived last) is the victim; then W has no
    # room and is the only candidate left, so it preempts itself.
    assert brief(out) == [("X", 4, 1, [4], True), ("Y", 4, 1, [2], True)]
    assert out.forgotten_request_ids == ["Z", "W"]
    assert [r.request_id for r in s.waiting] == ["W", "Z"]
    assert s.num_preemptions == 2


def test_priority_victim_is_lowest_priority():
    s = make(gpu=4, caching=False, policy="priority")
    add(s, "hi", [1, 2, 3, 4], t=1, priority=0, max_tokens=5)
    add(s, "lo", [1, 2, 3, 4], t=0, priority=5, max_tokens=5)
    add(s, "mid", [1, 2, 3, 4], t=2, priority=1, max_tokens=5)
    out = step(s)
    assert [i.request_id for i in out.scheduled] == ["hi", "mid", "lo"]
    out = s.schedule()  # hi takes block 3; mid needs one: lo is the victim
    assert [i.request_id for i in out.scheduled] == ["hi", "mid"]
    assert out.forgotten_request_ids == ["lo"]


def test_request_outgrowing_whole_cache_finishes_with_length():
    s = make(gpu=2, caching=False, max_model_len=64)
    r = add(s, "r", [1, 2, 3, 4, 5, 6, 7], max_tokens=None)
    step(s)
    out = step(s)  # 8 tokens fill both blocks
    assert out.scheduled[0].start_position == 7
    out = s.schedule()  # position 8 needs a third block that can never exist
    assert out.scheduled == [] and r.finish_reason is FinishReason.LENGTH
    assert r.output_token_ids == [1, 1] and s.kv.num_free_blocks == 2


def test_watermark_does_not_starve_a_request_alone_in_the_pool():
    """A prompt that fits the empty pool but not pool minus watermark must still run."""
    s = make(gpu=8, watermark=0.5, max_model_len=64)
    r = add(s, "r", list(range(20)), max_tokens=2)
    for _ in range(10):
        if not s.has_unfinished():
            break
        step(s)
    assert r.finish_reason is FinishReason.LENGTH and r.output_token_ids == [1, 1]
    assert s.kv.num_free_blocks == 8


def test_watermark_still_applies_when_others_run():
    s = make(gpu=10, watermark=0.3)  # three blocks kept free while something runs
    add(s, "a", [1, 2, 3, 4], max_tokens=20)
    step(s)
    b = add(s, "b", list(range(21)), max_tokens=2)  # 6 blocks + 3 > 8 free
    out = step(s)
    assert [i.request_id for i in out.scheduled] == ["a"] and b.status is RequestStatus.WAITING


def test_swapped_single_child_with_empty_table_does_not_crash():
    """Children of a one-token prompt start with empty tables; swapping one out must work."""
    specs = [Spec("A", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=3, seed=1)),
             Spec("P", [9], SamplingParams(n=2, max_tokens=3, seed=2), arrival_step=1)]
    sched = SchedulerConfig(max_model_len=12, preemption_mode="swap", watermark=0.0)
    cache = CacheConfig(block_size=4, num_gpu_blocks=3, num_cpu_blocks=8)
    # Step 1: A decodes in block 1, P/0 takes block 2, P/1 finds nothing free and, being the
    # newest candidate, is swapped out although it holds no block yet.
    result = run_workload(specs, sched, cache)
    assert result.outputs == expected_outputs(specs, 12)
    assert result.num_preemptions > 0


# ---- queue order, budgets, admission ---------------------------------------------------------


def test_fcfs_order_is_arrival_order_regardless_of_priority():
    s = make()
    for rid, prio in (("a", 2), ("b", 0), ("c", 1), ("d", 0)):
        add(s, rid, [1, 2], priority=prio)
    assert [i.request_id for i in step(s).scheduled] == ["a", "b", "c", "d"]


def test_priority_order_then_arrival():
    s = make(policy="priority")
    for rid, prio, t in (("a", 2, 0), ("b", 0, 3), ("c", 1, 1), ("d", 0, 2)):
        add(s, rid, [1, 2], t=t, priority=prio)
    assert [r.request_id for r in s.waiting] == ["d", "b", "c", "a"]
    assert [i.request_id for i in step(s).scheduled] == ["d", "b", "c", "a"]


def test_token_budget_chunks_prefill_and_is_respected():
    s = make(max_num_batched_tokens=10)
    add(s, "a", [1] * 6, max_tokens=5)
    add(s, "b", [2] * 6, max_tokens=5)
    out = step(s)
    assert [(i.request_id, i.num_tokens, i.sample) for i in out.scheduled] == [
        ("a", 6, True), ("b", 4, False)]
    assert out.num_batched_tokens == 10
    out = step(s)
    assert [(i.request_id, i.start_position, i.num_tokens, i.sample) for i in out.scheduled] == [
        ("a", 6, 1, True), ("b", 4, 2, True)]
    assert out.num_batched_tokens == 3


def test_max_num_seqs_caps_requests_per_step():
    s = make(max_num_seqs=2)
    for rid in "abc":
        add(s, rid, [1, 2, 3], max_tokens=2)
    assert [i.request_id for i in step(s).scheduled] == ["a", "b"]
    assert [i.request_id for i in step(s).scheduled] == ["a", "b"]  # a, b finish here
    assert [i.request_id for i in step(s).scheduled] == ["c"]


def test_long_prefill_token_threshold_caps_prefill_chunks_not_decodes():
    s = make(long_prefill_token_threshold=4)
    add(s, "d", [1], max_tokens=10)
    step(s)
    add(s, "long", list(range(10)), max_tokens=1)
    sizes = [[(i.request_id, i.num_tokens) for i in step(s).scheduled] for _ in range(3)]
    assert sizes == [[("d", 1), ("long", 4)], [("d", 1), ("long", 4)], [("d", 1), ("long", 2)]]


def test_long_prefill_token_threshold_does_not_split_prompts_without_chunked_prefill():
    s = make(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False,
             long_prefill_token_threshold=4)
    add(s, "a", [1] * 10, max_tokens=3)
    assert [(i.request_id, i.num_tokens) for i in step(s).scheduled] == [("a", 10)]


def test_no_chunked_prefill_waits_for_whole_prompt_budget():
    s = make(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    add(s, "a", [1] * 10, max_tokens=3)
    add(s, "b", [2] * 10, max_tokens=3)
    assert [(i.request_id, i.num_tokens) for i in step(s).scheduled] == [("a", 10)]
    assert [(i.request_id, i.num_tokens) for i in step(s).scheduled] == [("a", 1), ("b", 10)]


def test_admission_needs_whole_prompt_to_fit():
    s = make(gpu=8, max_num_batched_tokens=16)
    add(s, "a", [1] * 13, max_tokens=10)
    step(s)  # a holds 4 blocks
    long = add(s, "long", list(range(20)), max_tokens=1)  # needs 5 blocks, 4 free
    short = add(s, "short", [3, 3], max_tokens=1)
    out = step(s)
    assert [i.request_id for i in out.scheduled] == ["a"]
    assert long.status is RequestStatus.WAITING and short.status is RequestStatus.WAITING
    assert s.kv.num_free_blocks == 4


def test_chunk_admission_policy_admits_first_chunk():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16, watermark=0.0),
                  CacheConfig(block_size=4, num_gpu_blocks=8),
                  admission_policy=admit_if_chunk_fits)
    add(s, "a", [1] * 13, max_tokens=10)
    step(s)
    add(s, "long", list(range(20)), max_tokens=1)
    out = step(s)
    assert [(i.request_id, i.num_tokens) for i in out.scheduled] == [("a", 1), ("long", 15)]


def test_add_request_validation():
    s = make(gpu=2, max_model_len=16)
    with pytest.raises(ValueError, match="must be shorter than max_model_len"):
        add(s, "x", [1] * 16)
    with pytest.raises(ValueError, match="more than the whole KV cache"):
        add(s, "x", [1] * 9)
    add(s, "x", [1] * 8)
    with pytest.raises(ValueError, match="'x' is already in use"):
        add(s, "x", [1])
    with pytest.raises(ValueError, match="must not be empty"):
        add(s, "y", [])


# ---- stop conditions ---------------------------------------------------------------------------


def generate(tokens, prompt=(1, 2, 3), eos=None, max_model_len=64, **params):
    s = make(max_model_len=max_model_len)
    r = add(s, "r", prompt, eos=eos, **params)
    for token in tokens:
        step(s, token)
        if r.status is RequestStatus.FINISHED:
            break
    assert s.kv.num_free_blocks == 16
    return r.output_token_ids, r.finish_reason, r.stop_reason


@pytest.mark.parametrize(("tokens", "kwargs", "expected"), [
    ([5, 2, 9], dict(eos=2), ([5, 2], FinishReason.STOP, None)),
    ([5, 7, 2], dict(eos=2, stop_token_ids=[7]), ([5, 7], FinishReason.STOP, 7)),
    ([5, 6, 8, 9], dict(max_tokens=3), ([5, 6, 8], FinishReason.LENGTH, None)),
    ([5, 6, 2], dict(eos=2, max_tokens=3), ([5, 6, 2], FinishReason.STOP, None)),
    ([2, 2, 5, 2, 9], dict(eos=2, min_tokens=3), ([2, 2, 5, 2], FinishReason.STOP, None)),
    ([2, 2, 2, 9], dict(eos=2, min_tokens=3), ([2, 2, 2], FinishReason.STOP, None)),
    ([5, 2], dict(eos=2, stop_token_ids=[2]), ([5, 2], FinishReason.STOP, 2)),
    ([7, 7], dict(stop_token_ids=[7], min_tokens=2), ([7, 7], FinishReason.STOP, 7)),
    ([2, 2, 2, 2], dict(eos=2, ignore_eos=True, max_tokens=3),
     ([2, 2, 2], FinishReason.LENGTH, None)),
    ([2, 7, 2], dict(eos=2, ignore_eos=True, stop_token_ids=[7]),
     ([2, 7], FinishReason.STOP, 7)),
    ([1, 1, 1, 1], dict(max_tokens=None, max_model_len=5), ([1, 1], FinishReason.LENGTH, None)),
    ([1, 1, 1, 1], dict(max_tokens=10, max_model_len=6), ([1, 1, 1], FinishReason.LENGTH, None)),
])
def test_stop_conditions(tokens, kwargs, expected):
    assert generate(tokens, **kwargs) == expected


def test_extra_stop_token_ids_stop():
    params = SamplingParams(max_tokens=5)
    params.extra_stop_token_ids.append(9)
    s = make()
    r = Request("r", [1], params)
    s.add_request(r)
    for token in (3, 9, 4):
        step(s, token)
    assert (r.output_token_ids, r.finish_reason, r.stop_reason) == ([3, 9], FinishReason.STOP, 9)


def test_finish_request_from_outside_with_stop_string():
    s = make()
    r = add(s, "r", [1, 2, 3], max_tokens=10)
    step(s)
    s.finish_request("r", FinishReason.STOP, "</s>")
    assert (r.status, r.finish_reason, r.stop_reason) == (
        RequestStatus.FINISHED, FinishReason.STOP, "</s>")
    assert s.kv.num_free_blocks == 16 and s.schedule().forgotten_request_ids == ["r"]
    s.finish_request("missing", FinishReason.STOP)  # unknown ids are ignored


def test_finished_parallel_request_leaves_no_bookkeeping_and_frees_its_id():
    """The parent -> sequences map must not grow forever in a long-running server."""
    s = make()
    add(s, "p", [1, 2, 3, 4, 5], n=2, seed=0, max_tokens=2)
    step(s)
    assert s.children == {"p": ["p/0", "p/1"]}
    step(s)
    assert s.children == {"p": ["p/0", "p/1"]}
    s.abort_request("p/0")
    assert s.children == {"p": ["p/0", "p/1"]}  # p/1 still runs
    step(s)
    assert not s.has_unfinished() and s.children == {}
    add(s, "p", [1, 2, 3], n=2, max_tokens=1)  # the id can be used again
    assert s.children == {"p": []}


# ---- pause between schedule() and update(), priority order, swap-in order, n > 1 families ----


def test_a_request_finished_while_paused_stays_finished():
    s = make(gpu=8)
    add(s, "a", [1, 2, 3], max_tokens=1)
    out = s.schedule()
    s.pause("a")  # between schedule() and update(): its last token is being computed
    s.update(out, {"a": 9})
    s.resume_paused()
    assert not s.running and not s.paused and not s.has_unfinished()
    assert s.kv.num_free_blocks == 8
    assert step(s).scheduled == []


def test_an_n2_request_paused_before_it_splits_splits_cleanly():
    s = make(gpu=8)
    add(s, "p", [1, 2, 3], n=2, max_tokens=2, ignore_eos=True)
    out = s.schedule()
    s.pause("p")
    s.update(out, {})
    s.resume_paused()
    assert sorted(s.requests) == ["p/0", "p/1"] and "p" not in s.paused
    while s.has_unfinished():
        step(s)
    assert s.kv.num_free_blocks == 8


def test_priority_mode_preempts_the_least_urgent_even_if_admitted_first():
    s = make(gpu=3, policy="priority")
    add(s, "low", [1] * 3, t=0.0, priority=9, max_tokens=8, ignore_eos=True)
    step(s)
    add(s, "high", [2] * 4, t=1.0, priority=0, max_tokens=8, ignore_eos=True)
    order = []
    while s.has_unfinished():
        order.append([item.request_id for item in step(s).scheduled])
    # Both fit at first; when "high" needs a block, "low" is evicted although it was admitted
    # first, and comes back only when "high" is done.
    assert order[:9] == [["low", "high"]] + [["high"]] * 7 + [["low"]]
    assert s.num_preemptions == 1 and s.kv.num_free_blocks == 3


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_swapped_requests_come_back_oldest_or_most_urgent_first(policy):
    s = make(gpu=4, cpu=16, policy=policy, preemption_mode="swap")
    for index, rid in enumerate("ABC"):
        add(s, rid, [index + 1] * 4, t=float(index), priority=index, max_tokens=8,
            ignore_eos=True)
    swapped_in = []
    while s.has_unfinished():
        out = s.schedule()
        if out.blocks_to_swap_out:
            assert [r.request_id for r in s.swapped] == sorted(r.request_id for r in s.swapped)
        swapped_in += [i.request_id for i in out.scheduled
                       if out.blocks_to_swap_in and i.new_request is not None]
        s.update(out, {i.request_id: 1 for i in out.scheduled if i.sample})
    assert swapped_in == sorted(swapped_in) and swapped_in
    assert s.kv.num_free_blocks == 4


def test_an_n2_request_finished_before_it_splits_frees_its_id():
    s = make(gpu=8, max_num_batched_tokens=2)
    add(s, "p", [1, 2, 3, 4, 5], n=2)
    s.schedule()
    s.finish_request("p", FinishReason.STOP)
    assert not s.has_unfinished() and not s.children
    add(s, "p", [1, 2], max_tokens=1)  # the id is free again
    step(s)
    assert not s.has_unfinished() and s.kv.num_free_blocks == 8


def test_fork_of_an_n2_request_before_it_splits_is_refused():
    s = make(gpu=8, max_num_batched_tokens=2)
    add(s, "p", [1, 2, 3, 4, 5], n=2)
    step(s)
    with pytest.raises(ValueError, match="has not split into its sequences yet"):
        s.fork_sequence("p", "c")
