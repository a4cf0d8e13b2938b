"""Property tests over random request streams: invariants after every step, no leaks, and every
request that ends normally produces exactly its reference token stream."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sched_harness import Spec, check_step, expected_outputs, run_workload

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.request import Request, RequestStatus
from pagedserve.scheduler.scheduler import Scheduler

BLOCK_SIZE = 4
MAX_MODEL_LEN = 32
PREFIXES = [[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8, 9], [21, 22, 23, 24, 25, 26, 27, 28]]

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def request_specs(draw, index: int) -> Spec:
    prefix = draw(st.sampled_from(PREFIXES))
    tail = draw(st.lists(st.integers(0, 60), min_size=0 if prefix else 1, max_size=20))
    prompt = (prefix + tail)[:MAX_MODEL_LEN - 2]
    params = SamplingParams(
        n=draw(st.sampled_from([1, 1, 1, 2, 3])),
        max_tokens=draw(st.one_of(st.none(), st.integers(1, 12))),
        seed=draw(st.integers(0, 1000)),
        ignore_eos=draw(st.booleans()),
    )
    return Spec(
        request_id=f"r{index}",
        prompt=prompt,
        params=params,
        arrival_step=draw(st.integers(0, 12)),
        eos=draw(st.sampled_from([None, 0, 5])),
        priority=draw(st.integers(0, 2)),
        cache_salt=draw(st.sampled_from([None, None, "tenant"])),
        abort_step=draw(st.one_of(st.none(), st.none(), st.integers(0, 25))),
    )


@st.composite
def workloads(draw):
    count = draw(st.integers(1, 7))
    specs = [draw(request_specs(i)) for i in range(count)]
    mode = draw(st.sampled_from(["recompute", "swap"]))
    # Every single sequence must fit in the pool (else it ends early by design, LENGTH).
    num_gpu_blocks = draw(st.integers(MAX_MODEL_LEN // BLOCK_SIZE, 40))
    sched = SchedulerConfig(
        max_num_batched_tokens=draw(st.integers(1, 40)),
        max_num_seqs=draw(st.integers(1, 8)),
        max_model_len=MAX_MODEL_LEN,
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 3, 7])),
        preemption_mode=mode,
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        watermark=draw(st.sampled_from([0.0, 0.0, 0.05, 0.1, 0.25, 0.5])),
    )
    cache = CacheConfig(
        block_size=BLOCK_SIZE,
        num_gpu_blocks=num_gpu_blocks,
        num_cpu_blocks=draw(st.integers(1, 30)) if mode == "swap" else 0,
        enable_prefix_caching=draw(st.booleans()),
    )
    return specs, sched, cache


@SETTINGS
@given(workloads(), st.booleans())
def test_random_streams_keep_invariants_and_match_reference(workload, overlap):
    """Also with overlapped steps: step N+1 scheduled before step N's tokens are known."""
    specs, sched, cache = workload
    # run_workload checks invariants after every schedule() and update(), checks that every
    # request ends within max_steps, and that all GPU and CPU blocks are free at the end.
    result = run_workload(specs, sched, cache, max_steps=3000, overlap=overlap)
    expected = expected_outputs(specs, MAX_MODEL_LEN)
    for request_id, output in result.outputs.items():
        assert output == expected[request_id], request_id
    never_aborted = {s.request_id for s in specs if s.abort_step is None}
    for request_id, output in expected.items():
        if request_id.split("/")[0] in never_aborted:
            assert result.outputs[request_id] == output


