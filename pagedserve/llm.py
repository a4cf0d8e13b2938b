"""Offline generation: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedserve.cluster.placement import executor_for
from pagedserve.config import EngineConfig
from pagedserve.engine.beam_search import BeamSearchOutput
from pagedserve.engine.default_model import ensure_default_model
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.processor import Prompt, normalize_prompts
from pagedserve.errors import InvalidArgument
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.workers.models.loader import check_tp_size, load_config


class LLM:
    """One model replica driven from this process. `LLM()` uses the embedded default model.

    With `tensor_parallel_size` > 1 (or `distributed_executor_backend="ray"`) the ranks run as
    Ray actors; otherwise the model runs in this process (CPU or one GPU). Usable as a context
    manager; `shutdown()` stops Ray workers.
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        config = EngineConfig(model=model, **engine_args)
        config = dataclasses.replace(config, model=str(config.model or ensure_default_model()))
        # Checked here, before any worker (or Ray) starts for a model it cannot split.
        check_tp_size(load_config(config.model), config.tensor_parallel_size)
        self.engine = LLMEngine(config, executor_for(config, config.model))
        self._ids = itertools.count()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order."""
        prompts = normalize_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise InvalidArgument(f"got {len(params_list)} sampling_params for {len(prompts)} "
                                 "prompts; pass one, or one per prompt")
        if priority is not None and len(priority) != len(prompts):
            raise InvalidArgument(f"got {len(priority)} priorities for {len(prompts)} prompts")
        engine = self.engine
        # Only final outputs are returned: the engine then copies nothing for running requests.
        final_only = {id(p): dataclasses.replace(p, output_kind="final_only")
                      for p in params_list}
        ids = []
        try:
            for index, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
                request_id = str(next(self._ids))
                engine.add_request(request_id, prompt, final_only[id(params)],
                                   priority=0 if priority is None else priority[index])
                ids.append(request_id)
            return self._run(ids, use_tqdm)
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(ids)
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
            while len(finished) < len(ids):
                for output in self.engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        bar.update(1)
            while self.engine.has_unfinished_requests():  # the overlapped step still out
                self.engine.step()
        return [finished[request_id] for request_id in ids]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use generate()")
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [tokenizer.apply_chat_template(conversation, tokenize=True,
                                                 add_generation_prompt=add_generation_prompt)
                   for conversation in conversations]
        prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p)
                   for p in prompts]
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts: Prompt | Sequence[Prompt],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search per prompt; beams share KV blocks through fork and copy-on-write, and
        all prompts' beams run in the same steps."""
        engine = self.engine
        prompt_token_ids = [engine.processor.prompt_token_ids(p)
                            for p in normalize_prompts(prompts)]
        ids = []
        try:
            for token_ids in prompt_token_ids:
                request_id = f"beam-{next(self._ids)}"
                engine.add_request(request_id, token_ids, params)
                ids.append(request_id)
            while any(request_id not in engine.beam_outputs for request_id in ids):
                engine.step()
            return [engine.beam_outputs.pop(request_id) for request_id in ids]
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
