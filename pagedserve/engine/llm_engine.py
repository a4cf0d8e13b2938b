"""The engine: tokenizer, scheduler and detokenizer around one step loop; the model ranks run
behind an executor (in this process, or as Ray actors for tensor parallelism).

`pagedserve.LLM` drives it offline; the cluster's coordinator actor is meant to run this loop.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedserve.config import EngineConfig
from pagedserve.engine.default_model import ensure_default_model
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.executor import WorkerFailure, make_executor
from pagedserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler.config import CacheConfig, SchedulerConfig
from pagedserve.scheduler.request import FinishReason, Request
from pagedserve.scheduler.scheduler import Scheduler, child_request_id
from pagedserve.workers.kv_pool import bytes_per_block
from pagedserve.workers.loader import check_tp_size, load_config
from pagedserve.workers.step_result import StepResult, TokenLogprobs
from pagedserve.workers.worker import GIB, model_dtype

logger = logging.getLogger(__name__)



@dataclass
class _Tracked:
    """Frontend state of one user request (all of its n sequences)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    outputs: list[CompletionOutput]
    detokenizers: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_finished: int = 0
    sequence_ids: list[str] = field(default_factory=list)
    # Per completion, how many tokens / characters / logprob entries earlier deltas carried.
    sent: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.outputs)

    def report(self) -> RequestOutput | None:
        """This step's output in the request's `output_kind`; None when there is nothing to say."""
        kind = self.params.output_kind
        if kind == "final_only" and not self.finished:
            return None
        return self.delta() if kind == "delta" else self.snapshot()

    def delta(self) -> RequestOutput:
        """What is new since the last delta. While a sequence runs, the last (longest stop
        string - 1) characters stay back: a stop string completing later may remove them."""
        first = not self.sent
        if first:
            self.sent = [(0, 0, 0)] * len(self.outputs)
        hold_back = max((len(stop) for stop in self.params.stop or ()), default=1) - 1
        completions = []
        for index, completion in enumerate(self.outputs):
            tokens_sent, text_sent, logprobs_sent = self.sent[index]
            text_end = len(completion.text)
            if not completion.finished:
                text_end = max(text_sent, text_end - hold_back)
            logprobs = completion.logprobs
            completions.append(dataclasses.replace(
                completion,
                token_ids=completion.token_ids[tokens_sent:],
                text=completion.text[text_sent:text_end],
                logprobs=None if logprobs is None else logprobs[logprobs_sent:]))
            self.sent[index] = (len(completion.token_ids), text_end,
                                0 if logprobs is None else len(logprobs))
        # Prompt logprobs are complete before the first token: they go in the first delta only.
        return self._output(completions, self.prompt_logprobs if first else None)

    def snapshot(self) -> RequestOutput:
        """Everything so far (copies: later steps do not change what was returned)."""
        return self._output([
            dataclasses.replace(o, token_ids=list(o.token_ids),
                                logprobs=None if o.logprobs is None else list(o.logprobs))
            for o in self.outputs], self.prompt_logprobs)

    def _output(self, completions: list[CompletionOutput],
                prompt_logprobs: list[TokenLogprobs | None] | None) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids, outputs=completions,
            finished=self.finished, prompt_logprobs=prompt_logprobs,
            metrics=dataclasses.replace(self.metrics))


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("EngineConfig.device='cuda' but no CUDA device is visible; use 'cpu'")
    return torch.device(device)


def _eos_token_ids(hf_config: Any, tokenizer: Any, model_dir: str) -> list[int]:
    """EOS ids from config.json, then generation_config.json (instruct models often list their
    end-of-turn token only there, e.g. Llama 3's <|eot_id|>), then the tokenizer."""
    from transformers import GenerationConfig

    try:
        generation_eos = GenerationConfig.from_pretrained(
            model_dir, local_files_only=True).eos_token_id
    except OSError:
        generation_eos = None
    ids: list[int] = []
    for eos in (getattr(hf_config, "eos_token_id", None), generation_eos,
                None if tokenizer is None else tokenizer.eos_token_id):
        for token_id in eos if isinstance(eos, list | tuple) else [eos]:
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
    return ids


class NoProgressError(RuntimeError):
    """A step could schedule nothing although requests wait: the KV cache cannot hold them
    (or, with paused sequences, holds what the paused ones keep)."""


class EngineStepError(RuntimeError):
    """A model step failed; the requests in it were aborted. `outputs` are their final states."""

    def __init__(self, message: str, outputs: list[RequestOutput]) -> None:
        super().__init__(message)
        self.outputs = outputs


