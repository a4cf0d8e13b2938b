"""Iteration-level (continuous batching) scheduler over the paged KV cache.

Each request's `num_computed_tokens` catches up with its `num_tokens` (prompt + output); a step
gives every request part of the gap under one token budget. A token scheduled to be sampled counts
as pending until `update()` brings its id, so the next step can be scheduled before this one's
result is back (overlapped scheduling): that step feeds a placeholder the ranks fill in.
Chunked prefill, prefix-cache hits (which advance num_computed_tokens for free) and recompute
after preemption (which resets it) are therefore one mechanism. Running requests are served
first, then swapped ones, then waiting ones.

This file is the step loop and the public API. The state it works on and the bookkeeping its
parts share are `state.py`; the running requests' share of a step, `running.py`; who joins
the running requests, `admission.py`; who leaves them for room, `preemption.py`; new sequences
sharing a running one's blocks, `forking.py`.
"""

from __future__ import annotations

from pagedserve.errors import AlreadyExists
from pagedserve.scheduler import admission, forking, preemption
from pagedserve.scheduler.forking import child_request_id
from pagedserve.scheduler.output import SchedulerOutput
from pagedserve.scheduler.request import FinishReason, Request, RequestStatus
from pagedserve.scheduler.running import schedule_running
from pagedserve.scheduler.state import SchedulerState

__all__ = ["Scheduler", "child_request_id"]


class Scheduler(SchedulerState):
    """Owns requests, the KV cache manager and the step loop's bookkeeping (no tensors)."""

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
        self._hold(request)
        if request.sampling_params.n > 1:
            self.children[request.request_id] = []
            self._fork_pending.add(request.request_id)
            if request.num_prompt_tokens == 1:
                forking.split_into_sequences(self, request)
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

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens, allocate their slots, and describe the step as plain data."""
        out = SchedulerOutput()
        if self.config.policy == "priority":
            # Victims come from the requests not yet scheduled this step, so the most urgent
            # must be scheduled first (admission order would let a late urgent one be evicted).
            self.running.sort(key=self.service_order)
        budget, preempted_now = schedule_running(self, out, self.config.max_num_batched_tokens)
        if not preempted_now:
            budget = admission.resume_swapped(self, out, budget)
        if not preempted_now and not self.swapped:
            admission.admit_waiting(self, out, budget)
        out.forgotten_request_ids = self._forgotten
        self._forgotten = []
        out.cached_block_ids, self.kv.newly_cached = self.kv.newly_cached, []
        return out

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
        # Once per scheduled request per step: what the loop needs is bound once here, and
        # cache_computed_blocks is called only when a block may be newly full (its check,
        # inlined: tokens past num_tokens are pending samples, their hash unknown).
        requests = self.requests
        kv = self.kv
        size = kv.block_size
        hashed = kv.num_hashed_blocks if kv.enable_prefix_caching else None
        cache_computed_blocks = kv.cache_computed_blocks
        max_model_len = self.config.max_model_len
        add_emitted = emitted.append
        running_status = RequestStatus.RUNNING
        for item, request in zip(out.scheduled, out.requests, strict=True):
            request_id = item.request_id
            if requests.get(request_id) is not request:  # finished or aborted since
                continue
            running = request.status is running_status
            output = request.output_token_ids
            num_prompt, num_output = len(request.prompt_token_ids), len(output)
            if running and hashed is not None:
                computed = request.num_computed_tokens
                num_tokens = num_prompt + num_output
                if (computed if computed < num_tokens else num_tokens) // size \
                        > hashed.get(request_id, 0):
                    cache_computed_blocks(request)
            if item.sample:
                request.num_pending_tokens -= 1
                token_id = sampled[request_id]
                output.append(token_id)
                num_output += 1
                add_emitted(request)
                # check_stop only when one of its conditions may hold: most tokens end nothing.
                if (token_id in request.stop_ids or num_output >= request.max_output_tokens) \
                        and request.check_stop(max_model_len):
                    if not running:
                        self._remove_from_queues(request)
                    self._release(request)
                    finished = True
            elif (running and request_id in self._fork_pending
                  and request.num_computed_tokens == num_prompt - 1):
                forking.split_into_sequences(self, request)
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        return emitted

    # ---- after the ranks failed -----------------------------------------------------------

    def requeue_all_for_recompute(self) -> None:
        """Every KV block (GPU and swap) was lost with the ranks that held it: each unfinished
        sequence goes back to the waiting queue, ahead of those already waiting and in service
        order, to be recomputed from its prompt and the tokens it was given (a token still
        pending is dropped: its step's result never came). The prefix cache starts empty."""
        preemption.requeue_all_for_recompute(self)

    def forget_unwritten_blocks(self, out: SchedulerOutput) -> None:
        """After `out` failed on the ranks: drop the prefix-cache entries that may need its KV
        writes (`SchedulerOutput.cached_block_ids`; their KV may never have been computed)."""
        for block_id in out.cached_block_ids:
            self.kv.pool.uncache(block_id)

    # ---- beam search ----------------------------------------------------------------------

    def fork_sequence(self, parent_id: str, child_id: str,
                      output_token_ids: list[int] | None = None) -> Request:
        """A new running sequence sharing every KV block of a running parent (beam search).

        The child's tokens are the parent's prompt plus `output_token_ids` (default: the
        parent's outputs); they must agree with the parent on every token already computed.
        A shared partial last block is copied on the child's first write (copy-on-write).
        """
        return forking.fork_sequence(self, parent_id, child_id, output_token_ids)
