"""The frontend's first half: prompts (text, token ids, dicts) to `EngineCoreRequest`s.

It holds the tokenizer and checks what only a frontend can (types, text encoding, stop strings
needing a tokenizer); the numeric checks against the model (vocabulary, context length, n and
beam limits) are the core's, so a coordinator fed over the wire checks them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pagedserve.engine.core import EngineCoreRequest
from pagedserve.errors import InvalidArgument, InvalidType
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.validation import check_text, check_type, is_int

Prompt = str | list[int] | dict[str, Any]
PROMPT_TYPES = "a string, a list of token ids, or a dict with 'prompt' or 'prompt_token_ids'"


def normalize_prompts(prompts: Any) -> list[str | list[int]]:
    """One prompt or a list of them -> a list of text or token-id prompts (nothing else: a
    tuple, bytes or an array is refused rather than guessed at)."""
    if isinstance(prompts, str | dict) or (
        isinstance(prompts, list) and prompts and is_int(prompts[0])
    ):
        prompts = [prompts]
    check_type("prompts", prompts, f"{PROMPT_TYPES}, or a list of those",
               isinstance(prompts, list))
    return [_one_prompt(prompt, f"prompts[{index}]") for index, prompt in enumerate(prompts)]


def _one_prompt(prompt: Any, name: str) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise InvalidArgument(f"{name} must have 'prompt' or 'prompt_token_ids'")
    check_type(name, prompt, PROMPT_TYPES, isinstance(prompt, str | list))
    if isinstance(prompt, list):
        bad = [t for t in prompt if not is_int(t)]
        if bad:
            raise InvalidType(f"{name}: prompt_token_ids must be integers, got {bad[:5]!r}")
    return prompt


class Processor:
    """Tokenizes prompts and builds core requests for one model."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidArgument("this model has no tokenizer; pass prompt_token_ids instead "
                                  "of text", field="prompt")
        check_text("prompt", text)
        return self.tokenizer.encode(text)

    def prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        prompt = _one_prompt(prompt, "prompt")
        return self.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def make_request(self, request_id: str, prompt: str | list[int],
                     params: SamplingParams | BeamSearchParams | None = None,
                     priority: int = 0, cache_salt: str | None = None,
                     arrival_time: float | None = None) -> EngineCoreRequest:
        params = SamplingParams() if params is None else params
        check_type("params", params, "SamplingParams or BeamSearchParams",
                   isinstance(params, SamplingParams | BeamSearchParams))
        if isinstance(params, SamplingParams) and params.stop:
            if self.tokenizer is None:
                raise InvalidArgument("SamplingParams.stop needs a tokenizer; use "
                                      "stop_token_ids", field="SamplingParams.stop")
            # Stop strings and the salt go on to a coordinator as proto strings: UTF-8.
            for stop in params.stop:
                check_text("SamplingParams.stop", stop)
        if isinstance(cache_salt, str):
            check_text("cache_salt", cache_salt)
        return EngineCoreRequest(request_id, self.prompt_token_ids(prompt), params,
                                 priority=priority, cache_salt=cache_salt,
                                 arrival_time=arrival_time)

    def decode(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
