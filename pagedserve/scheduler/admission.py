"""Admission: who joins the running requests after those already running were served.

Swapped families come back first (`resume_swapped`), each with its shared blocks shared again;
then waiting requests are admitted in queue order (`admit_waiting`), their cached prefix taken
for free, while the admission policy lets them in. Both keep the watermark of free blocks, so
that running requests have room to decode, and both stop at the first that does not fit:
later ones do not overtake it.
"""

from __future__ import annotations

from pagedserve.scheduler.forking import family_of, split_into_sequences
from pagedserve.scheduler.output import SchedulerOutput
from pagedserve.scheduler.request import Request, RequestStatus
from pagedserve.scheduler.state import SchedulerState


def resume_swapped(state: SchedulerState, out: SchedulerOutput, budget: int) -> int:
    """Swap sequences back in, a family at a time (its shared blocks shared again), while
    the first of it has room for its next tokens above the watermark. Returns the budget
    left."""
    while state.swapped and budget > 0 and len(state.running) < state.config.max_num_seqs:
        lead = state.swapped[0]
        family = family_of(lead)
        group = [r for r in state.swapped if family_of(r) == family]
        num_new = state._chunk(state._target_tokens(lead) - lead.num_computed_tokens, budget)
        needed = state.kv.blocks_to_swap_in([r.request_id for r in group], lead, num_new)
        if needed > state.cache_config.num_gpu_blocks:
            # Grown since it left, the family no longer fits the cache together: waiting
            # for room would wait forever, so the lead comes back alone.
            group = [lead]
            needed = state.kv.blocks_to_swap_in([lead.request_id], lead, num_new)
        watermark = _watermark(state)
        if needed + watermark > state.kv.num_free_blocks:
            break
        out.blocks_to_swap_in.extend(state.kv.swap_in([r.request_id for r in group]))
        for member in group:
            state.swapped.remove(member)
            member.status = RequestStatus.RUNNING
            state.running.append(member)
        for member in group:
            budget = _schedule_swapped_in(state, member, out, budget, watermark)
    return budget


def admit_waiting(state: SchedulerState, out: SchedulerOutput, budget: int) -> None:
    """Admit waiting requests in queue order while they fit the budget, the policy and the
    KV cache above the watermark."""
    kv = state.kv
    block_size = kv.block_size
    while state.waiting and budget > 0 and len(state.running) < state.config.max_num_seqs:
        request = state.waiting.peek()
        cached = []
        looked_up = request.num_computed_tokens == 0 \
            and request.request_id not in kv.block_tables
        if looked_up:
            cached = kv.find_cached_prefix(request)
        target = state._target_tokens(request)
        cached = cached[:max(target, 0) // block_size]
        remaining = target - request.num_computed_tokens - len(cached) * block_size
        if not state.config.enable_chunked_prefill and remaining > budget:
            break
        blocks_for_prompt = kv.blocks_needed(request, remaining, cached)
        watermark = _watermark(state)
        if not state.admission_policy(blocks_for_prompt, kv.num_free_blocks, watermark):
            break
        num_new = state._chunk(remaining, budget)
        update = kv.allocate_slots(request, num_new, cached, reserve=watermark)
        if update is None:
            break
        state.waiting.pop()
        if looked_up and kv.enable_prefix_caching:
            # After a recompute preemption the lookup covers outputs too.
            state.prefix_cache_queries += request.num_tokens
            state.prefix_cache_hits += len(cached) * block_size
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = len(cached) * block_size
        request.num_computed_tokens += len(cached) * block_size
        request.status = RequestStatus.RUNNING
        state.running.append(request)
        if num_new > 0:
            state._emit(request, num_new, update, out)
            budget -= num_new
        elif request.request_id in state._fork_pending:
            split_into_sequences(state, request)


def _watermark(state: SchedulerState) -> int:
    """Blocks to keep free when admitting or resuming; none while nothing runs, since a
    request that fits the whole pool but not pool minus watermark would otherwise wait
    forever."""
    return state.watermark_blocks if state.running else 0


def _schedule_swapped_in(state: SchedulerState, request: Request, out: SchedulerOutput,
                         budget: int, watermark: int) -> int:
    """Give a sequence just swapped in its share of this step if there is room (the lead
    always has: resume_swapped checked); a sibling without room waits for the next step
    as a running request. Returns the budget left."""
    remaining = state._target_tokens(request) - request.num_computed_tokens
    if remaining <= 0:
        if request.request_id in state._fork_pending:
            # Its shared prefill finished in a step whose result came after it was swapped
            # out (overlapped scheduling): it splits now, as update() would have done.
            split_into_sequences(state, request)
        return budget
    if budget <= 0 or len(out.scheduled) >= state.config.max_num_seqs:
        return budget
    num_new = state._chunk(remaining, budget)
    update = state.kv.allocate_slots(request, num_new, reserve=watermark)
    if update is None:
        return budget
    state._emit(request, num_new, update, out)
    return budget - num_new
