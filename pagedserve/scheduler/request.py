"""Per-request state as the scheduler tracks it (one Request is one output sequence)."""

from __future__ import annotations

import enum
import sys
import time
from dataclasses import dataclass, field

from pagedserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    """Gave its blocks back; recomputes from the (prefix-cached) start when resumed."""
    SWAPPED = "swapped"
    """Its blocks live in the CPU pool; resumes by swapping them back in."""
    FINISHED = "finished"

    @property
    def is_finished(self) -> bool:
        return self is RequestStatus.FINISHED


class FinishReason(enum.Enum):
    STOP = "stop"
    """EOS, a stop token id or a stop string."""
    LENGTH = "length"
    """max_tokens or the model's context length."""
    ABORT = "abort"
    """Cancelled by the client or failed."""


@dataclass(eq=False)
class Request:
    """Prompt, generated tokens and progress of one sequence through the model."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    cache_salt: str | None = None
    """Extra key of the first block's hash: requests with different salts never share blocks."""

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    """Tokens scheduled to be sampled whose ids are not known yet (the step that samples them is
    still running: overlapped scheduling); they count toward num_computed_tokens' target."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens served from the prefix cache at first scheduling (-1 until scheduled)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Chained hashes of this request's full blocks, in order (filled lazily)."""
    parent_id: str | None = None
    """Set on sequences made by fork (parallel sampling, beams)."""
    max_output_tokens: int = field(default=sys.maxsize, init=False, repr=False)
    """Outputs after which no sample is wanted: max_tokens, or the end of the context if that
    comes first (`limit_outputs`, called by the scheduler that takes the request)."""

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids must not be empty")
        self.stop_ids = self.sampling_params.all_stop_token_ids()
        """Token ids that end the sequence once min_tokens are out (EOS unless ignore_eos)."""
        if self.eos_token_id is not None and not self.sampling_params.ignore_eos:
            self.stop_ids.add(self.eos_token_id)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens once every pending sample is known: what num_computed_tokens catches up with."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    def limit_outputs(self, max_model_len: int) -> None:
        """Fix max_output_tokens for a context of max_model_len tokens."""
        max_tokens = self.sampling_params.max_tokens
        context_left = max_model_len - len(self.prompt_token_ids)
        self.max_output_tokens = context_left if max_tokens is None \
            else min(max_tokens, context_left)

    def needs_no_more_samples(self, max_model_len: int) -> bool:
        """Whether the samples already pending reach max_tokens or the context: scheduling
        another would compute a token no one receives."""
        # Asked of every running request every step with overlapped scheduling: lengths are
        # read directly rather than through the properties.
        pending = self.num_pending_tokens
        if not pending:
            return False
        num_output = len(self.output_token_ids)
        max_tokens = self.sampling_params.max_tokens
        return (max_tokens is not None and num_output + pending >= max_tokens) \
            or len(self.prompt_token_ids) + num_output + pending >= max_model_len

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """Apply the stop conditions that need only token ids; True when finished."""
        params = self.sampling_params
        num_output = len(self.output_token_ids)
        if num_output >= params.min_tokens and self.output_token_ids[-1] in self.stop_ids:
            self.finish_reason = FinishReason.STOP
            last = self.output_token_ids[-1]
            # As in vLLM: EOS leaves stop_reason None; a stop token id is reported.
            self.stop_reason = None if last == self.eos_token_id and \
                last not in self.sampling_params.all_stop_token_ids() else last
            return True
        if (params.max_tokens is not None and num_output >= params.max_tokens) or (
            len(self.prompt_token_ids) + num_output >= max_model_len
        ):
            self.finish_reason = FinishReason.LENGTH
            return True
        return False
