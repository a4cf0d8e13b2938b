"""Iteration-level (continuous batching) scheduler over the paged KV cache.

Each request's `num_computed_tokens` catches up with its `num_tokens` (prompt + output); a step
gives every request part of the gap under one token budget. A token scheduled to be sampled counts
as pending until `update()` brings its id, so the next step can be scheduled before this one's
result is back (overlapped scheduling): that step feeds a placeholder the ranks fill in.
Chunked prefill, prefix-cache hits (which advance num_computed_tokens for free) and recompute
after preemption (which resets it) are therefore one mechanism. Running requests are served
first, then swapped ones, then waiting ones.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque

from pagedserve.errors import AlreadyExists
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import CacheConfig, ConfigError, SchedulerConfig
from pagedserve.scheduler.kv_cache_manager import KVCacheManager, TableUpdate
from pagedserve.scheduler.output import (
    PLACEHOLDER_TOKEN_ID,
    NewRequestData,
    ScheduledRequest,
    SchedulerOutput,
)
from pagedserve.scheduler.policies import (
    DEFAULT_VICTIM_POLICIES,
    SERVICE_ORDERS,
    WAITING_QUEUES,
    AdmissionPolicy,
    VictimPolicy,
    admit_if_whole_prompt_fits,
)
from pagedserve.scheduler.request import FinishReason, Request, RequestStatus

logger = logging.getLogger(__name__)


def child_request_id(parent_id: str, index: int) -> str:
    """Id of the index-th sequence of a request with n > 1."""
    return f"{parent_id}/{index}"


class Scheduler:
    """Owns requests, the KV cache manager and the step loop's bookkeeping (no tensors)."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 victim_policy: VictimPolicy | None = None,
                 admission_policy: AdmissionPolicy = admit_if_whole_prompt_fits) -> None:
        self.config = scheduler_config
        self.cache_config = cache_config
        if scheduler_config.preemption_mode == "swap" and cache_config.num_cpu_blocks == 0:
            raise ConfigError("SchedulerConfig.preemption_mode='swap' needs "
                             "CacheConfig.num_cpu_blocks >= 1; set it or use 'recompute'")
        self.kv = KVCacheManager(cache_config.block_size, cache_config.num_gpu_blocks,
                                 cache_config.num_cpu_blocks, cache_config.enable_prefix_caching)
        self.victim_policy = victim_policy or DEFAULT_VICTIM_POLICIES[scheduler_config.policy]
        self.admission_policy = admission_policy
        self.watermark_blocks = int(scheduler_config.watermark * cache_config.num_gpu_blocks)
        self.requests: dict[str, Request] = {}
        self.waiting = WAITING_QUEUES[scheduler_config.policy]()
        self.service_order = SERVICE_ORDERS[scheduler_config.policy]
        self.running: list[Request] = []
        self.swapped: deque[Request] = deque()
        self.children: dict[str, list[str]] = {}
        """Parent id -> ids of its sequences, for requests with n > 1."""
        self.paused: dict[str, Request] = {}
        """Running requests kept out of steps for now (they keep their blocks)."""
        self._fork_pending: set[str] = set()
        self._known_to_workers: set[str] = set()
        self._forgotten: list[str] = []
        self._dropped: list[Request] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        """Prompt tokens looked up in the prefix cache at admission (cumulative)."""
        self.prefix_cache_hits = 0
        """Of those, tokens found cached (cumulative)."""

    # ---- requests in and out ------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; one with n > 1 is split into n sequences after its shared prefill."""
        if not isinstance(request.request_id, str) or not request.request_id:
            raise ValueError(f"request id must be a non-empty string, got {request.request_id!r}")
        if "/" in request.request_id:
            raise ValueError(f"request id {request.request_id!r} must not contain '/' (reserved "
                             "for the sequences of requests with n > 1)")
        self.add_sequence(request)

    def add_sequence(self, request: Request) -> None:
        """Queue a sequence whose id its owner derived from a request id ('<id>/...': beams);
        add_request is the same with the id checked to be a user's."""
        if not isinstance(request.priority, int) or isinstance(request.priority, bool):
            raise ValueError(f"priority must be an integer, got {request.priority!r}")
        if request.cache_salt is not None and not isinstance(request.cache_salt, str):
            raise ValueError(f"cache_salt must be a string or None, got {request.cache_salt!r}")
        if request.request_id in self.requests or request.request_id in self.children:
            raise AlreadyExists(f"request id {request.request_id!r} is already in use")
        max_len = self.config.max_model_len
        if request.num_prompt_tokens >= max_len:
            raise ValueError(f"prompt has {request.num_prompt_tokens} tokens; it must be shorter "
                             f"than max_model_len ({max_len}) to leave room for output")
        if request.num_prompt_tokens > self.kv.block_size * self.cache_config.num_gpu_blocks:
            raise ValueError(f"prompt has {request.num_prompt_tokens} tokens, more than the whole "
                             f"KV cache holds; raise num_gpu_blocks or shorten the prompt")
        self.requests[request.request_id] = request
        if request.sampling_params.n > 1:
            self.children[request.request_id] = []
            self._fork_pending.add(request.request_id)
            if request.num_prompt_tokens == 1:
                self._fork(request)
                return
        self.waiting.push(request)

    def abort_request(self, request_id: str) -> None:
        """Finish a request in any state (and all its sequences); its blocks return at once."""
        ids = [request_id, *self.children.pop(request_id, ())]
        self._fork_pending.discard(request_id)
        for rid in ids:
            request = self.requests.get(rid)
            if request is not None:
                self._remove_from_queues(request)
                self._finish(request, FinishReason.ABORT)

    def finish_request(self, request_id: str, reason: FinishReason,
                       stop_reason: int | str | None = None) -> None:
        """End one sequence for a reason found outside the scheduler (e.g. a stop string)."""
        request = self.requests.get(request_id)
        if request is None:
            return
        self._remove_from_queues(request)
        request.stop_reason = stop_reason
        self._finish(request, reason)

    def pause(self, request_id: str) -> None:
        """Keep a running request out of the next steps until resume_paused() (beam search)."""
        request = self.requests.get(request_id)
        if request is not None and request.status is RequestStatus.RUNNING \
                and request_id not in self.paused:
            self.running.remove(request)
            self.paused[request_id] = request

    def resume_paused(self) -> None:
        """Put every paused request back among the running ones."""
        self.running.extend(self.paused.values())
        self.paused.clear()

    def resume(self, request_id: str) -> None:
        """Put one paused request back among the running ones (no-op if it is not paused)."""
        request = self.paused.pop(request_id, None)
        if request is not None:
            self.running.append(request)

    def _remove_from_queues(self, request: Request) -> None:
        status = request.status
        if status is RequestStatus.RUNNING and request.request_id in self.paused:
            del self.paused[request.request_id]
        elif status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif status is RequestStatus.SWAPPED:
            self.swapped.remove(request)
        elif status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        request.finish_reason = reason
        self._release(request)

    def _release(self, request: Request) -> None:
        """Mark a request finished and give back everything it holds."""
        request.status = RequestStatus.FINISHED
        # Paused between schedule() and update(), it would otherwise come back on resume.
        self.paused.pop(request.request_id, None)
        self.kv.free(request.request_id)
        del self.requests[request.request_id]
        self._forget(request.request_id)
        self._drop_finished_family(request)

    def _drop_finished_family(self, request: Request) -> None:
        """Forget an n > 1 request's sequence list once its last sequence has finished."""
        if request.request_id in self._fork_pending:  # ended before it split into n sequences
            self._fork_pending.discard(request.request_id)
            self.children.pop(request.request_id, None)
        siblings = self.children.get(request.parent_id)
        if siblings is not None and not any(rid in self.requests for rid in siblings):
            del self.children[request.parent_id]

    def _forget(self, request_id: str) -> None:
        if request_id in self._known_to_workers:
            self._known_to_workers.discard(request_id)
            self._forgotten.append(request_id)

    def take_dropped(self) -> list[Request]:
        """Sequences the scheduler finished on its own without a new token (they outgrew the
        whole KV cache) since the last call; the caller reports them."""
        dropped, self._dropped = self._dropped, []
        return dropped

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step -----------------------------------------------------------------------

    def _target_tokens(self, request: Request) -> int:
        """Tokens whose KV must exist before the next sample (a fork parent stops one short)."""
        if request.request_id in self._fork_pending:
            return request.num_prompt_tokens - 1
        if request.needs_no_more_samples(self.config.max_model_len):
            return request.num_computed_tokens
        return request.num_scheduled_tokens

    def _chunk(self, num_new: int, budget: int) -> int:
        threshold = self.config.long_prefill_token_threshold
        if threshold and num_new > 1 and self.config.enable_chunked_prefill:
            num_new = min(num_new, threshold)
        return min(num_new, budget)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens, allocate their slots, and describe the step as plain data."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        preempted_now = False
        scheduled_running: list[Request] = []
        if self.config.policy == "priority":
            # Victims come from the requests not yet scheduled this step, so the most urgent
            # must be scheduled first (admission order would let a late urgent one be evicted).
            self.running.sort(key=self.service_order)

        index = 0
        while (index < len(self.running) and budget > 0
               and len(out.scheduled) < self.config.max_num_seqs):
            request = self.running[index]
            num_new = self._chunk(self._target_tokens(request)
                                  - request.num_computed_tokens, budget)
            if num_new <= 0:
                index += 1
                continue
            update = self.kv.allocate_slots(request, num_new)
            while update is None:
                victim = self.victim_policy(self.running[index:])
                self._preempt(victim, out)
                preempted_now = True
                if victim is request:
                    break
                update = self.kv.allocate_slots(request, num_new)
            if update is None:
                continue
            self._emit(request, num_new, update, out)
            budget -= num_new
            scheduled_running.append(request)
            index += 1

        if not preempted_now:
            budget = self._resume_swapped(out, budget)
        if not preempted_now and not self.swapped:
            self._admit_waiting(out, budget)
        out.forgotten_request_ids = self._forgotten
        self._forgotten = []
        return out

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        if self.kv.num_blocks_for(request.num_scheduled_tokens) > \
                self.cache_config.num_gpu_blocks:
            logger.warning("request %s outgrew the whole KV cache (%d tokens); finishing it",
                           request.request_id, request.num_tokens)
            self._finish(request, FinishReason.LENGTH)
            self._dropped.append(request)
            return
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._forget(request.request_id)
        swap = self.config.preemption_mode == "swap" and self.kv.can_swap_out(request.request_id)
        if swap:
            out.blocks_to_swap_out.extend(self.kv.swap_out(request.request_id))
            request.status = RequestStatus.SWAPPED
            # Victims go newest (least urgent) first; they come back in service order.
            self.swapped.append(request)
            self.swapped = deque(sorted(self.swapped, key=self.service_order))
        else:
            self.kv.free(request.request_id)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
            self.waiting.push_front(request)
        logger.debug("preempted %s by %s", request.request_id, "swap" if swap else "recompute")

    def _watermark(self) -> int:
        """Blocks to keep free when admitting or resuming; none while nothing runs, since a
        request that fits the whole pool but not pool minus watermark would otherwise wait
        forever."""
        return self.watermark_blocks if self.running else 0

    def _resume_swapped(self, out: SchedulerOutput, budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.swapped[0]
            num_new = self._chunk(self._target_tokens(request)
                                  - request.num_computed_tokens, budget)
            needed = self.kv.num_blocks_for(request.num_computed_tokens + num_new)
            if needed + self._watermark() > self.kv.num_free_blocks:
                break
            out.blocks_to_swap_in.extend(self.kv.swap_in(request.request_id))
            self.swapped.popleft()
            update = self.kv.allocate_slots(request, num_new)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if num_new > 0:
                self._emit(request, num_new, update, out)
                budget -= num_new
            elif request.request_id in self._fork_pending:
                # Its shared prefill finished in a step whose result came after it was swapped
                # out (overlapped scheduling): it splits now, as update() would have done.
                self._fork(request)
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        block_size = self.kv.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            cached = []
            looked_up = request.num_computed_tokens == 0 \
                and request.request_id not in self.kv.block_tables
            if looked_up:
                cached = self.kv.find_cached_prefix(request)
            target = self._target_tokens(request)
            cached = cached[:max(target, 0) // block_size]
            remaining = target - request.num_computed_tokens - len(cached) * block_size
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            blocks_for_prompt = self.kv.blocks_needed(request, remaining, cached)
            watermark = self._watermark()
            if not self.admission_policy(blocks_for_prompt, self.kv.num_free_blocks, watermark):
                break
            num_new = self._chunk(remaining, budget)
            update = self.kv.allocate_slots(request, num_new, cached, reserve=watermark)
            if update is None:
                break
            self.waiting.pop()
            if looked_up and self.kv.enable_prefix_caching:
                # After a recompute preemption the lookup covers outputs too.
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(cached) * block_size
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = len(cached) * block_size
            request.num_computed_tokens += len(cached) * block_size
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if num_new > 0:
                self._emit(request, num_new, update, out)
                budget -= num_new
            elif request.request_id in self._fork_pending:
                self._fork(request)

    def _emit(self, request: Request, num_new: int, update: TableUpdate,
              out: SchedulerOutput) -> None:
        """Record the request's share of the step and advance its computed-token count."""
        request_id = request.request_id
        start = request.num_computed_tokens
        new_data = None
        if request_id not in self._known_to_workers:
            self._known_to_workers.add(request_id)
            table = self.kv.block_tables[request_id]
            update = TableUpdate(0, list(table), update.copies)
            new_data = NewRequestData(list(request.prompt_token_ids),
                                      list(request.output_token_ids), request.sampling_params)
        table = self.kv.block_tables[request_id]
        size = self.kv.block_size
        if num_new == 1:
            slots = [table[start // size] * size + start % size]
        else:
            slots = [table[p // size] * size + p % size for p in range(start, start + num_new)]
        end = start + num_new
        known = min(end, request.num_tokens)
        token_ids = request.token_ids(start, known)
        if known < end:  # the token sampled by the step still running
            token_ids.append(PLACEHOLDER_TOKEN_ID)
        request.num_computed_tokens = end
        # Full blocks become cache entries now, not after the step: a request admitted later
        # in this step (or the next one, scheduled before this one returns) shares them. Every
        # rank writes a layer's KV for the whole batch before that layer's attention reads it,
        # and steps run in order, so no one reads a block before it is written.
        self.kv.cache_computed_blocks(request)
        sample = end == request.num_scheduled_tokens
        if sample:
            request.num_pending_tokens += 1
        out.requests.append(request)
        out.scheduled.append(ScheduledRequest(
            request_id=request_id,
            token_ids=token_ids,
            start_position=start,
            table_start=update.start,
            table_blocks=update.block_ids,
            slot_mapping=slots,
            sample=sample,
            new_request=new_data,
        ))
        out.blocks_to_copy.extend(update.copies)
        out.num_batched_tokens += num_new

    def requeue_all_for_recompute(self) -> None:
        """Every KV block (GPU and swap) was lost with the ranks that held it: each unfinished
        sequence goes back to the waiting queue, ahead of those already waiting and in service
        order, to be recomputed from its prompt and the tokens it was given (a token still
        pending is dropped: its step's result never came). The prefix cache starts empty."""
        lost = [*self.running, *self.paused.values(), *self.swapped]
        self.running, self.swapped = [], deque()
        self.paused.clear()
        for request in sorted(lost, key=self.service_order, reverse=True):
            self.kv.free(request.request_id)
            request.num_computed_tokens = 0
            request.num_pending_tokens = 0
            request.status = RequestStatus.PREEMPTED
            self.waiting.push_front(request)
        for request in self.requests.values():
            request.num_pending_tokens = 0
        self.kv.pool.reset_prefix_cache()
        self._known_to_workers.clear()
        self._forgotten = []

    def forget_unwritten_blocks(self, out: SchedulerOutput) -> None:
        """After `out` failed on the ranks: drop the prefix-cache entries of the blocks it was
        to write (their KV may never have been computed)."""
        size = self.kv.block_size
        for item in out.scheduled:
            for block_id in {slot // size for slot in item.slot_mapping}:
                self.kv.pool.uncache(block_id)

    # ---- after the model ran --------------------------------------------------------------

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append sampled tokens, index newly full blocks, apply stop conditions.

        Returns the requests that received a token this step (finished ones included, with
        status FINISHED); requests finished or aborted since `schedule()` are skipped. With
        overlapped scheduling the next step is already scheduled: a request it preempted still
        gets the token sampled for it here.
        """
        emitted = []
        finished = False
        for item, request in zip(out.scheduled, out.requests, strict=True):
            if self.requests.get(item.request_id) is not request:  # finished or aborted since
                continue
            running = request.status is RequestStatus.RUNNING
            if running:
                self.kv.cache_computed_blocks(request)
            if item.sample:
                request.num_pending_tokens -= 1
                request.append_token(sampled[item.request_id])
                emitted.append(request)
                if request.check_stop(self.config.max_model_len):
                    if not running:
                        self._remove_from_queues(request)
                    self._release(request)
                    finished = True
            elif (running and request.request_id in self._fork_pending
                  and request.num_computed_tokens == request.num_prompt_tokens - 1):
                self._fork(request)
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return emitted

    def fork_sequence(self, parent_id: str, child_id: str,
                      output_token_ids: list[int] | None = None) -> Request:
        """A new running sequence sharing every KV block of a running parent (beam search).

        The child's tokens are the parent's prompt plus `output_token_ids` (default: the
        parent's outputs); they must agree with the parent on every token already computed.
        A shared partial last block is copied on the child's first write (copy-on-write).
        """
        parent = self.requests[parent_id]
        if parent.status is not RequestStatus.RUNNING:
            raise ValueError(f"can only fork a running sequence; {parent_id!r} is "
                             f"{parent.status.value}")
        if parent_id in self._fork_pending:
            raise ValueError(f"{parent_id!r} has n > 1 and has not split into its sequences "
                             "yet; fork one of those instead")
        if child_id in self.requests:
            raise ValueError(f"request id {child_id!r} is already in use")
        outputs = list(parent.output_token_ids if output_token_ids is None else output_token_ids)
        computed = parent.num_computed_tokens
        num_prompt = parent.num_prompt_tokens
        if (parent.prompt_token_ids + outputs)[:computed] != parent.token_ids(0, computed) or (
            num_prompt + len(outputs) <= computed
        ):
            raise ValueError(f"fork of {parent_id!r}: the child's tokens must extend the "
                             f"parent's {computed} computed tokens")
        return self._make_child(parent, child_id, outputs, parent.sampling_params)

    def _make_child(self, parent: Request, child_id: str, outputs: list[int],
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
            parent.block_hashes[:parent.num_computed_tokens // self.kv.block_size])
        self.kv.fork(parent.request_id, child_id)
        self.requests[child_id] = child
        self.running.append(child)
        return child

    def _fork(self, parent: Request) -> None:
        """Split a request with n > 1 into n sequences sharing every block of its prefix."""
        parent_id = parent.request_id
        self._fork_pending.discard(parent_id)
        params = parent.sampling_params
        for index in range(params.n):
            child_params = dataclasses.replace(
                params, n=1, seed=None if params.seed is None else params.seed + index)
            child_id = child_request_id(parent_id, index)
            self._make_child(parent, child_id, [], child_params)
            self.children[parent_id].append(child_id)
        if parent.status is RequestStatus.RUNNING and self.paused.pop(parent_id, None) is None:
            self.running.remove(parent)
        parent.status = RequestStatus.FINISHED
        self.kv.free(parent_id)
        del self.requests[parent_id]
        self._forget(parent_id)
