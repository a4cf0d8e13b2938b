"""The in-process engine: processor + engine core + output processor, stepped by the caller.

`pagedserve.LLM` drives it offline; its executor is given (one rank in this process, or Ray
actors for tensor parallelism: see `pagedserve.cluster.placement.executor_for`). The
coordinator actor runs the same core without the text halves (its gateway holds those).
"""

from __future__ import annotations

import time
from typing import Any

from pagedserve.config import EngineConfig
from pagedserve.engine.beam_search import BeamSearchOutput
from pagedserve.engine.core import CoreStepError, EngineCore, NoProgressError
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.processor import Processor
from pagedserve.errors import Internal
from pagedserve.executor.base import Executor
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.workers.models.loader import load_tokenizer

__all__ = ["LLMEngine", "EngineStepError", "NoProgressError"]


class EngineStepError(Internal):
    """A model step failed; the requests in it were aborted. `outputs` are their final states;
    `__cause__` is the failure (a WorkerFailure when a rank died)."""

    def __init__(self, message: str, outputs: list[RequestOutput]) -> None:
        super().__init__(message)
        self.outputs = outputs


class LLMEngine:
    """One model replica driven from this process: add requests, call step() until done."""

    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.config = config
        try:
            self.core = EngineCore(config, executor)
            self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        except BaseException:
            executor.shutdown()
            raise
        self.processor = Processor(self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.beam_outputs: dict[str, BeamSearchOutput] = {}
        """Finished beam searches by request id, until the caller takes them."""

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def executor(self) -> Executor:
        return self.core.executor

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def eos_token_ids(self) -> list[int]:
        return self.core.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: list[int]) -> None:
        self.core.eos_token_ids = list(ids)

    def shutdown(self) -> None:
        """Stop the workers (Ray actors are killed, their GPUs freed); the engine is unusable."""
        self.core.shutdown()

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | BeamSearchParams | None = None, priority: int = 0,
                    cache_salt: str | None = None) -> None:
        """Queue a prompt (text or token ids); raises an `errors` class naming any bad field
        (nothing is queued then)."""
        request = self.processor.make_request(request_id, prompt, params, priority, cache_salt,
                                              arrival_time=time.monotonic())
        self.core.add_request(request)
        if isinstance(request.params, SamplingParams):
            self.output_processor.add_request(
                request_id, prompt if isinstance(prompt, str) else None,
                request.prompt_token_ids, request.params, request.arrival_time)

    def abort_request(self, request_id: str) -> None:
        """Cancel a request in any state; its KV blocks are freed at once. 'q/i' cancels only
        sequence i of a request with n > 1 (it then finishes with 'abort')."""
        self.core.abort_request(request_id)
        if "/" not in request_id:
            self.output_processor.abort_request(request_id)
            self.beam_outputs.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() \
            or self.output_processor.has_unfinished_requests()

    # ---- the loop -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; returns the requests that changed (finished ones included), each in
        its `SamplingParams.output_kind` ('final_only' ones only when finished). Finished beam
        searches land in `beam_outputs`.

        If the model step fails, every request that was in it is aborted (its blocks freed) and
        EngineStepError carries their final outputs; the engine stays usable. If a
        tensor-parallel worker fails, the workers are stopped and every request is aborted.
        """
        try:
            core_outputs = self.core.step()
        except CoreStepError as error:
            raise EngineStepError(str(error), self.output_processor.fail(error.updates)) \
                from error.__cause__
        outputs, stops = self.output_processor.process(core_outputs)
        for sequence_id, stop in stops:
            self.core.finish_sequence(sequence_id, stop)
        for beam_output in core_outputs.beam_outputs:
            self.beam_outputs[beam_output.request_id] = \
                self.output_processor.finish_beam_search(beam_output)
        return outputs

    def model_info(self) -> dict[str, Any]:
        core = self.core
        return {"max_model_len": core.max_model_len, "vocab_size": core.vocab_size,
                "dtype": core.dtype, "device": core.device, "block_size": core.block_size,
                "kv_cache_dtype": core.kv_cache_dtype,
                "kv_cache_capacity_tokens": core.num_gpu_blocks * core.block_size}