@st.composite
def family_swap_workloads(draw):
    """Mostly n > 1 requests under swap preemption in small pools, so families swap often."""
    specs = [draw(request_specs(i)) for i in range(draw(st.integers(1, 5)))]
    for spec in specs:
        spec.params = dataclasses.replace(spec.params, n=draw(st.sampled_from([1, 2, 3, 4])))
    sched = SchedulerConfig(
        max_num_batched_tokens=draw(st.integers(4, 40)),
        max_num_seqs=draw(st.integers(2, 8)),
        max_model_len=MAX_MODEL_LEN,
        long_prefill_token_threshold=draw(st.sampled_from([0, 3])),
        preemption_mode="swap",
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        watermark=draw(st.sampled_from([0.0, 0.1])),
    )
    cache = CacheConfig(
        block_size=BLOCK_SIZE,
        num_gpu_blocks=draw(st.integers(MAX_MODEL_LEN // BLOCK_SIZE, 16)),
        num_cpu_blocks=draw(st.integers(1, 30)),
        enable_prefix_caching=draw(st.booleans()),
    )
    return specs, sched, cache


def _family(request: Request) -> str:
    return request.parent_id or request.request_id


class FamilyCheckingScheduler(Scheduler):
    """Checks around every schedule() that a family leaves the GPU whole, one CPU block per
    block its sequences share, and comes back with those blocks shared again."""

    def schedule(self):
        tables = {rid: list(table) for rid, table in self.kv.block_tables.items()}
        cpu_tables = {rid: list(table) for rid, table in self.kv.cpu_block_tables.items()}
        before = {rid: request.status for rid, request in self.requests.items()}
        out = super().schedule()
        now = {rid: request.status for rid, request in self.requests.items()}
        left = [rid for rid, status in now.items()
                if status is RequestStatus.SWAPPED and before.get(rid) is RequestStatus.RUNNING]
        for family in {_family(self.requests[rid]) for rid in left}:
            members = [rid for rid in left if _family(self.requests[rid]) == family]
            to_cpu = {(g, c) for rid in members
                      for g, c in zip(tables[rid], self.kv.cpu_block_tables[rid], strict=True)}
            assert len({g for g, _ in to_cpu}) == len({c for _, c in to_cpu}) == len(to_cpu)
            moved = {g for g, _ in to_cpu}
            for rid, status in now.items():  # no sibling kept a block they shared throughout
                if status is RequestStatus.RUNNING and _family(self.requests[rid]) == family:
                    assert not moved & set(tables.get(rid, ())) & set(self.kv.block_tables[rid])
        to_gpu = dict(out.blocks_to_swap_in)
        assert len(to_gpu) == len(out.blocks_to_swap_in) == len(set(to_gpu.values()))
        copies = set(out.blocks_to_copy)
        back = [rid for rid, status in now.items()
                if status is RequestStatus.RUNNING and before.get(rid) is RequestStatus.SWAPPED]
        for rid in back:  # a table may have grown past its swapped part this step
            gpu_table = self.kv.block_tables[rid][:len(cpu_tables[rid])]
            for cpu_block, gpu_block in zip(cpu_tables[rid], gpu_table, strict=True):
                assert gpu_block == to_gpu[cpu_block] or (to_gpu[cpu_block], gpu_block) in copies
        return out


@SETTINGS
@given(family_swap_workloads(), st.booleans())
def test_families_swap_whole_and_keep_their_shared_blocks_shared(workload, overlap):
    """n > 1 under swap, with and without overlapped steps: exact reference streams, and the
    family checks above at every step."""
    specs, sched, cache = workload
    result = run_workload(specs, sched, cache, max_steps=3000, overlap=overlap,
                          scheduler_factory=FamilyCheckingScheduler)
    expected = expected_outputs(specs, MAX_MODEL_LEN)
    for request_id, output in result.outputs.items():
        assert output == expected[request_id], request_id


@SETTINGS
@given(workloads(), st.data())
def test_random_aborts_between_schedule_and_update_return_every_block(workload, data):
    """Abort random requests at random points (also between schedule() and update())."""
    specs, sched, cache = workload
    scheduler = _scheduler_with(specs, sched, cache)
    ids = [spec.request_id for spec in specs]
    for _step in range(200):
        if not scheduler.has_unfinished():
            break
        out = scheduler.schedule()
        check_step(scheduler, out)
        if data.draw(st.booleans()):
            victim = data.draw(st.sampled_from(ids + sorted(scheduler.requests)))
            scheduler.abort_request(victim)
            check_step(scheduler, out)
        sampled = {item.request_id: (item.start_position * 7 + 3) % 61
                   for item in out.scheduled if item.sample}
        scheduler.update(out, sampled)
        check_step(scheduler, out)
    for request_id in ids:
        scheduler.abort_request(request_id)
    _assert_everything_returned(scheduler, cache)


@SETTINGS
@given(workloads(), st.data())
def test_random_pause_finish_and_abort_around_update_lose_nothing(workload, data):
    """Pause, finish and abort random requests between schedule() and update() (the points
    beam search and stop strings use); paused ones resume at random later. Every request ends,
    nothing stays paused or running, every block comes back."""
    from pagedserve.scheduler.request import FinishReason

    specs, sched, cache = workload
    scheduler = _scheduler_with(specs, sched, cache)
    for _step in range(300):
        if not scheduler.has_unfinished():
            break
        out = scheduler.schedule()
        check_step(scheduler, out)
        live = sorted(scheduler.requests)
        if live:
            action = data.draw(st.sampled_from(["none", "pause", "finish", "abort"]))
            target = data.draw(st.sampled_from(live))
            if action == "pause":
                scheduler.pause(target)
            elif action == "finish":
                scheduler.finish_request(target, FinishReason.STOP)
            elif action == "abort":
                scheduler.abort_request(target)
            check_step(scheduler, out)
        sampled = {item.request_id: (item.start_position * 7 + 3) % 61
                   for item in out.scheduled if item.sample}
        scheduler.update(out, sampled)
        check_step(scheduler, out)
        if data.draw(st.booleans()):
            scheduler.resume_paused()
    scheduler.resume_paused()
    for request_id in sorted(scheduler.requests):
        scheduler.abort_request(request_id)
    _assert_everything_returned(scheduler, cache)


def _scheduler_with(specs, sched, cache) -> Scheduler:
    scheduler = Scheduler(sched, cache)
    for spec in specs:
        scheduler.add_request(Request(spec.request_id, list(spec.prompt), spec.params,
                                      eos_token_id=spec.eos, priority=spec.priority,
                                      cache_salt=spec.cache_salt))
    return scheduler


def _assert_everything_returned(scheduler: Scheduler, cache: CacheConfig) -> None:
    assert not scheduler.has_unfinished() and scheduler.children == {}
    assert not scheduler.paused and not scheduler._fork_pending
    assert scheduler.running == [] and len(scheduler.waiting) == 0 and not scheduler.swapped
    assert scheduler.kv.num_free_blocks == cache.num_gpu_blocks
    if scheduler.kv.cpu_pool is not None:
        assert scheduler.kv.cpu_pool.num_free_blocks == cache.num_cpu_blocks
    scheduler.kv.check_invariants()


def test_a_fork_parent_swapped_out_before_its_prefill_result_came_back_still_splits():
    """Found by the property test above with overlap: r5 (n=2) finished its shared prefill in a
    step whose result came after the next schedule() had swapped it out; back from swap with
    nothing left to compute, it must split then (it hung, never scheduled again)."""
    rows = [("r0", [0], 1, 0), ("r1", [0], 1, 0), ("r2", [0], 1, 0), ("r3", [0], 1, 0),
            ("r4", [0, 0], 1, 0), ("r5", [0] * 6, 2, 1), ("r6", list(range(1, 10)), 1, 0)]
    specs = [Spec(request_id, prompt, SamplingParams(n=n, seed=0), arrival_step=arrival)
             for request_id, prompt, n, arrival in rows]
    sched = SchedulerConfig(max_num_batched_tokens=9, max_num_seqs=7, max_model_len=MAX_MODEL_LEN,
                            preemption_mode="swap", watermark=0.0)
    cache = CacheConfig(block_size=BLOCK_SIZE, num_gpu_blocks=10, num_cpu_blocks=2,
                        enable_prefix_caching=False)
    result = run_workload(specs, sched, cache, max_steps=3000, overlap=True)
    assert result.saw_swap
    assert result.outputs == expected_outputs(specs, MAX_MODEL_LEN)
