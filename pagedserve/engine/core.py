"""The engine core: one replica's scheduler and the executor that reaches its ranks.

Token ids in, token ids out: `add_request` queues a prompt's token ids with its sampling
parameters, `step()` runs one scheduler step on every rank and returns what each sequence
gained (new token ids, logprobs, finish reasons) with a stats snapshot. With async scheduling
(the default) a step is scheduled and sent while the previous one still runs on the ranks, and
its results come back with the next step's call, so each `step()` reports the step before it.
It holds no tokenizer
and never imports torch or transformers, so it runs anywhere: in the offline `LLM`'s process
and inside the coordinator actor. What it needs to know of the model (vocabulary, context
length, KV block bytes, end-of-sequence ids) it asks the ranks. Beam search runs as drivers the
core advances after each step, in the same steps as every other request.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.engine.beam_search import BeamSearchDriver, BeamSearchOutput
from pagedserve.engine.limits import ModelLimits
from pagedserve.errors import (
    AlreadyExists,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    WorkerFailure,
)
from pagedserve.executor.base import Executor
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.output import SchedulerOutput, StepResult, TokenLogprobs
from pagedserve.scheduler.request import FinishReason, Request, RequestStatus
from pagedserve.scheduler.scheduler import Scheduler, child_request_id
from pagedserve.validation import check_type

logger = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_MAX_MODEL_LEN = 8192


@dataclass
class EngineCoreRequest:
    """A request as the core takes it: token ids and parameters (plain data; crosses
    processes from the gateway to the coordinator)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams | BeamSearchParams
    priority: int = 0
    cache_salt: str | None = None
    arrival_time: float | None = None
    """time.monotonic() at arrival in the caller's process; None: when the core takes it."""


