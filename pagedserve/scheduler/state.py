"""What the scheduler holds between steps, and the bookkeeping every part of a step shares.

`SchedulerState` owns the requests, their queues and the KV cache manager; it finishes and
forgets sequences, says how far each should get next, and records a request's share of a step
(`_emit`). The parts of a step are written over it: `admission.py` (swapped families back in,
waiting requests in), `preemption.py` (victims out, by swap or recompute), `forking.py` (n > 1
splits, beams). `Scheduler` (`scheduler.py`) is this state with the step loop and the public
API on top.
"""

from __future__ import annotations

from collections import deque

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


class SchedulerState:
    """Requests, queues, the KV cache manager and the counters of the step loop (no tensors)."""

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

    def _hold(self, request: Request) -> None:
        """Take a sequence among the requests, its output limit fixed for this context."""
        request.limit_outputs(self.config.max_model_len)
        self.requests[request.request_id] = request

    # ---- a sequence leaves ----------------------------------------------------------------

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

    # ---- a sequence's share of a step -------------------------------------------------------

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
        # Positional arguments: keywords make this construction about twice as slow.
        out.scheduled.append(ScheduledRequest(request_id, token_ids, start, update.start,
                                              update.block_ids, sample, new_data))
        if update.copies:
            out.blocks_to_copy.extend(update.copies)
        out.num_batched_tokens += num_new
