"""What generation returns: per-request outputs in the familiar (vLLM-like) shape."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.scheduler.output import TokenLogprobs


@dataclass
class CompletionOutput:
    """One generated sequence of a request (n > 1 gives several)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    """'stop', 'length' or 'abort'; None while running."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the sequence, if any."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timing of one request (time.monotonic seconds) and prefix-cache use."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    """State of one request: its prompt, its sequences so far, and whether it is done."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """One entry per prompt token; the first is None (nothing precedes it)."""
    metrics: RequestMetrics | None = None

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt_token_ids), sum(len(o.token_ids) for o in self.outputs))
