"""Forking: new sequences that share every KV block of a running one.

A request with n > 1 prefills its prompt once (all but the last token) and then splits into n
sequences `<id>/0..<id>/n-1` (`split_into_sequences`); beam search forks a survivor from its
parent (`fork_sequence`). Either way the child shares the parent's blocks (copy-on-write of a
shared partial last block) and its computed tokens. The sequences forked from one another form
a family (`family_of`), which preemption swaps out and admission swaps back in together.
"""

from __future__ import annotations

import dataclasses

from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.request import Request, RequestStatus
from pagedserve.scheduler.state import SchedulerState


def child_request_id(parent_id: str, index: int) -> str:
    """Id of the index-th sequence of a request with n > 1."""
    return f"{parent_id}/{index}"


def family_of(request: Request) -> str:
    """Id shared by the sequences forked from one another (n > 1 samples, beams)."""
    return request.parent_id or request.request_id


def fork_sequence(state: SchedulerState, parent_id: str, child_id: str,
                  output_token_ids: list[int] | None) -> Request:
    """`Scheduler.fork_sequence`: check the fork, then make the child."""
    parent = state.requests[parent_id]
    if parent.status is not RequestStatus.RUNNING:
        raise ValueError(f"can only fork a running sequence; {parent_id!r} is "
                         f"{parent.status.value}")
    if parent_id in state._fork_pending:
        raise ValueError(f"{parent_id!r} has n > 1 and has not split into its sequences "
                         "yet; fork one of those instead")
    if child_id in state.requests:
        raise ValueError(f"request id {child_id!r} is already in use")
    outputs = list(parent.output_token_ids if output_token_ids is None else output_token_ids)
    computed = parent.num_computed_tokens
    num_prompt = parent.num_prompt_tokens
    if (parent.prompt_token_ids + outputs)[:computed] != parent.token_ids(0, computed) or (
        num_prompt + len(outputs) <= computed
    ):
        raise ValueError(f"fork of {parent_id!r}: the child's tokens must extend the "
                         f"parent's {computed} computed tokens")
    return make_child(state, parent, child_id, outputs, parent.sampling_params)


def make_child(state: SchedulerState, parent: Request, child_id: str, outputs: list[int],
               params: SamplingParams) -> Request:
    """A running sequence sharing the parent's blocks and computed tokens."""
    child = Request(
        request_id=child_id,
        prompt_token_ids=parent.prompt_token_ids,
        sampling_params=params,
        eos_token_id=parent.eos_token_id,
        arrival_time=parent.arrival_time,
        priority=parent.priority,
        cache_salt=parent.cache_salt,
        output_token_ids=outputs,
        num_computed_tokens=parent.num_computed_tokens,
        num_cached_tokens=parent.num_cached_tokens,
        parent_id=parent.parent_id or parent.request_id,
        status=RequestStatus.RUNNING,
    )
    child.block_hashes = list(
        parent.block_hashes[:parent.num_computed_tokens // state.kv.block_size])
    state.kv.fork(parent.request_id, child_id)
    state._hold(child)
    state.running.append(child)
    return child


def split_into_sequences(state: SchedulerState, parent: Request) -> None:
    """Split a request with n > 1 into n sequences sharing every block of its prefix."""
    parent_id = parent.request_id
    state._fork_pending.discard(parent_id)
    params = parent.sampling_params
    for index in range(params.n):
        child_params = dataclasses.replace(
            params, n=1, seed=None if params.seed is None else params.seed + index)
        child_id = child_request_id(parent_id, index)
        make_child(state, parent, child_id, [], child_params)
        state.children[parent_id].append(child_id)
    if parent.status is RequestStatus.RUNNING and state.paused.pop(parent_id, None) is None:
        state.running.remove(parent)
    parent.status = RequestStatus.FINISHED
    state.kv.free(parent_id)
    del state.requests[parent_id]
    state._forget(parent_id)
