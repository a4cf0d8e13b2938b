"""The limits a request is checked against (vocabulary, context, sequences per request): one
set of checks, used by the engine core and by the gateway before a request leaves it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedserve.errors import InvalidArgument
from pagedserve.sampling_params import BeamSearchParams, SamplingParams
from pagedserve.validation import check_type, is_int


@dataclass(frozen=True)
class ModelLimits:
    """What one served model accepts."""

    vocab_size: int
    """Token ids must be in [0, vocab_size)."""
    max_model_len: int
    """Prompt + output tokens of one sequence."""
    max_num_seqs: int
    """Largest n and beam width: one request may fill a step, never more."""

    def check_prompt(self, token_ids: Any) -> None:
        """A non-empty list of ints inside the vocabulary, leaving room for one output token."""
        check_type("prompt_token_ids", token_ids, "a list of integers",
                   isinstance(token_ids, list))
        if not token_ids:
            raise InvalidArgument("prompt must contain at least one token", field="prompt")
        # The length first, and the ids at C speed when they are plain ints (a tokenizer's
        # always are): the gateway checks on its event loop, and a per-id Python check of a
        # 800,000-token prompt held it for 0.15 s.
        if len(token_ids) >= self.max_model_len:
            raise InvalidArgument(f"prompt has {len(token_ids)} tokens; it must be shorter than "
                                  f"max_model_len ({self.max_model_len}) to leave room for "
                                  "output", field="prompt")
        vocab = self.vocab_size
        if (all(type(t) is int for t in token_ids)
                and min(token_ids) >= 0 and max(token_ids) < vocab):
            return
        bad = [t for t in token_ids if not is_int(t) or not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"prompt_token_ids must be integers in [0, {vocab}), got "
                                  f"{bad[:5]}", field="prompt")

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """Strict (served requests): prompt + max_tokens must fit the context."""
        if max_tokens is not None and num_prompt_tokens + max_tokens > self.max_model_len:
            room = self.max_model_len - num_prompt_tokens
            raise InvalidArgument(f"SamplingParams.max_tokens must be in [1, {room}] for this "
                                  f"{num_prompt_tokens}-token prompt (max_model_len "
                                  f"{self.max_model_len}), got {max_tokens}",
                                  field="SamplingParams.max_tokens")

    def check_params(self, params: SamplingParams | BeamSearchParams) -> None:
        """n and beam width within max_num_seqs; token ids in the parameters in the vocab."""
        limit = self.max_num_seqs
        if isinstance(params, BeamSearchParams):
            if params.beam_width > limit:
                raise InvalidArgument(f"BeamSearchParams.beam_width must be in [1, {limit}] "
                                      f"(max_num_seqs), got {params.beam_width}",
                                      field="BeamSearchParams.beam_width")
            return
        if params.n > limit:
            raise InvalidArgument(f"SamplingParams.n must be in [1, {limit}] (max_num_seqs), "
                                  f"got {params.n}", field="SamplingParams.n")
        # No sequence gets past the context (also where max_tokens is None, unbounded).
        if params.min_tokens > self.max_model_len:
            raise InvalidArgument(f"SamplingParams.min_tokens must be in [0, "
                                  f"{self.max_model_len}] (max_model_len), got "
                                  f"{params.min_tokens}", field="SamplingParams.min_tokens")
        params.check_vocab(self.vocab_size)
