"""Preemption: a victim gives its KV blocks back when a running request needs room.

In swap mode the victim's family (the sequences forked from one another) goes to the CPU pool
together when it can, so a block they share has one CPU copy; otherwise the victim alone is
recomputed: its blocks are freed and it waits at the front of the queue, to be prefilled again
from its prompt and the tokens it was given. Admission (`admission.py`) brings swapped families
back. When the ranks themselves are lost, every sequence is requeued for recompute.
"""

from __future__ import annotations

import logging
from collections import deque

from pagedserve.scheduler.forking import family_of
from pagedserve.scheduler.output import SchedulerOutput
from pagedserve.scheduler.request import FinishReason, Request, RequestStatus
from pagedserve.scheduler.state import SchedulerState

# The scheduler's logger: these lines were the scheduler's before it was split into modules.
logger = logging.getLogger("pagedserve.scheduler.scheduler")


def preempt(state: SchedulerState, request: Request, out: SchedulerOutput) -> None:
    """Preempt a victim. In swap mode its running siblings after it, which share its
    blocks, go with it to the CPU pool when the rest of the family shares none of their
    blocks and the CPU pool holds them all; otherwise the victim alone is recomputed (a
    whole family recomputed can refill the cache and be preempted again, forever)."""
    swap_mode = state.config.preemption_mode == "swap"
    siblings = _running_siblings_after(state, request) if swap_mode else []
    state.running.remove(request)
    if _finish_if_outgrown(state, request):
        return
    group = [request, *siblings]
    if swap_mode and not _family_shares_blocks_outside(state, group) \
            and state.kv.can_swap_out([member.request_id for member in group]):
        for sibling in siblings:
            state.running.remove(sibling)
        _swap_out(state, [request, *(s for s in siblings if not _finish_if_outgrown(state, s))],
                  out)
        return
    _count_preemption(state, request)
    state.kv.free(request.request_id)
    request.num_computed_tokens = 0
    request.status = RequestStatus.PREEMPTED
    state.waiting.push_front(request)
    logger.debug("preempted %s by recompute", request.request_id)


def requeue_all_for_recompute(state: SchedulerState) -> None:
    """`Scheduler.requeue_all_for_recompute`: every unfinished sequence back to the waiting
    queue, in service order ahead of those already there; blocks, pending tokens, the prefix
    cache and what the workers knew are gone."""
    lost = [*state.running, *state.paused.values(), *state.swapped]
    state.running, state.swapped = [], deque()
    state.paused.clear()
    for request in sorted(lost, key=state.service_order, reverse=True):
        state.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_pending_tokens = 0
        request.status = RequestStatus.PREEMPTED
        state.waiting.push_front(request)
    for request in state.requests.values():
        request.num_pending_tokens = 0
    state.kv.pool.reset_prefix_cache()
    state._known_to_workers.clear()
    state._forgotten = []


def _swap_out(state: SchedulerState, group: list[Request], out: SchedulerOutput) -> None:
    """Move sequences that left the running list to the CPU pool, together."""
    group_ids = [member.request_id for member in group]
    out.blocks_to_swap_out.extend(state.kv.swap_out(group_ids))
    for member in group:
        _count_preemption(state, member)
        member.status = RequestStatus.SWAPPED
        state.swapped.append(member)
    # Victims go newest (least urgent) first; they come back in service order.
    state.swapped = deque(sorted(state.swapped, key=state.service_order))
    logger.debug("preempted %s by swap", group_ids)


def _count_preemption(state: SchedulerState, request: Request) -> None:
    request.num_preemptions += 1
    state.num_preemptions += 1
    state._forget(request.request_id)


def _finish_if_outgrown(state: SchedulerState, request: Request) -> bool:
    """Finish a preempted sequence with LENGTH if its tokens outgrew the whole KV cache (it
    could never come back); True if so."""
    if state.kv.num_blocks_for(request.num_scheduled_tokens) <= \
            state.cache_config.num_gpu_blocks:
        return False
    logger.warning("request %s outgrew the whole KV cache (%d tokens); finishing it",
                   request.request_id, request.num_tokens)
    state._finish(request, FinishReason.LENGTH)
    state._dropped.append(request)
    return True


def _running_siblings_after(state: SchedulerState, victim: Request) -> list[Request]:
    """The victim's family in the running list after it. None of them is scheduled yet
    this step, nor is the request being scheduled: that one comes first among the victim
    candidates, and the victim is one of them."""
    family = family_of(victim)
    later = state.running[state.running.index(victim) + 1:]
    return [r for r in later if family_of(r) == family]


def _family_shares_blocks_outside(state: SchedulerState, group: list[Request]) -> bool:
    """Whether a sequence of the group's family outside it (running before the victim,
    maybe scheduled this step, or paused) shares a block with it: a swap would leave that
    block on the GPU, copy it to the CPU as well, and bring it back as a second copy."""
    family = family_of(group[0])
    blocks = {b for member in group for b in state.kv.block_tables[member.request_id]}
    return any(family_of(r) == family and r not in group
               and not blocks.isdisjoint(state.kv.block_tables[r.request_id])
               for r in (*state.running, *state.paused.values()))
