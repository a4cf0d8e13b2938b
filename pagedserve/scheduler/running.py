"""The running requests' share of a step, in order, with preemption when one needs room.

Most of every step is a plain decode: one token, to be sampled, by a request the workers know,
with no fork pending and no sample ruled out, that fits its block table as it is or starts a
new block. `schedule_running` does that case inline, exactly as `_target_tokens`,
`KVCacheManager.allocate_slots` and `_emit` would (same block, same slot, same prefix-cache
entries), since it runs once per running request per step and their calls and objects were
most of a step's host time. Every other request takes that general path, which may preempt
victims (`preemption.py`) until its tokens fit.
"""

from __future__ import annotations

from pagedserve.scheduler import preemption
from pagedserve.scheduler.output import PLACEHOLDER_TOKEN_ID, ScheduledRequest, SchedulerOutput
from pagedserve.scheduler.state import SchedulerState


def schedule_running(state: SchedulerState, out: SchedulerOutput,
                     budget: int) -> tuple[int, bool]:
    """Give the running requests, in order, their share of the step under `budget` tokens.
    Returns the budget left and whether anyone was preempted."""
    kv = state.kv
    size = kv.block_size
    tables = kv.block_tables
    pool = kv.pool
    ref_counts = pool.ref_counts
    hashed = kv.num_hashed_blocks if kv.enable_prefix_caching else None
    cache_computed_blocks, allocate_slots = kv.cache_computed_blocks, kv.allocate_slots
    known, fork_pending = state._known_to_workers, state._fork_pending
    max_num_seqs = state.config.max_num_seqs
    scheduled = out.scheduled
    add_item, add_request = scheduled.append, out.requests.append
    running = state.running
    preempted_now = False
    num_decodes = 0
    index, num_running, room = 0, len(running), max_num_seqs - len(scheduled)
    while index < num_running and budget > 0 and room > 0:
        request = running[index]
        request_id = request.request_id
        computed = request.num_computed_tokens
        pending = request.num_pending_tokens
        prompt, output = request.prompt_token_ids, request.output_token_ids
        num_tokens = len(prompt) + len(output)
        table = tables.get(request_id)
        block_index, offset = computed // size, computed % size
        # One token short of num_scheduled_tokens: this token is the last, and it samples,
        # unless the samples pending already reach the limit (Request.needs_no_more_samples).
        if (num_tokens + pending == computed + 1 and table is not None
                and request_id in known
                and (not fork_pending or request_id not in fork_pending)
                and not (pending and len(output) + pending >= request.max_output_tokens)):
            table_start = len(table)
            if block_index < table_start and (not offset or
                                              ref_counts[table[block_index]] == 1):
                new_blocks = []  # the token fits the table as it is
            elif block_index == table_start and not offset \
                    and (block_id := pool.allocate_one()) is not None:
                new_blocks = [block_id]  # it starts a block: allocate_slots' answer
                table.append(block_id)
            else:
                new_blocks = None
            if new_blocks is not None:
                # Pending: the token sampled by the step still running. Else the last one.
                token_id = PLACEHOLDER_TOKEN_ID if pending else output[-1] if output \
                    else prompt[-1]
                request.num_computed_tokens = computed + 1
                # Full blocks are indexed now (_emit says why). computed + 1 >= num_tokens,
                # so num_tokens // size blocks hold known ids: cache_computed_blocks' usual
                # answer, none of them newly full, is found here without the call.
                if hashed is not None and num_tokens // size > hashed.get(request_id, 0):
                    cache_computed_blocks(request)
                request.num_pending_tokens = pending + 1
                add_request(request)
                add_item(ScheduledRequest(request_id, [token_id], computed, table_start,
                                          new_blocks, True, None))
                num_decodes += 1
                budget -= 1
                room -= 1
                index += 1
                continue
        num_new = state._chunk(state._target_tokens(request) - computed, budget)
        if num_new <= 0:
            index += 1
            continue
        update = allocate_slots(request, num_new)
        while update is None:
            victim = state.victim_policy(running[index:])
            preemption.preempt(state, victim, out)
            running = state.running
            num_running = len(running)
            preempted_now = True
            if victim is request:
                break
            update = allocate_slots(request, num_new)
        if update is None:
            continue
        state._emit(request, num_new, update, out)
        budget -= num_new
        room -= 1
        index += 1
    out.num_batched_tokens += num_decodes
    return budget, preempted_now