@dataclass
class SequenceUpdate:
    """What one sequence of a request gained in one step."""

    request_id: str
    index: int
    """Which of the request's n sequences."""
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    """One entry per new token when the request asked for logprobs."""
    prompt_logprobs: tuple[int, list[TokenLogprobs]] | None = None
    """(index of the first prompt token covered, entries): a chunk of the prompt's logprobs."""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """A snapshot after one step; counters are cumulative since the core started."""

    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    num_requests: int = 0
    """User requests in flight (a request with n > 1 or beams counts once)."""
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache."""
    prefix_cache_hits: int = 0
    """Of those, tokens found there."""
    step_tokens: int = 0
    """Tokens computed in this step (prefill chunks and decodes)."""
    step_seconds: float = 0.0
    """Wall time of this step as the core saw it (scheduling, dispatch, model, bookkeeping)."""
    execute_seconds: float = 0.0
    """Of that, the time rank 0 spent in the call (with async scheduling it includes waiting
    for the previous step's GPU work)."""
    gpu_idle_seconds: float = 0.0
    """GPU idle time before the steps finished by this call (rank 0, CUDA only)."""

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class EngineCoreOutputs:
    """Everything one step produced."""

    updates: list[SequenceUpdate] = field(default_factory=list)
    beam_outputs: list[BeamSearchOutput] = field(default_factory=list)
    first_scheduled: list[str] = field(default_factory=list)
    """Requests whose first tokens were computed in this step."""
    timestamp: float = 0.0
    """time.monotonic() when the step's results were known."""
    stats: EngineStats = field(default_factory=EngineStats)


class NoProgressError(ResourceExhausted):
    """A step could schedule nothing although requests wait: the KV cache cannot hold them
    (or, with paused sequences, holds what the paused ones keep)."""


class CoreStepError(Internal):
    """A model step failed; the requests in it (every request, when a rank died) were aborted.
    `updates` are their final states; `__cause__` is the failure."""

    def __init__(self, message: str, updates: list[SequenceUpdate]) -> None:
        super().__init__(message)
        self.updates = updates

    @property
    def grpc_status(self) -> str:  # a lost rank is UNAVAILABLE (retry elsewhere), not a bug
        return getattr(self.__cause__, "grpc_status", "INTERNAL")


@dataclass
class _Tracked:
    """Core-side state of one user request (all of its n sequences)."""

    num_sequences: int
    finished: set[int] = field(default_factory=set)
    """Indices of the sequences that ended (reported, or pending report)."""
    cancelled: set[int] = field(default_factory=set)
    """Sequences aborted before the request split into its n sequences: their sequence is
    aborted as soon as the split makes it."""
    scheduled: bool = False

    @property
    def done(self) -> bool:
        return len(self.finished) == self.num_sequences


def _split_sequence_id(sequence_id: str) -> tuple[str, int]:
    """'q/3' -> ('q', 3); 'q' -> ('q', 0)."""
    request_id, _, index = sequence_id.partition("/")
    return request_id, int(index) if index.isdigit() else 0


class EngineCore:
    """One replica's scheduler and ranks; see the module docstring."""

    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        info = executor.collective("describe")[0]
        self.vocab_size: int = info["vocab_size"]
        self.dtype: str = info["dtype"]
        self.kv_cache_dtype: str = info["kv_cache_dtype"]
        self.device: str = info["device"]
        self.eos_token_ids: list[int] = list(info["eos_token_ids"])
        block_bytes = info["block_bytes"]
        max_positions = info["max_position_embeddings"]
        if config.max_model_len is not None and config.max_model_len > max_positions:
            raise InvalidArgument(f"EngineConfig.max_model_len must be <= the model's "
                                  f"max_position_embeddings ({max_positions}), got "
                                  f"{config.max_model_len}")
        max_model_len = config.max_model_len or min(max_positions, DEFAULT_MAX_MODEL_LEN)
        budget = config.max_num_batched_tokens or max(2048, max_model_len)
        if not config.enable_chunked_prefill and budget < max_model_len:
            raise InvalidArgument(f"EngineConfig.max_num_batched_tokens must be >= "
                                  f"max_model_len ({max_model_len}) when enable_chunked_prefill "
                                  f"is False, got {budget}")
        if config.swap_space_gib > 0 and int(config.swap_space_gib * GIB) < block_bytes:
            raise InvalidArgument(f"EngineConfig.swap_space_gib={config.swap_space_gib} holds "
                                  f"no KV block ({block_bytes} bytes each); use 0 or at least "
                                  f"{block_bytes / GIB:.6f}")
        # Every rank has the same block ids, so the smallest rank's pool sets the size.
        num_blocks = min(executor.collective("num_gpu_blocks", budget))
        if num_blocks < 1:
            raise ResourceExhausted(f"no memory left for the KV cache (blocks of {block_bytes} "
                                    "bytes); raise gpu_memory_utilization or "
                                    "kv_cache_memory_gib, or use a smaller model")
        max_model_len = self._fit_context(max_model_len, num_blocks)
        num_cpu_blocks = min(executor.collective("num_cpu_blocks"))
        executor.collective("init_cache", num_blocks, num_cpu_blocks, max_model_len,
                            tuple(self.eos_token_ids))
        self.max_model_len = max_model_len
        self.num_gpu_blocks, self.num_cpu_blocks = num_blocks, num_cpu_blocks
        self.token_budget = budget
        self.limits = ModelLimits(self.vocab_size, max_model_len, config.max_num_seqs)
        self.block_size = config.block_size
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=config.max_num_seqs,
                            max_model_len=max_model_len,
                            enable_chunked_prefill=config.enable_chunked_prefill,
                            preemption_mode="swap" if config.swap_space_gib > 0
                            else "recompute",
                            policy=config.scheduling_policy),
            CacheConfig(block_size=config.block_size, num_gpu_blocks=num_blocks,
                        num_cpu_blocks=num_cpu_blocks,
                        enable_prefix_caching=config.enable_prefix_caching))
        logger.info("engine core ready: %s x%d (%s), %d KV blocks of %d tokens (%s, %.2f GiB "
                    "per rank), %d CPU swap blocks, max_model_len %d", self.device,
                    config.tensor_parallel_size, self.dtype, num_blocks, config.block_size,
                    self.kv_cache_dtype, num_blocks * block_bytes / GIB, num_cpu_blocks,
                    max_model_len)
        self._tracked: dict[str, _Tracked] = {}
        self._beams: dict[str, BeamSearchDriver] = {}
        self._pending: list[SequenceUpdate] = []
        self._owners: dict[str, tuple[str, int]] = {}
        """Sequence id -> (request id, index), memoized for sequences that emit tokens."""
        self._with_cancelled: set[str] = set()
        """Requests with sequences cancelled before their split (see _Tracked.cancelled)."""
        self._num_steps = 0
        self._in_flight: SchedulerOutput | None = None
        """The overlapped step whose results the ranks return with the next step's call."""

    def _fit_context(self, max_model_len: int, num_blocks: int) -> int:
        """A request of max_model_len tokens must fit the whole pool, or it could be admitted
        and never finish; a default context shrinks to the pool, an explicit one is refused."""
        capacity = num_blocks * self.config.block_size
        if capacity >= max_model_len:
            return max_model_len
        if self.config.max_model_len is not None:
            raise InvalidArgument(
                f"EngineConfig.max_model_len={max_model_len} does not fit the KV cache, which "
                f"holds {capacity} tokens ({num_blocks} blocks); lower max_model_len to at "
                f"most {capacity}, or give the KV cache more memory")
        logger.warning("max_model_len lowered from %d to %d: the KV cache holds no more",
                       max_model_len, capacity)
        return capacity

    # ---- requests in and out --------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request; raises an `errors` class naming the bad field. Nothing is queued
        when it raises."""
        request_id = request.request_id
        check_type("request_id", request_id, "a non-empty string",
                   isinstance(request_id, str) and bool(request_id))
        if request_id in self._tracked or request_id in self._beams:
            raise AlreadyExists(f"request id {request_id!r} is already in use")
        token_ids = request.prompt_token_ids
        self.limits.check_prompt(token_ids)
        params = request.params
        if isinstance(params, BeamSearchParams):
            self._add_beam_search(request_id, token_ids, params)
            return
        check_type("params", params, "SamplingParams or BeamSearchParams",
                   isinstance(params, SamplingParams))
        self.limits.check_params(params)
        self._warn_if_context_ends_first(request_id, len(token_ids), params.max_tokens)
        if len(self.eos_token_ids) > 1 and not params.ignore_eos:
            # Models with several end tokens (an instruct model's end-of-turn) stop on each.
            extra = [t for t in self.eos_token_ids[1:] if t not in params.extra_stop_token_ids]
            if extra:
                params = _with_extra_stops(params, extra)
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        kwargs: dict[str, Any] = {}
        if request.arrival_time is not None:
            kwargs["arrival_time"] = request.arrival_time
        self.scheduler.add_request(Request(request_id, list(token_ids), params,
                                           eos_token_id=eos, priority=request.priority,
                                           cache_salt=request.cache_salt, **kwargs))
        self._tracked[request_id] = _Tracked(params.n)

    def _warn_if_context_ends_first(self, request_id: str, num_prompt_tokens: int,
                                    max_tokens: int | None) -> None:
        """Offline, a request longer than the context runs until the context ends it (finish
        reason 'length'); say so up front. The gateway refuses such requests
        (ModelLimits.check_length)."""
        if max_tokens is not None and num_prompt_tokens + max_tokens > self.max_model_len:
            logger.warning("request %s: prompt (%d tokens) + max_tokens (%d) exceeds "
                           "max_model_len (%d); it will end with 'length' after %d tokens",
                           request_id, num_prompt_tokens, max_tokens, self.max_model_len,
                           self.max_model_len - num_prompt_tokens)

    def _add_beam_search(self, request_id: str, token_ids: list[int],
                         params: BeamSearchParams) -> None:
        self.limits.check_params(params)
        self._warn_if_context_ends_first(request_id, len(token_ids), params.max_tokens)
        driver = BeamSearchDriver(request_id, list(token_ids), params,
                                  frozenset(self.eos_token_ids), self.max_model_len)
        driver.start(self.scheduler)
        self._beams[request_id] = driver

    def abort_request(self, request_id: str) -> None:
        """Cancel a request in any state, its KV blocks freed at once; nothing more is
        reported for it. 'q/i' cancels only sequence i of a request with n > 1: its final
        update (finish_reason 'abort') comes with the next step. Unknown ids are ignored (an
        abort may cross the request's own finish)."""
        check_type("request_id", request_id, "a string", isinstance(request_id, str))
        driver = self._beams.pop(request_id, None)
        if driver is not None:
            driver.abort(self.scheduler)
            return
        if request_id in self._tracked:
            tracked = self._tracked.pop(request_id)
            self._forget_owners(request_id, tracked)
            self.scheduler.abort_request(request_id)
            self._pending = [u for u in self._pending if u.request_id != request_id]
            return
        parent_id, index = _split_sequence_id(request_id)
        tracked = self._tracked.get(parent_id)
        if tracked is None or tracked.num_sequences == 1 or not 0 <= index < tracked.num_sequences \
                or index in tracked.finished or str(index) != request_id.partition("/")[2]:
            return
        if request_id in self.scheduler.requests:
            self.scheduler.abort_request(request_id)
            self._owners.pop(request_id, None)
        else:
            tracked.cancelled.add(index)
            self._with_cancelled.add(parent_id)
        self._pending.append(SequenceUpdate(parent_id, index, finish_reason="abort"))
        self._count_finished(parent_id, index)

    def _forget_owners(self, request_id: str, tracked: _Tracked) -> None:
        self._owners.pop(request_id, None)
        for index in range(tracked.num_sequences if tracked.num_sequences > 1 else 0):
            self._owners.pop(child_request_id(request_id, index), None)

    def abort_all(self) -> None:
        """Abort every request (and its blocks); nothing more is reported for them."""
        for request_id in [*self._tracked, *self._beams]:
            self.abort_request(request_id)
        self._pending = []

    def _count_finished(self, request_id: str, index: int) -> None:
        tracked = self._tracked[request_id]
        tracked.finished.add(index)
        if tracked.done:
            del self._tracked[request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked or self._beams or self._pending) or self._in_flight is not None

    @property
    def num_requests(self) -> int:
        return len(self._tracked) + len(self._beams)

    # ---- one step ---------------------------------------------------------------------------

    def step(self) -> EngineCoreOutputs:
        """Schedule, run on every rank, update. A failed model step aborts the requests in it
        (every request, when a rank died) and raises CoreStepError with their final updates."""
        started = time.perf_counter()
        step = self.schedule()
        try:
            results = self.executor.execute(step)
        except Exception as error:
            self.fail_step(step, error)
        return self.complete(step, results, started)

    def schedule(self) -> SchedulerOutput:
        """The first half of a step: what every rank runs next. It overlaps the step in flight
        (returns before its tokens are known) unless beam search needs each step's logprobs
        before the next is scheduled, or there is nothing to run: that step collects the one
        in flight."""
        scheduler = self.scheduler
        unfinished, preemptions = scheduler.num_unfinished, scheduler.num_preemptions
        step = scheduler.schedule()
        for request in scheduler.take_dropped():
            self._close(request, self._pending)
        stuck = step.is_empty and not scheduler.running and scheduler.has_unfinished() \
            and self._in_flight is None \
            and (unfinished, preemptions) == (scheduler.num_unfinished,
                                              scheduler.num_preemptions)
        if stuck and not any(driver.release_paused(scheduler)
                             for driver in list(self._beams.values())):
            self.executor.execute(step)  # still tell the workers what to forget
            raise NoProgressError("scheduler made no progress with requests waiting; the KV "
                                  "cache is too small for the waiting prompts")
        step.overlap = self.config.async_scheduling and not step.is_empty and not self._beams
        self._num_steps += 1
        step.step_id = self._num_steps
        return step

    def fail_step(self, step: SchedulerOutput, error: Exception) -> None:
        """Abort what a failed step touched (everything, if the ranks are gone) and raise."""
        in_flight, self._in_flight = self._in_flight, None
        for failed in (in_flight, step):
            if failed is not None:
                self.scheduler.forget_unwritten_blocks(failed)
        if isinstance(error, WorkerFailure):
            victims = set(self._tracked) | set(self._beams)
        else:
            victims = {_split_sequence_id(item.request_id)[0]
                       for failed in (step, in_flight) if failed is not None
                       for item in failed.scheduled}
        updates = self._pending
        self._pending = []
        for request_id in victims:
            updates.extend(self._abort_with_updates(request_id))
        if isinstance(error, WorkerFailure):
            for sequence_id in list(self.scheduler.requests):
                self.scheduler.abort_request(sequence_id)
        raise CoreStepError(f"model step failed: {error}", updates) from error

    def _abort_with_updates(self, request_id: str) -> list[SequenceUpdate]:
        tracked = self._tracked.get(request_id)
        self.abort_request(request_id)
        if tracked is None:
            return []
        return [SequenceUpdate(request_id, index, finish_reason="abort")
                for index in range(tracked.num_sequences) if index not in tracked.finished]

    def complete(self, step: SchedulerOutput, results: list[StepResult],
                 started: float | None = None) -> EngineCoreOutputs:
        """The second half of a step: the ranks' results (of the step in flight before `step`,
        then of `step` unless it overlaps) become sampled tokens and reports."""
        finished = [done for done in (self._in_flight, None if step.overlap else step)
                    if done is not None]
        self._in_flight = step if step.overlap else None
        # A result of a step that failed on this side (its requests are aborted) is dropped.
        by_step = {result.step_id: result for result in results}
        missing = [done.step_id for done in finished if done.step_id not in by_step]
        if missing:
            raise Internal(f"the ranks returned no result for steps {missing}")
        outputs = EngineCoreOutputs(updates=self._pending)
        self._pending = []
        for done in finished:
            self._apply(done, by_step[done.step_id], outputs)
        scheduler = self.scheduler
        for request_id in list(self._with_cancelled):
            tracked = self._tracked.get(request_id)
            for index in list(tracked.cancelled if tracked is not None else ()):
                sequence_id = child_request_id(request_id, index)
                if sequence_id in scheduler.requests:  # the split made it just now
                    scheduler.abort_request(sequence_id)
                    tracked.cancelled.discard(index)
            if tracked is None or not tracked.cancelled:
                self._with_cancelled.discard(request_id)
        if not step.overlap:  # beam search steps never overlap
            for request_id, driver in list(self._beams.items()):
                done = driver.on_step(scheduler, by_step[step.step_id])
                if done is not None:
                    del self._beams[request_id]
                    outputs.beam_outputs.append(done)
        outputs.timestamp = time.monotonic()
        outputs.stats = self.stats(step, results[-1] if results else None, started)
        outputs.stats.gpu_idle_seconds = sum(result.gpu_idle_seconds for result in results)
        return outputs

    def _apply(self, step: SchedulerOutput, result: StepResult,
               outputs: EngineCoreOutputs) -> None:
        """One finished step's sampled tokens into the scheduler and `outputs`."""
        emitted = self.scheduler.update(step, result.sampled)
        for item in step.scheduled:
            if item.new_request is None:  # seen by the ranks before, so scheduled before
                continue
            request_id = _split_sequence_id(item.request_id)[0]
            tracked = self._tracked.get(request_id)
            if tracked is not None and not tracked.scheduled:
                tracked.scheduled = True
                outputs.first_scheduled.append(request_id)
        for sequence_id, chunk in result.prompt_logprobs.items():
            if sequence_id in self._tracked:
                outputs.updates.append(SequenceUpdate(sequence_id, 0, prompt_logprobs=chunk))
        # Once per sequence per step, on the coordinator: what the loop needs is bound once.
        owners = self._owners
        all_logprobs = result.logprobs
        updates = outputs.updates
        finished_status = RequestStatus.FINISHED
        for request in emitted:
            sequence_id = request.request_id
            owner = owners.get(sequence_id)
            if owner is None:
                owner = _split_sequence_id(sequence_id)
                if owner[0] not in self._tracked:  # a beam's sequence, or an aborted request
                    continue
                owners[sequence_id] = owner
            request_id, index = owner
            logprobs = all_logprobs.get(sequence_id) if all_logprobs else None
            num_cached = request.num_cached_tokens
            # Positional, as keywords make this about 1.7x slower: new_token_ids, logprobs,
            # prompt_logprobs, finish_reason, stop_reason, num_cached_tokens, num_preemptions.
            update = SequenceUpdate(request_id, index, [request.output_token_ids[-1]],
                                    None if logprobs is None else [logprobs], None, None, None,
                                    num_cached if num_cached > 0 else 0, request.num_preemptions)
            if request.status is finished_status:
                self._finish_update(update, request)
                del owners[sequence_id]
            updates.append(update)

    def _finish_update(self, update: SequenceUpdate, request: Request) -> None:
        update.finish_reason = request.finish_reason.value
        update.stop_reason = request.stop_reason
        self._count_finished(update.request_id, update.index)

    def _close(self, request: Request, into: list[SequenceUpdate]) -> None:
        """Report a sequence the scheduler finished without a new token."""
        request_id, index = _split_sequence_id(request.request_id)
        if request_id not in self._tracked:
            return
        update = SequenceUpdate(request_id, index)
        self._finish_update(update, request)
        self._owners.pop(request.request_id, None)
        into.append(update)

    def finish_sequence(self, sequence_id: str, stop_reason: str) -> None:
        """End one sequence for a stop string its frontend found: like an abort, but counted
        as finished by 'stop' (nothing more is reported for it)."""
        request_id, index = _split_sequence_id(sequence_id)
        if request_id not in self._tracked or sequence_id not in self.scheduler.requests:
            return
        self.scheduler.finish_request(sequence_id, FinishReason.STOP, stop_reason)
        self._owners.pop(sequence_id, None)
        self._count_finished(request_id, index)

    def stats(self, step: SchedulerOutput | None = None, result: StepResult | None = None,
              started: float | None = None) -> EngineStats:
        scheduler = self.scheduler
        pool = scheduler.kv.pool
        return EngineStats(
            num_running=len(scheduler.running) + len(scheduler.paused),
            num_waiting=len(scheduler.waiting), num_swapped=len(scheduler.swapped),
            num_requests=self.num_requests,
            kv_blocks_used=pool.num_blocks - pool.num_free_blocks, kv_blocks_total=pool.num_blocks,
            num_preemptions=scheduler.num_preemptions,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
            step_tokens=0 if step is None else step.num_batched_tokens,
            step_seconds=0.0 if started is None else time.perf_counter() - started,
            execute_seconds=0.0 if result is None else result.execute_seconds)

    # ---- new ranks after a failure ------------------------------------------------------------

    def requeue_for_new_ranks(self) -> None:
        """The ranks died: forget the step in flight and all they held (KV and swap pools,
        their copy of each request). Every request starts over by recompute from its prompt and
        the tokens it has, so its stream goes on with nothing missing or repeated; a beam search
        starts over from its prompt (its one output comes at the end). Then `attach_ranks`."""
        self._in_flight = None
        self.scheduler.requeue_all_for_recompute()
        for request_id, driver in list(self._beams.items()):
            driver.abort(self.scheduler)
            fresh = BeamSearchDriver(request_id, driver.prompt_token_ids, driver.params,
                                     frozenset(self.eos_token_ids), self.max_model_len)
            fresh.start(self.scheduler)
            self._beams[request_id] = fresh

    def attach_ranks(self, executor: Executor) -> None:
        """Continue on `executor`'s new ranks, with pools of the sizes the first ranks had."""
        available = min(executor.collective("num_gpu_blocks", self.token_budget))
        if available < self.num_gpu_blocks:
            raise ResourceExhausted(f"the new ranks hold {available} KV blocks, fewer than the "
                                    f"{self.num_gpu_blocks} this replica's scheduler uses")
        executor.collective("init_cache", self.num_gpu_blocks, self.num_cpu_blocks,
                            self.max_model_len, tuple(self.eos_token_ids))
        self.executor = executor

    def shutdown(self) -> None:
        """Stop the ranks (Ray actors are killed, their devices freed); the core is unusable."""
        self.executor.shutdown()


def _with_extra_stops(params: SamplingParams, extra: list[int]) -> SamplingParams:
    return dataclasses.replace(params, extra_stop_token_ids=[*params.extra_stop_token_ids,
                                                             *extra])
