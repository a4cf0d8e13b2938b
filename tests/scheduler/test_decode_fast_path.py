"""The running requests' inline decode path (running.py) decides exactly what the general path
(_target_tokens, allocate_slots with preemption, _emit) decides: the same step outputs, block
ids, free-list and eviction order, prefix-cache entries and request state, step after step,
in lockstep with a scheduler whose running requests all take the general path and whose
updates take `reference_update` (no gated checks). Exact values on the inline path:
test_decode_fast_path_values.py."""

from __future__ import annotations

import pickle
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler import forking, preemption
from pagedserve.scheduler import scheduler as scheduler_module
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.output import SchedulerOutput
from pagedserve.scheduler.request import FinishReason, Request, RequestStatus
from pagedserve.scheduler.scheduler import Scheduler
from pagedserve.scheduler.state import SchedulerState


def general_path_only(state: SchedulerState, out: SchedulerOutput,
                      budget: int) -> tuple[int, bool]:
    """schedule_running without its inline decode: every request through the general path."""
    running = state.running
    preempted_now = False
    index = 0
    while index < len(running) and budget > 0 and len(out.scheduled) < state.config.max_num_seqs:
        request = running[index]
        num_new = state._chunk(state._target_tokens(request) - request.num_computed_tokens,
                               budget)
        if num_new <= 0:
            index += 1
            continue
        update = state.kv.allocate_slots(request, num_new)
        while update is None:
            victim = state.victim_policy(running[index:])
            preemption.preempt(state, victim, out)
            running = state.running
            preempted_now = True
            if victim is request:
                break
            update = state.kv.allocate_slots(request, num_new)
        if update is None:
            continue
        state._emit(request, num_new, update, out)
        budget -= num_new
        index += 1
    return budget, preempted_now


def schedule_by_general_path(scheduler: Scheduler) -> SchedulerOutput:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scheduler_module, "schedule_running", general_path_only)
        return scheduler.schedule()


def snapshot(scheduler: Scheduler) -> tuple:
    """Everything a step may change, as plain values."""
    kv, pool = scheduler.kv, scheduler.kv.pool
    return (list(pool.ref_counts), list(pool.block_hash), pool.free_block_ids(),
            {h: list(blocks) for h, blocks in pool._hash_to_blocks.items()},
            dict(kv.block_tables), dict(kv.cpu_block_tables), dict(kv.num_hashed_blocks),
            [r.request_id for r in scheduler.running], [r.request_id for r in scheduler.swapped],
            [r.request_id for r in scheduler.waiting], sorted(scheduler.paused),
            scheduler.num_preemptions, scheduler.prefix_cache_hits,
            sorted(scheduler._known_to_workers),
            sorted((rid, r.status.value, r.num_computed_tokens, r.num_pending_tokens,
                    list(r.output_token_ids), r.finish_reason, r.stop_reason,
                    r.num_preemptions, r.num_cached_tokens, list(r.block_hashes))
                   for rid, r in scheduler.requests.items()))


def step_record(out: SchedulerOutput) -> bytes:
    return pickle.dumps((out.__getstate__(), [r.request_id for r in out.requests]))


def sampled_for(out: SchedulerOutput) -> dict[str, int]:
    """A token per sampling item that depends on the request and its length (some stop)."""
    return {item.request_id: (sum(map(ord, item.request_id)) * 7 + item.seq_len) % 23
            for item in out.scheduled if item.sample}


