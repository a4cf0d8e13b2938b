"""Swapping families (the sequences of an n > 1 request, beams): they leave and come back
together, one copy per shared block and the same ref counts; a family that cannot leave whole
has only its victim recomputed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.kv_cache_manager import KVCacheManager
from pagedserve.scheduler.request import Request, RequestStatus
from pagedserve.scheduler.scheduler import Scheduler

PROMPT = [1, 2, 3, 4, 5, 6]


def make(gpu: int, cpu: int) -> Scheduler:
    return Scheduler(SchedulerConfig(preemption_mode="swap", watermark=0.0),
                     CacheConfig(block_size=4, num_gpu_blocks=gpu, num_cpu_blocks=cpu,
                                 enable_prefix_caching=False))


def add(s: Scheduler, rid: str, prompt, t: float, **params) -> Request:
    r = Request(rid, list(prompt), SamplingParams(**params), arrival_time=t)
    s.add_request(r)
    return r


def step(s: Scheduler):
    out = s.schedule()
    s.update(out, {item.request_id: 1 for item in out.scheduled if item.sample})
    s.kv.check_invariants()
    return out


def brief(out):
    return [(i.request_id, i.start_position, i.table_blocks) for i in out.scheduled]


def forked(kv: KVCacheManager, computed: list[int]) -> list[Request]:
    """Children c0, c1, ... of a parent that computed PROMPT[:-1], each then writing in turn
    until it has computed the given number of tokens (copy-on-write as it goes)."""
    parent = Request("p", PROMPT)
    kv.allocate_slots(parent, 5)
    children = []
    for index in range(len(computed)):
        kv.fork("p", f"c{index}")
        children.append(Request(f"c{index}", PROMPT, output_token_ids=[7] * 7,
                                num_computed_tokens=5))
    kv.free("p")
    for child, target in zip(children, computed, strict=True):
        while child.num_computed_tokens < target:
            kv.allocate_slots(child, 1)
            child.num_computed_tokens += 1
    return children


def test_family_swap_round_trip_keeps_one_block_per_shared_block_and_ref_counts():
    kv = KVCacheManager(4, 6, num_cpu_blocks=3, enable_prefix_caching=False)
    c0, c1, c2 = forked(kv, [7, 5, 5])  # c0 copied the shared partial block 1 to block 2
    assert kv.block_tables == {"c0": [0, 2], "c1": [0, 1], "c2": [0, 1]}
    assert kv.pool.ref_counts == [3, 2, 1, 0, 0, 0]
    ids = ["c0", "c1", "c2"]
    assert kv.can_swap_out(ids)  # three CPU blocks hold the family's six table entries
    assert kv.swap_out(ids) == [(0, 0), (2, 1), (1, 2)]
    assert kv.cpu_block_tables == {"c0": [0, 1], "c1": [0, 2], "c2": [0, 2]}
    assert kv.cpu_pool.ref_counts == [3, 1, 2]
    assert kv.num_free_blocks == 6 and kv.pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    # c1 writes next into block 2 of the CPU pool, which c2 shares: one copy on the way.
    assert kv.blocks_to_swap_in(ids, c1, 1) == 3 + 1
    assert kv.blocks_to_swap_in(ids, c0, 1) == 3
    assert kv.blocks_to_swap_in(["c1"], c1, 1) == 2  # alone it owns its copies
    kv.allocate_slots(Request("x", [9] * 5), 5)  # takes 3, 4
    assert kv.swap_in(ids, reserve=2) is None and kv.cpu_pool.num_free_blocks == 0
    assert kv.swap_in(ids) == [(0, 5), (1, 2), (2, 1)]
    assert {rid: kv.block_tables[rid] for rid in ids} == {"c0": [5, 2], "c1": [5, 1],
                                                          "c2": [5, 1]}
    assert [kv.pool.ref_counts[b] for b in (5, 2, 1)] == [3, 1, 2]
    assert kv.num_free_blocks == 1 and kv.cpu_pool.num_free_blocks == 3
    update = kv.allocate_slots(c1, 1)
    assert (update.block_ids, update.copies) == ([0], [(1, 0)])
    kv.check_invariants()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(5, 12), min_size=1, max_size=4), st.integers(0, 6), st.data())
def test_family_swap_round_trip_preserves_sharing_exactly(computed, filler_blocks, data):
    kv = KVCacheManager(4, 32, num_cpu_blocks=16, enable_prefix_caching=False)
    forked(kv, computed)
    ids = sorted(kv.block_tables)
    members = data.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True))
    before = {rid: list(kv.block_tables[rid]) for rid in members}
    free_before = kv.num_free_blocks
    assert kv.can_swap_out(members)
    pairs = kv.swap_out(members)
    assert len(pairs) == len({b for table in before.values() for b in table})
    kv.allocate_slots(Request("filler", [0] * 24), 4 * filler_blocks)
    assert kv.swap_in(members) is not None
    kv.free("filler")
    after = {rid: kv.block_tables[rid] for rid in members}
    slots = [(rid, i) for rid in members for i in range(len(before[rid]))]
    for r, i in slots:
        for s, j in slots:
            assert (before[r][i] == before[s][j]) == (after[r][i] == after[s][j])
    for r, i in slots:  # one reference per entry of the members' tables
        assert kv.pool.ref_counts[after[r][i]] == sum(before[r][i] == before[s][j]
                                                      for s, j in slots)
    # Blocks also held by children left on the GPU came back as copies of their own.
    outside = {b for rid in ids if rid not in members for b in kv.block_tables[rid]}
    left_behind = outside & {b for table in before.values() for b in table}
    assert kv.num_free_blocks == free_before - len(left_behind)
    assert kv.cpu_pool.num_free_blocks == 16
    kv.check_invariants()


def test_n2_request_is_swapped_out_and_in_as_one_family():
    s = make(gpu=5, cpu=8)
    add(s, "A", [11, 12, 13, 14, 15, 16], t=0, max_tokens=4)
    add(s, "P", PROMPT, t=1, n=2, max_tokens=6)
    step(s)
    out = step(s)  # P/0 copies the shared partial block 3 to block 4
    assert out.blocks_to_copy == [(3, 4)]
    assert s.kv.block_tables == {"A": [0, 1], "P/0": [2, 4], "P/1": [2, 3]}
    step(s)
    assert s.kv.pool.ref_counts == [1, 1, 2, 1, 1] and s.kv.num_free_blocks == 0
    out = step(s)  # A needs a block: the newest, P's family, leaves whole
    assert out.blocks_to_swap_out == [(2, 0), (4, 1), (3, 2)]
    assert brief(out) == [("A", 8, [4])]
    assert s.kv.cpu_block_tables == {"P/0": [0, 1], "P/1": [0, 2]}
    assert s.kv.cpu_pool.ref_counts[:3] == [2, 1, 1] and s.kv.cpu_pool.num_free_blocks == 5
    assert [r.request_id for r in s.swapped] == ["P/0", "P/1"] and s.num_preemptions == 2
    out = step(s)  # A finished: the family comes back, block 2 shared again
    assert out.blocks_to_swap_in == [(0, 3), (1, 2), (2, 4)]
    assert brief(out) == [("P/0", 7, [3, 2]), ("P/1", 7, [3, 4])]
    assert s.kv.block_tables == {"P/0": [3, 2], "P/1": [3, 4]}
    assert s.kv.pool.ref_counts == [0, 0, 1, 2, 1] and s.kv.num_free_blocks == 2
    assert s.kv.cpu_pool.num_free_blocks == 8


def test_family_the_cpu_pool_cannot_hold_whole_has_only_its_victim_recomputed():
    s = make(gpu=5, cpu=2)  # P/0 alone (two blocks) would fit; the family (three) does not
    add(s, "A", [11, 12, 13, 14, 15, 16], t=0, max_tokens=5)
    add(s, "P", PROMPT, t=1, n=2, max_tokens=6)
    for _ in range(3):
        step(s)
    out = step(s)  # P/1 keeps the shared block 2 and goes on
    assert out.blocks_to_swap_out == [] and out.forgotten_request_ids == ["P/0"]
    assert brief(out) == [("A", 8, [4]), ("P/1", 7, [])]
    p0 = s.requests["P/0"]
    assert p0.status is RequestStatus.PREEMPTED and p0.num_computed_tokens == 0
    assert list(s.waiting) == [p0] and not s.swapped
    assert s.kv.block_tables == {"A": [0, 1, 4], "P/1": [2, 3]}
    assert s.kv.pool.ref_counts == [1, 1, 1, 1, 1]


def test_sibling_sharing_blocks_with_one_scheduled_this_step_is_recomputed():
    s = make(gpu=4, cpu=8)
    add(s, "P", PROMPT, t=0, n=2, max_tokens=6)
    for _ in range(4):
        step(s)
    assert s.kv.block_tables == {"P/0": [0, 2], "P/1": [0, 1]}
    out = step(s)  # P/0 takes the last block; P/1 needs one and shares block 0 with P/0
    assert out.blocks_to_swap_out == [] and brief(out) == [("P/0", 8, [3])]
    p1 = s.requests["P/1"]
    assert p1.status is RequestStatus.PREEMPTED and p1.num_computed_tokens == 0
    assert s.kv.block_tables == {"P/0": [0, 2, 3]} and s.kv.pool.ref_counts == [1, 0, 1, 1]


def test_family_that_filled_the_cache_comes_back_one_sequence_at_a_time():
    s = make(gpu=3, cpu=8)
    add(s, "P", PROMPT, t=0, n=2, max_tokens=5)
    for _ in range(4):
        step(s)
    assert s.kv.block_tables == {"P/0": [0, 2], "P/1": [0, 1]}
    out = step(s)  # P/0 needs a fourth block: the family leaves whole
    assert out.blocks_to_swap_out == [(0, 0), (2, 1), (1, 2)] and out.scheduled == []
    out = step(s)  # three blocks plus P/0's next never fit together: P/0 returns alone
    assert out.blocks_to_swap_in == [(0, 2), (1, 1)]
    assert brief(out) == [("P/0", 8, [2, 1, 0])]
    assert s.kv.cpu_block_tables == {"P/1": [0, 2]} and s.kv.cpu_pool.ref_counts[:3] == [1, 0, 1]
    while "P/0" in s.requests:
        step(s)
    out = step(s)
    assert out.blocks_to_swap_in == [(0, 0), (2, 1)] and s.kv.block_tables == {"P/1": [0, 1, 2]}
    while s.has_unfinished():
        step(s)
    assert s.kv.num_free_blocks == 3 and s.kv.cpu_pool.num_free_blocks == 8