class LLMEngine:
    """One model replica driven from this process: add requests, call step() until done."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        device_type = _resolve_device(config.device).type
        model_dir = str(config.model or ensure_default_model())
        self.hf_config = load_config(model_dir)
        check_tp_size(self.hf_config, config.tensor_parallel_size)
        self.dtype = model_dtype(config, self.hf_config, device_type)
        self.tokenizer = self._load_tokenizer(config.tokenizer or model_dir)
        max_positions = getattr(self.hf_config, "max_position_embeddings", 8192)
        if config.max_model_len is not None and config.max_model_len > max_positions:
            raise ValueError(f"EngineConfig.max_model_len must be <= the model's "
                             f"max_position_embeddings ({max_positions}), got "
                             f"{config.max_model_len}")
        self.max_model_len = config.max_model_len or min(max_positions, 8192)
        self.eos_token_ids = _eos_token_ids(self.hf_config, self.tokenizer, model_dir)
        budget = config.max_num_batched_tokens or max(2048, self.max_model_len)
        if not config.enable_chunked_prefill and budget < self.max_model_len:
            raise ValueError(f"EngineConfig.max_num_batched_tokens must be >= max_model_len "
                             f"({self.max_model_len}) when enable_chunked_prefill is False, got "
                             f"{budget}")
        scheduler_config = SchedulerConfig(
            max_num_batched_tokens=budget, max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill,
            preemption_mode="swap" if config.swap_space_gib > 0 else "recompute",
            policy=config.scheduling_policy)
        block_bytes = bytes_per_block(self.hf_config, config.block_size, self.dtype,
                                      tp_size=config.tensor_parallel_size)
        if config.swap_space_gib > 0 and int(config.swap_space_gib * GIB) < block_bytes:
            raise ValueError(f"EngineConfig.swap_space_gib={config.swap_space_gib} holds no KV "
                             f"block ({block_bytes} bytes each); use 0 or at least "
                             f"{block_bytes / GIB:.6f}")
        self.executor = make_executor(config, model_dir, device_type)
        try:
            # Every rank has the same block ids, so the smallest rank's pool sets the size.
            num_blocks = min(self.executor.collective("num_gpu_blocks", budget))
            if num_blocks < 1:
                raise ValueError(f"no memory left for the KV cache (blocks of {block_bytes} "
                                 "bytes); raise gpu_memory_utilization or kv_cache_memory_gib, "
                                 "or use a smaller model")
            num_cpu_blocks = min(self.executor.collective("num_cpu_blocks"))
            self.executor.collective("init_cache", num_blocks, num_cpu_blocks,
                                     self.max_model_len, tuple(self.eos_token_ids))
            self.scheduler = Scheduler(scheduler_config, CacheConfig(
                block_size=config.block_size, num_gpu_blocks=num_blocks,
                num_cpu_blocks=num_cpu_blocks,
                enable_prefix_caching=config.enable_prefix_caching))
        except BaseException:
            self.executor.shutdown()
            raise
        logger.info("engine ready: %s on %s x%d (%s), %d KV blocks of %d tokens (%.2f GiB per "
                    "rank), %d CPU swap blocks, max_model_len %d", model_dir, device_type,
                    config.tensor_parallel_size, self.dtype, num_blocks, config.block_size,
                    num_blocks * block_bytes / GIB, num_cpu_blocks, self.max_model_len)
        self._tracked: dict[str, _Tracked] = {}
        self._sequence_owner: dict[str, tuple[_Tracked, int]] = {}
        self.last_result: StepResult | None = None

    def shutdown(self) -> None:
        """Stop the workers (Ray actors are killed, their GPUs freed); the engine is unusable."""
        self.executor.shutdown()

    @staticmethod
    def _load_tokenizer(path: str):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            # The message, not the exception: a log record keeps its args, and the exception's
            # traceback would keep this engine (and its GPU workers) alive.
            logger.warning("no tokenizer in %s (%s); only token-id prompts work", path,
                           str(error))
            return None

    # ---- requests -------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass prompt_token_ids instead of text")
        return self.tokenizer.encode(prompt)

    def prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids (text is encoded), checked against the vocabulary."""
        token_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        vocab = self.hf_config.vocab_size
        if not token_ids:
            raise ValueError("prompt must contain at least one token")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids must be integers in [0, {vocab}), got {bad[:5]}")
        return token_ids

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None, priority: int = 0,
                    cache_salt: str | None = None) -> None:
        """Queue a prompt (text or token ids); raises ValueError naming any bad field."""
        params = params or SamplingParams()
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.prompt_token_ids(prompt)
        vocab = self.hf_config.vocab_size
        params.check_vocab(vocab)
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer; use stop_token_ids")
        if len(self.eos_token_ids) > 1 and not params.ignore_eos:
            params = dataclasses.replace(params, extra_stop_token_ids=self.eos_token_ids[1:])
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        request = Request(request_id, token_ids, params, eos_token_id=eos, priority=priority,
                          cache_salt=cache_salt)
        n = params.n
        tracked = _Tracked(
            request_id, text, token_ids, params,
            outputs=[CompletionOutput(index=i, logprobs=[] if params.logprobs is not None
                                      else None, cumulative_logprob=0.0
                                      if params.logprobs is not None else None)
                     for i in range(n)],
            detokenizers=[self._detokenizer(token_ids, params) for _ in range(n)],
            metrics=RequestMetrics(arrival_time=request.arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        tracked.sequence_ids = [child_request_id(request_id, i) for i in range(n)] \
            if n > 1 else [request_id]
        # Queued last: if the scheduler refuses the request, nothing here refers to it.
        self.scheduler.add_request(request)
        self._tracked[request_id] = tracked
        for index, sequence_id in enumerate(tracked.sequence_ids):
            self._sequence_owner[sequence_id] = (tracked, index)

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams):
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop,
                                      params.include_stop_str_in_output,
                                      params.skip_special_tokens)

    def abort_request(self, request_id: str) -> None:
        """Cancel a request in any state; its KV blocks are freed at once."""
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return
        self.scheduler.abort_request(request_id)
        for sequence_id in tracked.sequence_ids:
            self._sequence_owner.pop(sequence_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._tracked)

    # ---- bare sequences (beam search drives these between steps) ---------------------------

    def add_sequence(self, sequence_id: str, token_ids: list[int],
                     params: SamplingParams) -> None:
        """Queue a sequence that is not a tracked request: step() reports nothing for it; the
        caller reads its tokens and logprobs from `last_result` after each step."""
        self.scheduler.add_request(Request(sequence_id, token_ids, params))

    def fork_sequence(self, parent_id: str, child_id: str, output_token_ids: list[int]) -> None:
        """A new sequence sharing the parent's KV blocks, with its own output tokens."""
        self.scheduler.fork_sequence(parent_id, child_id, output_token_ids)

    def pause_sequence(self, sequence_id: str) -> None:
        """Keep a running sequence out of the next steps (its blocks stay) until resumed."""
        self.scheduler.pause(sequence_id)

    def resume_paused(self) -> None:
        self.scheduler.resume_paused()

    def abort_sequence(self, sequence_id: str) -> None:
        """End a bare sequence in any state; its KV blocks are freed at once."""
        self.scheduler.abort_request(sequence_id)

    # ---- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the requests that changed (finished ones included),
        each in its `SamplingParams.output_kind` ('final_only' ones only when finished).

        If the model step fails, every request that was in it is aborted (its blocks freed) and
        EngineStepError carries their final outputs; the engine stays usable. If a
        tensor-parallel worker fails, the workers are stopped and every request is aborted.
        """
        scheduler = self.scheduler
        unfinished, preemptions = scheduler.num_unfinished, scheduler.num_preemptions
        step = scheduler.schedule()
        now = time.monotonic()
        changed: dict[str, _Tracked] = {}
        for request in scheduler.take_dropped():
            self._close_sequence(request, changed, now)
        # A step that preempted or finished something admits nothing; the next one may.
        if step.is_empty and not scheduler.running and scheduler.has_unfinished() \
                and (unfinished, preemptions) == (scheduler.num_unfinished,
                                                  scheduler.num_preemptions):
            self.executor.execute(step)  # still tell the workers what to forget
            raise NoProgressError("scheduler made no progress with requests waiting; the KV "
                                  "cache is too small for the waiting prompts")
        for item in step.scheduled:
            owner = self._sequence_owner.get(item.request_id) or self._owner_of_parent(
                item.request_id)
            if owner is not None and owner[0].metrics.first_scheduled_time is None:
                owner[0].metrics.first_scheduled_time = now
        try:
            result = self.executor.execute(step)
            emitted = scheduler.update(step, result.sampled)
        except WorkerFailure as error:
            raise EngineStepError(f"model step failed: {error}",
                                  self._abort_all(changed)) from error
        except Exception as error:
            raise EngineStepError(f"model step failed: {error}",
                                  self._abort_step(step, changed)) from error
        self.last_result = result
        for request_id, (start, entries) in result.prompt_logprobs.items():
            tracked = self._tracked.get(request_id)
            if tracked is not None and tracked.prompt_logprobs is not None:
                logprobs = tracked.prompt_logprobs
                # After a recompute preemption the chunks start at other positions; take what
                # extends the entries already known.
                if start <= len(logprobs) < start + len(entries):
                    logprobs.extend(entries[len(logprobs) - start:])
        now = time.monotonic()
        for request in emitted:
            owner = self._sequence_owner.get(request.request_id)
            if owner is None:
                continue
            tracked, index = owner
            self._on_token(tracked, index, request, result, now)
            changed[tracked.request_id] = tracked
        return self._collect(changed)

    def _collect(self, changed: dict[str, _Tracked]) -> list[RequestOutput]:
        outputs = []
        for tracked in changed.values():
            output = tracked.report()
            if output is not None:
                outputs.append(output)
            if tracked.finished:
                del self._tracked[tracked.request_id]
                for sequence_id in tracked.sequence_ids:
                    self._sequence_owner.pop(sequence_id, None)
        return outputs

    def _abort_step(self, step, changed: dict[str, _Tracked]) -> list[RequestOutput]:
        """Abort every request that had a sequence in a failed step; their final outputs and
        those of the requests that changed before the failure (`changed`)."""
        failed: dict[str, _Tracked] = {}
        for item in step.scheduled:
            owner = self._sequence_owner.get(item.request_id) or self._owner_of_parent(
                item.request_id)
            if owner is not None:
                failed[owner[0].request_id] = owner[0]
        return self._abort(failed, changed)

    def _abort_all(self, changed: dict[str, _Tracked]) -> list[RequestOutput]:
        """The workers are gone: abort every request and bare sequence; their final outputs."""
        outputs = self._abort(dict(self._tracked), changed)
        for sequence_id in list(self.scheduler.requests):
            self.scheduler.abort_request(sequence_id)
        return outputs

    def _abort(self, failed: dict[str, _Tracked],
               changed: dict[str, _Tracked]) -> list[RequestOutput]:
        for tracked in failed.values():
            self.scheduler.abort_request(tracked.request_id)
            for completion in tracked.outputs:
                if completion.finish_reason is None:
                    completion.finish_reason = FinishReason.ABORT.value
                    tracked.num_finished += 1
        return self._collect({**changed, **failed})

    def _close_sequence(self, request: Request, changed: dict[str, _Tracked],
                        now: float) -> None:
        """Report a sequence the scheduler finished (its final text, reason and timing)."""
        owner = self._sequence_owner.get(request.request_id)
        if owner is None:
            return
        tracked, index = owner
        completion = tracked.outputs[index]
        detokenizer = tracked.detokenizers[index]
        if detokenizer is not None:
            completion.text = detokenizer.flush()
        completion.finish_reason = request.finish_reason.value
        completion.stop_reason = request.stop_reason
        tracked.num_finished += 1
        if tracked.finished:
            tracked.metrics.finished_time = now
        changed[tracked.request_id] = tracked

    def _owner_of_parent(self, request_id: str) -> tuple[_Tracked, int] | None:
        tracked = self._tracked.get(request_id)
        return None if tracked is None else (tracked, 0)

    def _on_token(self, tracked: _Tracked, index: int, request: Request, result: StepResult,
                  now: float) -> None:
        completion = tracked.outputs[index]
        token_id = request.output_token_ids[-1]
        completion.token_ids.append(token_id)
        metrics = tracked.metrics
        metrics.first_token_time = metrics.first_token_time or now
        metrics.num_cached_tokens = max(request.num_cached_tokens, 0)
        metrics.num_preemptions = max(metrics.num_preemptions, request.num_preemptions)
        logprobs = result.logprobs.get(request.request_id)
        if completion.logprobs is not None and logprobs is not None:
            completion.logprobs.append(logprobs)
            completion.cumulative_logprob += logprobs.logprob
        detokenizer = tracked.detokenizers[index]
        # As in vLLM, the text of a stop token (EOS or a stop token id) stays out of the output
        # unless include_stop_str_in_output; its id is still in token_ids.
        stopped_on_token = request.status.is_finished \
            and request.finish_reason is FinishReason.STOP
        if stopped_on_token and not tracked.params.include_stop_str_in_output:
            detokenizer = None
        if detokenizer is not None:
            stop = detokenizer.push(
                token_id, check_stop=len(completion.token_ids) >= tracked.params.min_tokens)
            completion.text = detokenizer.text
            if stop is not None and not request.status.is_finished:
                self.scheduler.finish_request(request.request_id, FinishReason.STOP, stop)
            elif stop is not None and request.status.is_finished:
                request.finish_reason, request.stop_reason = FinishReason.STOP, stop
        if request.status.is_finished:
            self._close_sequence(request, {}, now)