class Lockstep:
    """Two schedulers fed the same calls; `fast` schedules normally, `general` without the
    inline decode. Every step's output and every state after it must be equal."""

    def __init__(self, rng: random.Random) -> None:
        block_size = rng.choice([2, 4, 16])
        max_model_len = rng.choice([24, 64, 160])
        mode = rng.choice(["recompute", "swap"])
        chunked = rng.random() < 0.8
        max_blocks = -(-max_model_len // block_size)
        self.configs = (
            SchedulerConfig(max_num_batched_tokens=rng.randint(1 if chunked else max_model_len,
                                                               2 * max_model_len),
                            max_num_seqs=rng.randint(1, 12), max_model_len=max_model_len,
                            enable_chunked_prefill=chunked,
                            long_prefill_token_threshold=rng.choice([0, 0, 3]),
                            preemption_mode=mode, policy=rng.choice(["fcfs", "priority"]),
                            watermark=rng.choice([0.0, 0.01])),
            CacheConfig(block_size=block_size,
                        num_gpu_blocks=rng.randint(max_blocks, 3 * max_blocks + 8),
                        num_cpu_blocks=rng.randint(1, 40) if mode == "swap" else 0,
                        enable_prefix_caching=rng.random() < 0.8))
        self.fast = Scheduler(*self.configs)
        self.general = Scheduler(*self.configs)
        self.rng = rng
        self.num_added = 0

    def both(self, call) -> None:
        """Apply `call` to both schedulers; an error must be the same on both."""
        errors = []
        for scheduler in (self.fast, self.general):
            try:
                call(scheduler)
                errors.append(None)
            except ValueError as error:
                errors.append(str(error))
        assert errors[0] == errors[1]

    def add(self) -> None:
        rng, block_size = self.rng, self.configs[1].block_size
        max_model_len = self.configs[0].max_model_len
        prefix = rng.choice([[], [1] * block_size, list(range(5, 6 + 2 * block_size))])
        prompt = (prefix + [rng.randint(3, 22) for _ in range(rng.randint(1, max_model_len // 2))]
                  )[:max_model_len - 2]
        max_tokens = rng.choice([None, 1, 3, 12, 40])
        params = dict(n=rng.choice([1, 1, 1, 2, 3]), max_tokens=max_tokens,
                      min_tokens=min(rng.choice([0, 0, 2]), max_tokens or 2),
                      ignore_eos=rng.random() < 0.5, stop_token_ids=rng.choice([None, [7]]),
                      seed=rng.randint(0, 9))
        eos, priority = rng.choice([None, 4]), rng.randint(0, 2)
        salt = rng.choice([None, None, "tenant"])
        request_id, arrival = f"q{self.num_added}", float(self.num_added)
        self.num_added += 1
        self.both(lambda s: s.add_request(Request(request_id, list(prompt),
                                                  SamplingParams(**params), eos_token_id=eos,
                                                  arrival_time=arrival, priority=priority,
                                                  cache_salt=salt)))

    def disturb(self, step_index: int, in_flight: bool) -> None:
        """Now and then an abort, a stop from outside, a pause or resume, a beam fork, or the
        ranks lost: the fast path must see what those leave behind as the general path does."""
        rng, fast = self.rng, self.fast
        choice = rng.random()
        if choice < 0.04 and fast.requests:
            request_id = rng.choice(sorted(fast.requests)).split("/")[0]
            self.both(lambda s: s.abort_request(request_id))
        elif choice < 0.07 and fast.requests:
            request_id = rng.choice(sorted(fast.requests))
            self.both(lambda s: s.finish_request(request_id, FinishReason.STOP, "x"))
        elif choice < 0.10 and fast.running:
            request_id = rng.choice(fast.running).request_id
            self.both(lambda s: s.pause(request_id))
        elif choice < 0.13:
            self.both(lambda s: s.resume_paused())
        elif choice < 0.16 and fast.running:
            parent = rng.choice(fast.running).request_id
            child = f"{parent}/b{step_index}"
            self.both(lambda s: s.fork_sequence(parent, child))
        elif choice < 0.17 and not in_flight:
            self.both(lambda s: s.requeue_all_for_recompute())


def reference_update(scheduler: Scheduler, out: SchedulerOutput,
                     sampled: dict[str, int]) -> list[Request]:
    """`Scheduler.update` as it was before its checks were inlined and gated: every running
    request's blocks offered to the prefix cache, every sampled token through `check_stop`.
    The general-path scheduler updates through it, so the lockstep checks the gates too."""
    emitted = []
    finished = False
    for item, request in zip(out.scheduled, out.requests, strict=True):
        if scheduler.requests.get(item.request_id) is not request:
            continue
        running = request.status is RequestStatus.RUNNING
        if running:
            scheduler.kv.cache_computed_blocks(request)
        if item.sample:
            request.num_pending_tokens -= 1
            request.append_token(sampled[item.request_id])
            emitted.append(request)
            if request.check_stop(scheduler.config.max_model_len):
                if not running:
                    scheduler._remove_from_queues(request)
                scheduler._release(request)
                finished = True
        elif (running and request.request_id in scheduler._fork_pending
              and request.num_computed_tokens == request.num_prompt_tokens - 1):
            forking.split_into_sequences(scheduler, request)
    if finished:
        scheduler.running = [r for r in scheduler.running if r.status is RequestStatus.RUNNING]
    return emitted


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), overlap=st.booleans())
def test_inline_decode_decides_exactly_what_the_general_path_decides(seed, overlap):
    rng = random.Random(seed)
    pair = Lockstep(rng)
    in_flight: list[tuple[SchedulerOutput, SchedulerOutput]] = []
    for step_index in range(rng.randint(20, 90)):
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            pair.add()
        pair.disturb(step_index, bool(in_flight))
        fast_out, general_out = pair.fast.schedule(), schedule_by_general_path(pair.general)
        assert step_record(fast_out) == step_record(general_out)
        assert [r.request_id for r in pair.fast.take_dropped()] == \
            [r.request_id for r in pair.general.take_dropped()]
        in_flight.append((fast_out, general_out))
        while len(in_flight) > (1 if overlap else 0):
            done_fast, done_general = in_flight.pop(0)
            sampled = sampled_for(done_fast)
            emitted = [(r.request_id, r.status) for r in pair.fast.update(done_fast, sampled)]
            assert emitted == [(r.request_id, r.status) for r in
                               reference_update(pair.general, done_general, sampled)]
        assert snapshot(pair.fast) == snapshot(pair.general)
        pair.fast.kv.check_invariants()
